"""Output heads: pure functions from raw backbone outputs to what an objective consumes.

Shapes: B batch, L length, V vocabulary (full last axis, including the absorbing state).
SUBS (MDLM/BD3-LM) lives with the objectives (`subs_log_probs`), not here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlm_jax.objectives.score_entropy import log_expm1, scale_by_sigma_offset  # noqa: F401 (re-exported)

Array = jax.Array


def sedd_log_score(raw: Array, xt: Array, sigma_bar: Array, *, scale_by_sigma: bool) -> Array:
    """SEDD log-score from the raw DDiT output (research/architectures.md §2, sedd_d3pm.md §5.1).

    raw (B, L, V), xt (B, L) int current tokens, sigma_bar: total noise σ̄, (B,) per sequence or
    (B, L) per token (block-wise noise levels).
    If scale_by_sigma (absorbing graph): out = raw − log(e^σ̄ − 1) − log(V − 1). Always: the entry
    at each position's own token is set to 0 (also where xt is the absorbing state).
    Returns (B, L, V) float32.
    """
    out = raw.astype(jnp.float32)
    V = out.shape[-1]
    if scale_by_sigma:
        sb = jnp.asarray(sigma_bar, jnp.float32)
        sb = sb[:, None] if sb.ndim == 1 else sb
        out = out + scale_by_sigma_offset(jnp.broadcast_to(sb, xt.shape), V)[..., None]
    own = xt[..., None] == jnp.arange(V, dtype=xt.dtype)
    return jnp.where(own, 0.0, out)
