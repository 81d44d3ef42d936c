"""KV cache for block-by-block (BD3-LM) and token-by-token (AR) decoding, as an explicit pytree.

The cache holds, for every layer, the **pre-rotary** keys and the values of the committed prefix;
rotary positions are applied when the cache is read, so buffer slot j always has position j.
Shapes: N depth (layers), B batch, Lmax buffer length, H heads, Dh head width.

It is a plain pytree (jit/scan friendly, no hidden state): models return a new cache instead of
mutating one. Slots at or beyond `length` are ignored by attention (masked), whatever they hold.
The caller must keep `length + block length ≤ Lmax`; there is no sliding window.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class KVCache:
    """k, v: (N, B, Lmax, H, Dh) pre-rotary keys / values; length: int32[] committed tokens."""

    k: Array
    v: Array
    length: Array

    @classmethod
    def zeros(cls, depth: int, batch: int, max_len: int, heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        """An empty cache: zero buffers (N, B, Lmax, H, Dh) of `dtype` and length 0."""
        shape = (depth, batch, max_len, heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        """Lmax, the static buffer length."""
        return self.k.shape[2]

    def append(self, k_new: Array, v_new: Array) -> "KVCache":
        """Writes k_new/v_new (N, B, Lb, H, Dh) at slot `length` and advances length by Lb."""
        start = (0, 0, self.length, 0, 0)
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), start),
            v=jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), start),
            length=self.length + jnp.int32(k_new.shape[2]))
