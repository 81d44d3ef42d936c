"""One reverse step of masked (absorbing) diffusion, shared by the MDLM and BD3-LM samplers.

All functions are per-row pure functions: `keys` is a (B,) array of typed keys, one per
sequence, already specialised to this step (e.g. `fold_in(row_key, step)`), so row i's result
depends on row i's key and inputs only, never on the batch it was drawn in.

Shapes: B batch, L positions (a whole sequence or one block), S states (vocabulary + mask).
`log_p_x0` (B, L, S) are SUBS log-probabilities (−inf or −1e6 at the mask state, carry-over
one-hot at unmasked positions); only masked positions are ever changed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlm_jax.samplers import categorical

Array = jax.Array


def _x0_draw(key: Array, log_p_x0: Array, mask_id: int, temperature: float, top_k: int,
             top_p: float) -> Array:
    """One candidate clean token per position of one row: (L, S) -> (L,)."""
    lp = log_p_x0.at[:, mask_id].set(-jnp.inf)  # a clean token is never the mask
    return categorical.sample(key, lp, temperature=temperature, top_k=top_k, top_p=top_p)


def ancestral_step(keys: Array, x: Array, log_p_x0: Array, p_reveal: Array, mask_id: int, *,
                   active: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> Array:
    """The x0-parameterised posterior step q(x_s | x_t, x̂_0) of masked diffusion.

    Each masked position (in `active`, default all) is revealed with probability `p_reveal` —
    (α_s − α_t)/(1 − α_t) for a step t → s, e.g. (t − s)/t for the linear schedule (MDLM, eq. 7 of
    Sahoo et al. 2024) — and then takes a token drawn from p_θ(x_0 | x_t) (after temperature /
    top-k / top-p); it stays masked otherwise. Unmasked positions are copied.

    keys (B,); x (B, L) int32; log_p_x0 (B, L, S); p_reveal (B,) or (B, L) in [0, 1];
    active (B, L) bool or None. Returns x_s (B, L) int32.
    """
    B, L = x.shape
    p_reveal = jnp.asarray(p_reveal, jnp.float32)
    p_reveal = jnp.broadcast_to(p_reveal[:, None] if p_reveal.ndim == 1 else p_reveal, (B, L))

    def row(key, x_row, lp_row, p_row):
        k_tok, k_rev = jax.random.split(key)
        tok = _x0_draw(k_tok, lp_row, mask_id, temperature, top_k, top_p)
        reveal = categorical.fine_uniform(k_rev, (L,)) < p_row
        return tok, reveal

    tok, reveal = jax.vmap(row)(keys, x, log_p_x0, p_reveal)
    change = (x == mask_id) & reveal
    if active is not None:
        change &= active
    return jnp.where(change, tok, x)


def first_hitting_step(keys: Array, x: Array, log_p_x0: Array, mask_id: int, *,
                       active: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> Array:
    """Reveal exactly one masked position per row: the first-hitting sampler's event (Zheng et
    al., 2025, "Masked diffusion models are secretly time-agnostic masked models", Alg. 1).

    The position is uniform among the row's masked positions (in `active`); its token is drawn
    from p_θ(x_0 | x_t). Rows with no masked position are unchanged.

    keys (B,); x (B, L) int32; log_p_x0 (B, L, S); active (B, L) bool or None.
    Returns (B, L) int32.
    """
    masked = x == mask_id
    if active is not None:
        masked &= active

    def row(key, x_row, lp_row, m_row):
        k_tok, k_pos = jax.random.split(key)
        tok = _x0_draw(k_tok, lp_row, mask_id, temperature, top_k, top_p)
        pos_lp = jnp.where(m_row, 0.0, -jnp.inf)
        pos = jnp.argmax(pos_lp + categorical.gumbel(k_pos, pos_lp.shape))
        hit = m_row & (jnp.arange(x_row.shape[0]) == pos)
        return jnp.where(hit, tok, x_row)

    return jax.vmap(row)(keys, x, log_p_x0, masked)


def row_keys(keys: Array, step) -> Array:
    """(B,) per-row keys for `step`: fold_in(key_i, step)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
