"""Attention masks: boolean arrays `(…, Lq, Lk)`, True where query q may attend to key k.

Every mask is built from integer comparisons of index grids (`lax.broadcasted_iota`), so it has a
static shape, traces to a handful of XLA ops, and folds into a constant under `jax.jit`. Combine
masks with `combine` (logical and with broadcasting); turn one into an additive bias at the
attention layer.

Structural masks over a single stream (`causal_mask`, `bidirectional_mask`, `block_causal_mask`)
and over the BD3-LM two-stream input `[x_t ⊕ x_0]` (`bd3lm_two_pass_mask`) all include the
diagonal, so every query row has at least one True entry. `segment_mask` and `padding_mask` keep
that property for padding rows by letting a padding query attend to exactly one key: itself (see
`segment_mask`). Hence `combine` of any of these for self-attention never yields an all-False row,
and the softmax never sees one.

Block sizes: `block_size` must divide `L`; block b covers positions [b·Lb, (b+1)·Lb).
  * block_size = 1  → `block_causal_mask` is `causal_mask`;
  * block_size = L  → `block_causal_mask` is `bidirectional_mask`.
"""
from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
from jax import Array, lax


def _check_length(length: int, name: str = "L") -> int:
    if int(length) != length or length < 1:
        raise ValueError(f"{name} must be a positive integer, got {length!r}")
    return int(length)


def _check_blocks(length: int, block_size: int) -> tuple[int, int]:
    length = _check_length(length)
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    block_size = int(block_size)
    if length % block_size:
        raise ValueError(f"block_size={block_size} must divide the sequence length L={length}")
    return length, block_size


def _grid(lq: int, lk: int) -> tuple[Array, Array]:
    """(q, k) int32 index grids of shape (Lq, Lk)."""
    q = lax.broadcasted_iota(jnp.int32, (lq, lk), 0)
    k = lax.broadcasted_iota(jnp.int32, (lq, lk), 1)
    return q, k


def causal_mask(length: int) -> Array:
    """Causal mask: query i attends to keys j ≤ i.

    Returns: (L, L) bool.
    """
    length = _check_length(length)
    q, k = _grid(length, length)
    return q >= k


def bidirectional_mask(length: int) -> Array:
    """Full attention: every query attends to every key.

    Returns: (L, L) bool, all True.
    """
    length = _check_length(length)
    q, k = _grid(length, length)
    return q >= 0  # all True, built like the others so it stays an iota-derived constant


