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

Shapes: N depth (layers), B batch, H heads, W = max_len buffer slots, Dh head width. For the
unrolled model each layer has its own buffers (a tuple of N arrays, not one stacked array:
slicing a layer out of a stacked buffer copies it on XLA:CPU); for a scanned model
(`scan_layers`) k and v are each ONE stacked array (N, B, H, W, Dh), what the scan over layers
reads as its per-layer input and writes in one update. Either form indexes the same way
(`cache.k[i]` is layer i's (B, H, W, Dh)) and either model decodes with either form. Buffers are
stored heads first, the layout attention contracts them in. Slots [0, filled) are valid, in
position order; the rest are ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class KVCache:
    """k, v: N-tuples of (B, H, W, Dh) post-rotary keys / values, one per layer, or (`stacked`)
    one (N, B, H, W, Dh) array each; length: int32[] tokens committed so far (the absolute
    position of the next token); slot j holds position length − filled + j."""

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    length: Array

    @classmethod
    def zeros(cls, depth: int, batch: int, max_len: int, heads: int, head_dim: int,
              dtype=jnp.float32, *, stacked: bool = False) -> "KVCache":
        """An empty cache: N zero buffers (B, H, max_len, Dh) of `dtype` each (`stacked`: one
        (N, B, H, max_len, Dh) array for k and one for v), length 0."""
        if max_len < 1:
            raise ValueError(f"KV cache max_len must be >= 1, got {max_len}")
        shape = (batch, heads, max_len, head_dim)
        if stacked:
            return cls(k=jnp.zeros((depth,) + shape, dtype), v=jnp.zeros((depth,) + shape, dtype),
                       length=jnp.zeros((), jnp.int32))
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(depth)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(depth)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        """Whether k and v are single stacked (N, B, H, W, Dh) arrays (not per-layer tuples)."""
        return not isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        """W, the static number of buffer slots (the window)."""
        return self.k.shape[3] if self.stacked else self.k[0].shape[2]

    def stacked_kv(self) -> tuple[Array, Array]:
        """(k, v), each (N, B, H, W, Dh): the buffers as is when stacked, else stacked (a copy)."""
        if self.stacked:
            return self.k, self.v
        return jnp.stack(self.k), jnp.stack(self.v)

    @property
    def filled(self) -> Array:
        """int32[]: valid slots, min(length, W)."""
        return jnp.minimum(self.length, self.max_len)

    def valid(self) -> Array:
        """bool (W,): which slots hold a committed token."""
        return jnp.arange(self.max_len, dtype=jnp.int32) < self.filled

    def append(self, k_new, v_new) -> "KVCache":
        """Commit k_new/v_new: N per-layer (B, Lb, H, Dh) post-rotary keys / values at positions
        length … length+Lb−1 (a sequence of N arrays or one stacked (N, B, Lb, H, Dh) array,
        for either form of the cache; the cache keeps its form).

        If they do not fit after the valid slots, the buffer first slides left by Lb. Lb must
        divide W (checked statically), so a sliding buffer is always exactly full.
        """
        lb, w = k_new[0].shape[1], self.max_len
        if lb > w or w % lb:
            raise ValueError(f"a commit of {lb} tokens needs a KV cache window that is a multiple "
                             f"of it; the window is {w}")
        full = self.filled + lb > w
        slot = self.k.ndim - 2 if self.stacked else 2  # the W axis
        k, v = jax.lax.cond(full,
                            lambda kv: jax.tree.map(lambda a: jnp.roll(a, -lb, axis=slot), kv),
                            lambda kv: kv, (self.k, self.v))
        start = jnp.where(full, w - lb, self.filled)

        def write(buffers, new):  # new (…, B, Lb, H, Dh) -> heads first
            if self.stacked:  # all layers in one update: (N, B, Lb, H, Dh) -> (N, B, H, Lb, Dh)
                new = jnp.swapaxes(jnp.stack(new) if isinstance(new, (tuple, list)) else new,
                                   2, 3)
                return jax.lax.dynamic_update_slice(buffers, new.astype(buffers.dtype),
                                                    (0, 0, 0, start, 0))
            return tuple(jax.lax.dynamic_update_slice(b, jnp.swapaxes(n, 1, 2).astype(b.dtype),
                                                      (0, 0, start, 0))
                         for b, n in zip(buffers, new))
        return KVCache(k=write(k, k_new), v=write(v, v_new), length=self.length + jnp.int32(lb))
