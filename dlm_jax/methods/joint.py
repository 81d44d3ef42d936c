"""The AR reading of a jointly trained diffusion network (`diffusion.ar_weight` > 0).

Joint training fits one network to the diffusion objective (bidirectional / block-causal passes)
and to the AR likelihood (causal passes at σ = 0). `CausalView` is the AR family's `Method` over
that network: every call runs it under the causal mask at σ = 0 and keeps the logits of the
real tokens, so the AR samplers (token by token through the KV cache, Jacobi, …) decode it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.models.attention import model_mask
from dlm_jax.methods.ar import Autoregressive


class CausalReading:
    """A diffusion DiT called as the AR model: causal mask, σ = 0, logits of V real tokens.

    Offers what `Autoregressive` calls: `model(tokens (B, L), _) -> (B, L, V)`,
    `decode_block(block (B, Lb), _, cache, commit=…) -> ((B, Lb, V), cache)` and `init_cache`.
    """

    def __init__(self, model, vocab: int):
        self.model, self.vocab = model, vocab

    def __call__(self, tokens: jax.Array, sigma=None, *, mask=None, **kwargs) -> jax.Array:
        del sigma
        B, L = tokens.shape
        causal = model_mask(mask, L, causal=True)
        logits = self.model(tokens, jnp.zeros((B,), jnp.float32), mask=causal, **kwargs)
        return logits[..., :self.vocab]

    def decode_block(self, tokens: jax.Array, sigma, cache, *, commit: bool):
        del sigma
        logits, cache = self.model.decode_block(
            tokens, jnp.zeros((tokens.shape[0],), jnp.float32), cache, commit=commit, causal=True)
        return logits[..., :self.vocab], cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return self.model.init_cache(batch, max_len, dtype)


@dataclasses.dataclass(frozen=True)
class CausalView(Autoregressive):
    """`Autoregressive` over `CausalReading(model, vocab)`: the AR samplers of a joint run."""

    vocab: int = 0

    def denoiser(self, model):
        return super().denoiser(CausalReading(model, self.vocab))

    def block_decoder(self, model, length: int, *, cached: bool = True,
                      window: int | None = None):
        return super().block_decoder(CausalReading(model, self.vocab), length, cached=cached,
                                     window=window)
