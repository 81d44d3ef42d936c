"""Masked diffusion: MDLM (one block) and BD3-LM (blocks of `block_size`) are one method.

Absorbing process, SUBS parameterisation and the continuous-time masked NELBO (Sahoo et al.,
2024, "Simple and Effective Masked Diffusion Language Models", eq. 10), applied per block with
each block's own time and the clean blocks before it as context (Arriola et al., 2025, "Block
Diffusion", eq. 8); the two-pass [x_t ⊕ x_0] input trains all blocks in one forward pass. The
training times may come from a clipped interval [β_l, β_u] (BD3-LM §5), searched at evaluation.
"""
from __future__ import annotations

import dataclasses

from dlm_jax.methods.base import ContinuousTime, Denoiser
from dlm_jax.objectives.nelbo import mdlm_loss, subs_log_probs


@dataclasses.dataclass(frozen=True)
class Masked(ContinuousTime):
    """MDLM / BD3-LM. `process` is `Absorbing`; the denoiser gives SUBS log p_θ(x_0 | x_t)."""

    clip_search = True
    drafts = True

    @property
    def name(self) -> str:
        return "bd3lm" if self.blocks else "mdlm"

    def terms(self, raw, x0, xt, t):
        return mdlm_loss(raw, x0, xt, t, self.schedule, self.process.mask_id)

    def denoiser(self, model) -> Denoiser:
        raw = self.raw_fn(model)

        def x0_log_probs(xt, sigma_bar):
            return subs_log_probs(raw(xt, sigma_bar), xt, self.process.mask_id)
        return Denoiser("x0_log_probs", x0_log_probs)

    def diffusion_generator(self, exp, sampling, length):
        from dlm_jax.generation import bd3lm_generator, mdlm_generator
        return (bd3lm_generator if self.blocks else mdlm_generator)(exp, sampling, length)

    def block_output(self, raw, block, sigma_bar):
        return subs_log_probs(raw, block, self.process.mask_id)
