"""Masked diffusion: MDLM (one block) and BD3-LM (blocks of `block_size`) are one method.

Absorbing process, SUBS parameterisation and the continuous-time masked NELBO (Sahoo et al.,
2024, "Simple and Effective Masked Diffusion Language Models", eq. 10), applied per block with
each block's own time and the clean blocks before it as context (Arriola et al., 2025, "Block
Diffusion", eq. 8); the two-pass [x_t ⊕ x_0] input trains all blocks in one forward pass. The
training times may come from a clipped interval [β_l, β_u] (BD3-LM §5), searched at evaluation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.masks import block_causal_mask
from dlm_jax.methods.base import ContinuousTime, Denoiser
from dlm_jax.objectives.nelbo import mdlm_loss, subs_log_probs
from dlm_jax.samplers.block import BlockDecoder


@dataclasses.dataclass(frozen=True)
class Masked(ContinuousTime):
    """MDLM / BD3-LM. `process` is `Absorbing`; the denoiser gives SUBS log p_θ(x_0 | x_t)."""

    clip_search = True

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

    def block_decoder(self, model, length: int, *, cached: bool = True,
                      window: int | None = None) -> BlockDecoder:
        """The model block by block (`samplers.block`), for sequences of `length` tokens.

        cached: a KV cache of the committed clean blocks (`DiT.decode_block`), committed with
        σ̄ = 0 like the clean half of two-pass training; only the current block's queries are
        computed. `window` (default min(length, seq_len), a multiple of the block) bounds the
        cache: longer generations slide it. Exact (equal to the uncached twin) within the window
        when time conditioning is off or per-token.
        cached=False: the twin that recomputes the whole sequence at every call under the
        block-causal mask (future blocks masked out), up to the training length.
        """
        mask_id, lb = self.process.mask_id, self.block_size

        def subs(logits, x):
            return subs_log_probs(logits, x, mask_id)

        if cached:
            w = window or min(length, self.seq_len)
            if w % lb:
                raise ValueError(f"the KV cache window {w} must be a multiple of the block size "
                                 f"{lb}")

            def log_probs(block, sigma, cache):
                return subs(model.decode_block(block, sigma, cache, commit=False)[0], block)

            def commit(block, cache):
                zero = jnp.zeros((block.shape[0],), jnp.float32)
                logits, cache = model.decode_block(block, zero, cache, commit=True)
                return subs(logits, block), cache
            return BlockDecoder(lambda b: model.init_cache(b, w), log_probs, commit)

        mask = block_causal_mask(length, lb)

        def full(block, sigma, cache):
            tokens, start = cache
            x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
            pos = jnp.arange(length)
            in_block = (pos >= start) & (pos < start + block.shape[1])
            sig = jnp.where(in_block[None], jnp.reshape(sigma, (-1, 1)), 0.0)
            logits = model(x, sig, mask=mask)
            rows = jax.lax.dynamic_slice_in_dim(logits, start, block.shape[1], axis=1)
            return subs(rows, block), x

        def commit_full(block, cache):
            lp, x = full(block, jnp.zeros((block.shape[0],), jnp.float32), cache)
            return lp, (x, cache[1] + block.shape[1])

        return BlockDecoder(
            lambda b: (jnp.full((b, length), mask_id, jnp.int32), jnp.int32(0)),
            lambda block, sigma, cache: full(block, sigma, cache)[0], commit_full,
            max_tokens=min(length, self.seq_len) if self.blocks else length)