def block_causal_mask(length: int, block_size: int) -> Array:
    """Block-causal mask: query in block ⌊i/Lb⌋ attends to keys in blocks ≤ its own.

    Bidirectional inside a block, causal across blocks. Lb = 1 gives `causal_mask`, Lb = L gives
    `bidirectional_mask`. Raises ValueError if `block_size` does not divide `length`.

    Returns: (L, L) bool.
    """
    length, block_size = _check_blocks(length, block_size)
    q, k = _grid(length, length)
    return (q // block_size) >= (k // block_size)


def band_mask(length: int, band) -> Array:
    """Causal mask widened by `band` keys into the future: query i attends to keys j ≤ i + band.

    band 0 gives `causal_mask`, band ≥ L − 1 `bidirectional_mask`. `band` may be traced (an
    int32 scalar), so a mask that widens during training (attention-mask annealing from causal
    to bidirectional, Gong et al., 2025, "Scaling Diffusion Language Models via Adaptation from
    Autoregressive Models", ICLR) needs no recompile. AND it with `block_causal_mask` (or the
    two-pass layout) to anneal only inside blocks.

    Returns: (L, L) bool.
    """
    length = _check_length(length)
    q, k = _grid(length, length)
    return k <= q + jnp.asarray(band, jnp.int32)


def bd3lm_two_pass_mask(length: int, block_size: int) -> Array:
    """BD3-LM mask for the fused two-stream input `[x_t ⊕ x_0]` of length 2L.

    Positions [0, L) are the noisy stream x_t and [L, 2L) the clean stream x_0; block ids are
    counted inside each stream (block of position p is (p mod L) // Lb). Query → key rules:
      * x_t → x_t: same block only (block-diagonal, bidirectional inside the block);
      * x_t → x_0: strictly earlier blocks (never its own clean block: that would leak x_0);
      * x_0 → x_0: block-causal, own block included (the activations a KV cache would hold);
      * x_0 → x_t: never.
    So the outputs at x_t block b depend only on x_t block b and x_0 blocks < b. Raises
    ValueError if `block_size` does not divide `length`.

    Returns: (2L, 2L) bool.
    """
    length, block_size = _check_blocks(length, block_size)
    q, k = _grid(2 * length, 2 * length)
    clean_q, clean_k = q >= length, k >= length
    blk_q = jnp.where(clean_q, q - length, q) // block_size
    blk_k = jnp.where(clean_k, k - length, k) // block_size
    noisy_to_noisy = ~clean_q & ~clean_k & (blk_q == blk_k)
    noisy_to_clean = ~clean_q & clean_k & (blk_q > blk_k)
    clean_to_clean = clean_q & clean_k & (blk_q >= blk_k)
    return noisy_to_noisy | noisy_to_clean | clean_to_clean


def _self_key(lq: int, lk: int) -> Array:
    """(Lq, Lk) bool: query i's own key, index min(i, Lk − 1) (the diagonal when Lq ≤ Lk)."""
    q, k = _grid(lq, lk)
    return k == jnp.minimum(q, lk - 1)


def segment_mask(segment_ids_q: Array, segment_ids_k: Array | None = None) -> Array:
    """Packed-sequence mask: attend only within the same nonzero segment.

    Args:
      segment_ids_q: (B, Lq) integer segment ids of the queries; 0 marks padding.
      segment_ids_k: (B, Lk) integer segment ids of the keys; defaults to `segment_ids_q`
        (self-attention).

    A real query (id ≠ 0) attends to keys with the same id; padding keys (id 0) are never
    attended by real queries. A padding query attends to exactly one key, its own position
    (key index min(i, Lk − 1); in self-attention that is itself), so its softmax row is never
    all-False and its output is finite. Padding outputs are meaningless: mask them out of losses.
    For the two-pass input give each stream its ids, e.g. `concatenate([ids, ids], -1)`.

    Returns: (B, Lq, Lk) bool.
    """
    seg_q = jnp.asarray(segment_ids_q)
    seg_k = seg_q if segment_ids_k is None else jnp.asarray(segment_ids_k)
    if seg_q.ndim < 1 or seg_k.ndim < 1:
        raise ValueError(f"segment ids need a length axis, got shapes {seg_q.shape} and {seg_k.shape}")
    same = (seg_q[..., :, None] == seg_k[..., None, :]) & (seg_q[..., :, None] != 0)
    pad_q = (seg_q == 0)[..., :, None]
    return same | (pad_q & _self_key(seg_q.shape[-1], seg_k.shape[-1]))


def padding_mask(valid_k: Array, valid_q: Array | None = None) -> Array:
    """Mask out padding keys; padding queries attend only to themselves.

    Args:
      valid_k: (B, Lk) bool, True at real (non-padding) keys.
      valid_q: (B, Lq) bool, True at real queries; defaults to `valid_k` (self-attention).

    A real query attends to every real key (combine with a causal/block mask for structure); a
    padding query attends to exactly one key, its own position (key index min(i, Lk − 1)), so no
    row is all-False. This is `segment_mask` with one segment per row.

    Returns: (B, Lq, Lk) bool.
    """
    vk = jnp.asarray(valid_k, bool)
    vq = vk if valid_q is None else jnp.asarray(valid_q, bool)
    return segment_mask(vq.astype(jnp.int32), vk.astype(jnp.int32))


def combine(*masks: Array) -> Array:
    """Logical and of masks, broadcasting leading axes: e.g. (L, L) & (B, L, L) → (B, L, L).

    Returns: bool array of the broadcast shape (…, Lq, Lk).
    """
    if not masks:
        raise ValueError("combine needs at least one mask")
    return functools.reduce(operator.and_, [jnp.asarray(m, bool) for m in masks])
