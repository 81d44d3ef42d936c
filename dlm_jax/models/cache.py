"""KV cache for block-by-block (BD3-LM) and token-by-token (AR) decoding, as an explicit pytree.

For every layer the cache holds the **post-rotary** keys and the values of the most recent
committed tokens, each key rotated once, at its absolute position, when it is written. A decoding
call therefore costs O(block × cached tokens) per layer: nothing in the buffer is rotated or
recomputed on a read (rotary scores depend only on position differences, so absolute positions
are exact at any length).

Sliding window by construction: the buffer holds at most `max_len` tokens. A commit that would
not fit first shifts the buffer left by the block length, dropping the oldest tokens, so a write
can never fall outside the buffer (the overflow that `dynamic_update_slice` would hide by
clamping). Within `max_len` total tokens the cache is exact; beyond it, it is the standard
sliding-window approximation (the kept tokens' deeper-layer states were computed with their
earlier context, as in the BD3-LM reference generator).

Shapes: N depth (layers), B batch, H heads, W = max_len buffer slots, Dh head width. Each layer
has its own buffers (a tuple of N arrays, not one stacked array: slicing a layer out of a stacked
buffer copies it on XLA:CPU), stored heads first, (B, H, W, Dh), the layout attention contracts
them in, so a read copies nothing. Slots [0, filled) are valid, in position order; the rest
are ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class KVCache:
    """k, v: N-tuples of (B, H, W, Dh) post-rotary keys / values, one per layer; length: int32[]
    tokens committed so far (the absolute position of the next token); slot j holds position
    length − filled + j."""

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    length: Array

    @classmethod
    def zeros(cls, depth: int, batch: int, max_len: int, heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        """An empty cache: N zero buffers (B, H, max_len, Dh) of `dtype` each, length 0."""
        if max_len < 1:
            raise ValueError(f"KV cache max_len must be >= 1, got {max_len}")
        shape = (batch, heads, max_len, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(depth)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(depth)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        """W, the static number of buffer slots (the window)."""
        return self.k[0].shape[2]

    @property
    def filled(self) -> Array:
        """int32[]: valid slots, min(length, W)."""
        return jnp.minimum(self.length, self.max_len)

    def valid(self) -> Array:
        """bool (W,): which slots hold a committed token."""
        return jnp.arange(self.max_len, dtype=jnp.int32) < self.filled

    def append(self, k_new, v_new) -> "KVCache":
        """Commit k_new/v_new: N per-layer (B, Lb, H, Dh) post-rotary keys / values at positions
        length … length+Lb−1.

        If they do not fit after the valid slots, the buffer first slides left by Lb. Lb must
        divide W (checked statically), so a sliding buffer is always exactly full.
        """
        lb, w = k_new[0].shape[1], self.max_len
        if lb > w or w % lb:
            raise ValueError(f"a commit of {lb} tokens needs a KV cache window that is a multiple "
                             f"of it; the window is {w}")
        full = self.filled + lb > w
        k, v = jax.lax.cond(full, lambda kv: jax.tree.map(lambda a: jnp.roll(a, -lb, axis=2), kv),
                            lambda kv: kv, (self.k, self.v))
        start = (0, 0, jnp.where(full, w - lb, self.filled), 0)

        def write(buffers, new):  # new (B, Lb, H, Dh) -> heads first
            return tuple(jax.lax.dynamic_update_slice(b, jnp.swapaxes(n, 1, 2).astype(b.dtype),
                                                      start) for b, n in zip(buffers, new))
        return KVCache(k=write(k, k_new), v=write(v, v_new), length=self.length + jnp.int32(lb))
