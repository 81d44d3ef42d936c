"""Score entropy (SEDD; Lou et al., 2024, "Discrete Diffusion Modeling by Estimating the Ratios
of the Data Distribution"): the model's log-ratios s_θ(x_t)[i, y] ≈ log p_t(x_t^{i←y}) / p_t(x_t)
trained with denoising score entropy (their eq. 8), over any process and any block size
(blocks use the two-pass input and per-token noise levels, like BD3-LM).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import ContinuousTime, Denoiser
from dlm_jax.objectives.score_entropy import scale_by_sigma_offset, score_entropy

Array = jax.Array


def sedd_log_score(raw: Array, xt: Array, sigma_bar: Array, *, scale_by_sigma: bool) -> Array:
    """SEDD's log-score from the raw network output.

    raw (B, L, S); xt (B, L) int current tokens; sigma_bar σ̄ (B,) per sequence or (B, L) per
    token. With `scale_by_sigma` (absorbing process) the output is shifted by
    −log(e^σ̄ − 1) − log(S − 1), SEDD's parameterisation that makes a zero network output the
    score of a uniform x_0 (their §4, "scaling"). The entry at each position's own token is set to
    0 (log 1). Returns (B, L, S) float32.
    """
    out = raw.astype(jnp.float32)
    num_states = out.shape[-1]
    if scale_by_sigma:
        sb = jnp.asarray(sigma_bar, jnp.float32)
        sb = sb[:, None] if sb.ndim == 1 else sb
        out = out + scale_by_sigma_offset(jnp.broadcast_to(sb, xt.shape), num_states)[..., None]
    own = xt[..., None] == jnp.arange(num_states, dtype=xt.dtype)
    return jnp.where(own, 0.0, out)


@dataclasses.dataclass(frozen=True)
class ScoreEntropy(ContinuousTime):
    """SEDD over `process` (Absorbing or Uniform); `scale_by_sigma` applies to absorbing only."""

    scale_by_sigma: bool = True

    @property
    def name(self) -> str:
        return "sedd-blocks" if self.blocks else "sedd"

    @property
    def scaled(self) -> bool:
        return self.scale_by_sigma and self.process.mask_id is not None

    def log_score(self, raw: Array, xt: Array, sigma_bar: Array) -> Array:
        return sedd_log_score(raw, xt, sigma_bar, scale_by_sigma=self.scaled)

    def terms(self, raw, x0, xt, t):
        sigma_bar = self.schedule.sigma_bar(t)
        return score_entropy(self.process, self.log_score(raw, xt, sigma_bar), xt, x0, sigma_bar,
                             self.schedule.sigma(t))

    def diffusion_generator(self, exp, sampling, length):
        from dlm_jax.generation import score_generator, sedd_blocks_generator
        if self.blocks:
            return sedd_blocks_generator(exp, sampling, length)
        return score_generator(exp, sampling, length, denoiser="log_score")

    def block_output(self, raw, block, sigma_bar):
        return self.log_score(raw, block, sigma_bar)

    def denoiser(self, model) -> Denoiser:
        raw = self.raw_fn(model)
        return Denoiser("log_score", lambda xt, sigma_bar: self.log_score(raw(xt, sigma_bar), xt,
                                                                          sigma_bar))
