"""Attention with structured masks, and the backends that compute it.

A `MaskPattern` names one of the structural masks the models use — full (bidirectional),
causal, block-causal, the BD3-LM two-pass layout over [x_t ⊕ x_0] (Arriola et al., 2025, "Block
Diffusion", §3.2) — plus an optional traced band (attention-mask annealing). Because the
structure is known, a backend can skip the key/value tiles a query tile never sees and never
materialise the (Lq, Lk) score matrix. An arbitrary boolean mask array still works, through the
dense path.

Backends (`model.attention`):
  * ``xla`` (every platform, the default): flash-style attention in plain JAX (`models.flash`):
    key/value tiles with an online softmax, fully masked tiles skipped, a backward pass that
    recomputes the scores (Dao et al., 2022, "FlashAttention", Alg. 1–2).
  * ``dense``: the masked attention with the whole score matrix (block-sparse for two-pass), the
    numerical reference the others are tested against.
  * ``splash`` (TPU): the Pallas splash-attention kernel with the pattern as a block mask.
  * ``cudnn`` (GPU): the fused cuDNN attention of `jax.nn.dot_product_attention`.

Shapes: q (B, Lq, H, Dh), k/v (B, Lk, H, Dh). Queries are the first Lq positions of the key
sequence (Lq ≤ Lk): the two-pass model's last layer computes only the noisy rows.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.config import ATTENTION_BACKENDS

Array = jax.Array

KINDS = ("full", "causal", "block_causal", "two_pass")
BACKENDS = ATTENTION_BACKENDS
# The platform each accelerator backend needs (`check_backend`).
BACKEND_PLATFORMS = {"splash": "tpu", "cudnn": "gpu"}


@dataclasses.dataclass(frozen=True)
class MaskPattern:
    """A structural attention mask, True where query position q may attend to key position k.

    kind:
      * ``full``: every key;
      * ``causal``: k ≤ q;
      * ``block_causal``: block(k) ≤ block(q), blocks of `block_size` positions;
      * ``two_pass``: the BD3-LM layout over keys [x_t ⊕ x_0] of length 2L (`masks.
        bd3lm_two_pass_mask`): a noisy query in block b sees its own noisy block and the clean
        blocks < b; a clean query in block b sees the clean blocks ≤ b.
    band: None, or an int32 scalar (may be traced): additionally k' ≤ q' + band, where q', k' are
      positions within the stream (mod L for two-pass) — the annealed mask of AR adaptation
      (`masks.band_mask`); inside a block for the block kinds, since earlier blocks always pass.
    """

    kind: str = "full"
    block_size: int = 0
    band: Array | int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention mask kind {self.kind!r}; choose from {KINDS}")
        if self.kind in ("block_causal", "two_pass") and self.block_size < 1:
            raise ValueError(f"a {self.kind} mask needs block_size ≥ 1, got {self.block_size}")

    def stream_length(self, lk: int) -> int:
        """The length L of one stream: Lk, or Lk / 2 for the two-pass input."""
        if self.kind != "two_pass":
            return lk
        if lk % 2 or (lk // 2) % self.block_size:
            raise ValueError(f"a two-pass mask needs 2L keys with L a multiple of the block "
                             f"{self.block_size}; got {lk} keys")
        return lk // 2

    def allowed(self, q, k, lk: int, *, use_band: bool = True, xp=jnp):
        """The mask at broadcastable integer position arrays q, k (of a length-`lk` key
        sequence); `xp` = numpy for static (trace-time) evaluation, which needs use_band=False
        when the band is traced."""
        L = self.stream_length(lk)
        if self.kind == "two_pass":
            clean_q, clean_k = q >= L, k >= L
            pq, pk = xp.where(clean_q, q - L, q), xp.where(clean_k, k - L, k)
            bq, bk = pq // self.block_size, pk // self.block_size
            ok = ((~clean_q & ~clean_k & (bq == bk)) | (~clean_q & clean_k & (bk < bq))
                  | (clean_q & clean_k & (bk <= bq)))
        else:
            pq, pk = q, k
            if self.kind == "full":
                ok = xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(k)), bool)
            elif self.kind == "causal":
                ok = k <= q
            else:
                ok = k // self.block_size <= q // self.block_size
        if use_band and self.band is not None:
            ok = ok & (pk <= pq + xp.asarray(self.band, xp.int32))
        return ok

    def dense(self, lq: int, lk: int) -> Array:
        """The (Lq, Lk) bool mask."""
        q = jax.lax.broadcasted_iota(jnp.int32, (lq, lk), 0)
        k = jax.lax.broadcasted_iota(jnp.int32, (lq, lk), 1)
        return self.allowed(q, k, lk)

    def tiles(self, lq: int, lk: int, tq: int, tk: int, key_start: int = 0) -> np.ndarray:
        """Static (⌈Lq/tq⌉, ⌈(Lk − key_start)/tk⌉) bool: which (query tile, key tile) pairs
        hold at least one allowed entry, with the band ignored (it only removes entries, so this
        is a superset). Key tiles cover positions key_start…Lk−1 (the two-pass clean half when
        key_start = L)."""
        return _tile_table(self.kind, self.block_size, lq, lk, tq, tk, key_start).copy()

    def with_causal(self) -> "MaskPattern":
        """This pattern ANDed with the causal mask (the AR model's attention). Causal is at
        least as strict as every kind but two-pass, whose clean half is not causal."""
        if self.kind == "two_pass":
            raise ValueError("a causal model cannot take the two-pass mask")
        return MaskPattern("causal")


@functools.lru_cache(maxsize=256)
def _tile_table(kind: str, block_size: int, lq: int, lk: int, tq: int, tk: int,
                key_start: int) -> np.ndarray:
    """`MaskPattern.tiles`, cached: every layer's forward and backward asks for the same table."""
    pattern = MaskPattern(kind, block_size)
    nq, nk = -(-lq // tq), -(-(lk - key_start) // tk)
    k = key_start + np.arange(nk * tk)[None, :]
    table = np.zeros((nq, nk), bool)
    for i in range(nq):  # one strip of query rows at a time: memory tq·Lk, not Lq·Lk
        q = np.arange(i * tq, min((i + 1) * tq, lq))[:, None]
        ok = np.asarray(pattern.allowed(q, k, lk, use_band=False, xp=np)) & (k < lk)
        table[i] = ok.reshape(len(q), nk, tk).any(axis=(0, 2))
    return table


FULL = MaskPattern("full")
CAUSAL = MaskPattern("causal")


def check_backend(name: str, platform: str | None = None) -> str:
    """`name` if it is a backend (and, given a `platform`, one it can run), else one ValueError
    naming the config key, the backend and the platform."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r}; choose from {BACKENDS}")
    need = BACKEND_PLATFORMS.get(name)
    if platform is not None and need is not None and platform != need:
        raise ValueError(f"model.attention={name!r} needs a {need.upper()} (this is {platform}); "
                         f"use 'xla', which runs everywhere")
    return name


def dense_attention(q: Array, k: Array, v: Array, mask: "MaskPattern | Array | None") -> Array:
    """The reference: masked softmax attention with the score matrix materialised (a two-pass
    pattern computes only its non-zero blocks, `layers.attend_two_pass`). mask: a pattern, a bool
    array (B|1, Lq, Lk) or None (full). Returns (B, Lq, H, Dh) in q's dtype."""
    from dlm_jax.models.layers import attend_dense, attend_two_pass
    if isinstance(mask, MaskPattern):
        if mask.kind == "two_pass":
            return attend_two_pass(q, k, v, mask.block_size, band=mask.band)
        if mask.kind == "full" and mask.band is None:
            return attend_dense(q, k, v, None)
        return attend_dense(q, k, v, mask.dense(q.shape[1], k.shape[1])[None])
    return attend_dense(q, k, v, mask)


def attend(q: Array, k: Array, v: Array, mask: "MaskPattern | Array | None", *,
           backend: str = "xla",
           shard_axes: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> Array:
    """Softmax attention (scale 1/sqrt(Dh), softmax in float32) under `mask` with `backend`.

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh); mask: a `MaskPattern`, None (full) or a bool array
    (B|1, Lq, Lk) (True = may attend), which always takes the dense path: only a pattern's
    structure lets a backend skip tiles. Returns (B, Lq, H, Dh) in q's dtype.
    shard_axes: (batch axes, head axes) of the mesh, for a backend that runs per shard
    (`splash`, in a shard_map); None: the default mesh rules'. The others let GSPMD split.
    """
    if mask is None:
        mask = FULL
    if backend == "dense" or not isinstance(mask, MaskPattern):
        return dense_attention(q, k, v, mask)
    if backend == "xla":
        from dlm_jax.models.flash import flash_attention
        return flash_attention(q, k, v, mask)
    if backend == "splash":
        from dlm_jax.models.kernels import splash_attention
        return splash_attention(q, k, v, mask, shard_axes=shard_axes)
    if backend == "cudnn":
        from dlm_jax.models.kernels import cudnn_attention
        return cudnn_attention(q, k, v, mask)
    raise ValueError(f"model.attention={backend!r}; choose from {BACKENDS}")


def model_mask(mask: "MaskPattern | Array | None", length: int, *,
               causal: bool) -> "MaskPattern | Array":
    """The attention mask a model runs from the one its caller passed: a pattern stays one, a bool
    array (L, L) or (B|1, L, L) becomes (B|1, L, L), None is full; a `causal` model ANDs in the
    causal mask."""
    if mask is None:
        mask = FULL
    if isinstance(mask, MaskPattern):
        return mask.with_causal() if causal else mask
    mask = jnp.asarray(mask, bool)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape[-2:] != (length, length):
        raise ValueError(f"attention mask of shape {mask.shape} for a sequence of length {length}")
    return mask & CAUSAL.dense(length, length)[None] if causal else mask
