"""Flash-style attention in plain JAX: the ``xla`` attention backend (`models.attention`).

Softmax attention over key/value tiles with an online softmax — a running row max m, normaliser
l and output accumulator per query tile (Dao et al., 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", Alg. 1) — so the (Lq, Lk) score matrix is
never materialised. The backward pass (a `jax.custom_vjp`) recomputes each tile's scores from q,
k and the saved log-sum-exp and forms dq, dk, dv tile by tile (Alg. 2, in the form of Dao, 2023,
"FlashAttention-2", Alg. 2: D = rowsum(dO ∘ O) instead of re-normalising). Memory is linear in L.

Tile skipping: the mask's structure (`MaskPattern.tiles`, band ignored) gives a static list of
(query tile, key tile) pairs holding at least one allowed entry; only those are computed, by one
`lax.scan` over the list (compile time independent of L). The exact mask, traced band included,
is applied inside each tile (computing it only in partially allowed tiles measured no faster on
CPU). Lengths that are not a multiple of the tile are padded inside; padded keys are always
masked, padded query rows are dropped.

The BD3-LM two-pass mask with blocks smaller than a key tile: a noisy query sees only its own
noisy block of the noisy half, so the tiles on that block diagonal would be mostly masked (8× the
needed scores for blocks of 16 in 128-tiles). Those scores are instead computed exactly, block by
block (L·Lb per head), and seed the online softmax (m, l, acc) that the tiles of the clean half
then continue: a log-sum-exp merge of the two parts, forward and backward (`FlashPlan`). On a
2-core CPU, blocks of 16, fwd+bwd at B 2, H 4, Dh 64: 1.2× faster at L 256 and 4096, 1.1× at
L 1024 than tiling the diagonal.

Shapes: q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), Lq ≤ Lk, queries at key positions 0…Lq−1;
internally heads-first (B, H, L, Dh) so every tile product is a plain batched matmul.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.models.attention import MaskPattern

Array = jax.Array

# Default tiles (`default_blocks`): 512 queries × 256 keys at every length, from fwd+bwd timings
# on a 2-core AMD EPYC (B 2, H 4, Dh 64, float32, interleaved). Against the 256 × 256 (up to 1024
# keys) / 256 × 512 tiles before: full attention 1.30× faster at L 1024 and 1.19× at 4096, causal
# 1.11× / 1.22×, block-causal 1.06× / 1.4×, two-pass 1.39× at L 256 and 1.05× at 1024; taller
# query tiles mean fewer scan steps and larger dots for XLA:CPU's per-head matmuls, and 256 keys
# keep each step's scores small. 1024 × 128 was faster still for full attention alone (L 1024
# 1.10×, 4096 1.07× over 512 × 256) but slower for causal (0.83× at L 1024).
BLOCK_Q, BLOCK_K = 512, 256
_NEG = -1e30  # masked score: finite, so a row whose first tiles are all masked stays nan-free


def default_blocks(lq: int, lk: int) -> tuple[int, int]:
    """(tq, tk): the tile sizes `flash_attention` uses when none are given, for lq queries and
    lk keys covered by tiles."""
    return min(lq, BLOCK_Q), min(lk, BLOCK_K)


def _blocks(lq, lk, block_q, block_k):
    tq, tk = default_blocks(lq, lk)
    return block_q or tq, block_k or tk


class FlashPlan(NamedTuple):
    """What `flash_attention` computes for one pattern and shape (all static).

    tq, tk: tile sizes; key_start: the first key the tiles cover (L for a two-pass pattern
    whose noisy block diagonal is computed densely, else 0); diagonal: that diagonal's block size
    (0: none); pairs: (P, 2) int32 (query tile, key tile) pairs, sorted by query tile, key tile j
    covering keys key_start + j·tk …. Scores per (batch, head): P·tq·tk + L·diagonal.
    """
    tq: int
    tk: int
    key_start: int
    diagonal: int
    pairs: np.ndarray

    @property
    def scores(self) -> int:
        """(query, key) scores computed per (batch, head), padding included."""
        return len(self.pairs) * self.tq * self.tk + self.key_start * self.diagonal


def flash_plan(pattern: MaskPattern, lq: int, lk: int, block_q: int | None = None,
               block_k: int | None = None) -> FlashPlan:
    """The `FlashPlan` for queries 0…lq−1 of lk keys, tiles `default_blocks` unless given.
    Static: the band is ignored (it only removes entries inside tiles)."""
    # a two-pass pattern's tiles cover its clean half (blocks smaller than a tile, below)
    covered = lk - pattern.stream_length(lk) if pattern.kind == "two_pass" else lk
    tq, tk = _blocks(lq, covered, block_q, block_k)
    key_start = diagonal = 0
    if pattern.kind == "two_pass" and pattern.block_size < tk:
        key_start, diagonal = pattern.stream_length(lk), pattern.block_size
        tk = min(tk, lk - key_start)
    pairs = np.argwhere(pattern.tiles(lq, lk, tq, tk, key_start)).astype(np.int32)
    return FlashPlan(tq, tk, key_start, diagonal, pairs)


def flash_schedule(pattern: MaskPattern, lq: int, lk: int, block_q: int | None = None,
                   block_k: int | None = None) -> np.ndarray:
    """(P, 2) int32 (query tile, key tile) pairs `flash_attention` computes (`flash_plan`)."""
    return flash_plan(pattern, lq, lk, block_q, block_k).pairs


class _Static(NamedTuple):
    """The hashable (trace-time) part of a call: pattern structure, lengths, tiles."""
    kind: str
    block_size: int
    has_band: bool
    lq: int
    lk: int
    tq: int
    tk: int
    key_start: int  # keys before it are the densely computed two-pass diagonal's
    diagonal: int


def flash_attention(q: Array, k: Array, v: Array, pattern: MaskPattern, *,
                    block_q: int | None = None, block_k: int | None = None) -> Array:
    """Softmax attention (scale 1/sqrt(Dh)) under `pattern`, equal to `dense_attention`.

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh) with Lq ≤ Lk; block_q/block_k: tile sizes (default
    `default_blocks`). Softmax and accumulation in float32 (float64 for float64 inputs).
    Returns (B, Lq, H, Dh) in q's dtype.
    """
    lq, lk = q.shape[1], k.shape[1]
    if lq > lk:
        raise ValueError(f"flash_attention needs Lq ≤ Lk; got q {q.shape}, k {k.shape}")
    pattern.stream_length(lk)  # validates the two-pass layout
    plan = flash_plan(pattern, lq, lk, block_q, block_k)
    has_band = pattern.band is not None
    band = jnp.asarray(pattern.band if has_band else 0, jnp.int32)
    st = _Static(pattern.kind, pattern.block_size, has_band, lq, lk, plan.tq, plan.tk,
                 plan.key_start, plan.diagonal)
    return _flash(st, q, k, v, band)


def _heads_first(x: Array, length: int) -> Array:
    """(B, L, H, Dh) -> (B, H, length, Dh), zero-padded from L to `length`."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _tile_scores(st, band, qh, kh, i, j, cdt):
    """Scaled scores (B, H, tq, tk) of query tile i against key tile j (of the keys from
    st.key_start), the disallowed entries (traced band and padded keys included) set to a large
    negative score."""
    qt = jax.lax.dynamic_slice_in_dim(qh, i * st.tq, st.tq, axis=2)
    kt = jax.lax.dynamic_slice_in_dim(kh, j * st.tk, st.tk, axis=2)
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt.astype(qt.dtype), preferred_element_type=cdt)
    s = s * (1.0 / math.sqrt(qh.shape[-1]))
    padded = (st.lk - st.key_start) % st.tk != 0
    if st.kind == "full" and not st.has_band and not padded:
        return qt, s
    pattern = MaskPattern(st.kind, st.block_size, band if st.has_band else None)
    qi = i * st.tq + jnp.arange(st.tq, dtype=jnp.int32)[:, None]
    kj = st.key_start + j * st.tk + jnp.arange(st.tk, dtype=jnp.int32)[None, :]
    ok = pattern.allowed(qi, kj, st.lk)
    ok = ok & (kj < st.lk) if padded else ok  # padded keys never get probability
    return qt, jnp.where(ok, s, jnp.asarray(_NEG, cdt))


def _scan_schedule(st: _Static, step, init):
    """Runs carry = step(carry, pair) over the scheduled (query tile, key tile) pairs."""
    pairs = np.argwhere(MaskPattern(st.kind, st.block_size).tiles(
        st.lq, st.lk, st.tq, st.tk, st.key_start)).astype(np.int32)
    return jax.lax.scan(lambda c, p: (step(c, p), None), init, jnp.asarray(pairs))[0]


def _diagonal_scores(st: _Static, band, qh, kh_noisy, cdt):
    """Scaled scores (B, H, nb, Lb, Lb) of each noisy query block against its own noisy key
    block (the two-pass diagonal), the traced band applied inside the block."""
    lb = st.diagonal
    B, H, L, Dh = kh_noisy.shape

    def blocks(x):
        return x.reshape(B, H, L // lb, lb, Dh)
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", blocks(qh[:, :, :L]), blocks(kh_noisy).astype(qh.dtype),
                   preferred_element_type=cdt) * (1.0 / math.sqrt(Dh))
    if st.has_band:
        ok = jnp.arange(lb)[None, :] <= jnp.arange(lb)[:, None] + band
        s = jnp.where(ok, s, jnp.asarray(_NEG, cdt))
    return s


def _blocked(x, lb):
    """(B, H, L, …) -> (B, H, L/lb, lb, …)."""
    return x.reshape(*x.shape[:2], x.shape[2] // lb, lb, *x.shape[3:])


def _unblocked(x, rows):
    """(B, H, nb, lb, …) -> (B, H, rows, …): merged back and zero-padded to `rows`."""
    x = x.reshape(*x.shape[:2], -1, *x.shape[4:])
    return jnp.pad(x, [(0, 0), (0, 0), (0, rows - x.shape[2])] + [(0, 0)] * (x.ndim - 3))


def _forward(st: _Static, q, k, v, band):
    """-> o (B, Lq, H, Dh) in q's dtype and residuals (padded heads-first q, the keys and values
    from st.key_start, o, the log-sum-exp (B, H, Lqp), and the noisy keys and values of the
    two-pass diagonal, or None)."""
    cdt = jnp.promote_types(q.dtype, jnp.float32)
    lqp = -(-st.lq // st.tq) * st.tq
    lkp = -(-(st.lk - st.key_start) // st.tk) * st.tk
    qh = _heads_first(q, lqp)
    kh, vh = (_heads_first(x[:, st.key_start:], lkp) for x in (k, v))

    def step(carry, pair):
        m, l, acc = carry  # (B, H, Lqp), (B, H, Lqp), (B, H, Lqp, Dh), updated in place
        i, j = pair[0], pair[1]
        _, s = _tile_scores(st, band, qh, kh, i, j, cdt)
        vt = jax.lax.dynamic_slice_in_dim(vh, j * st.tk, st.tk, axis=2)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * st.tq,
                               slice_size=st.tq, axis=2)
        m_old, l_old, acc_old = sl(m), sl(l), sl(acc)
        m_new = jnp.maximum(m_old, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m_old - m_new)  # rescales what was accumulated under the old max
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vt.dtype), vt, preferred_element_type=cdt)
        put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i * st.tq,
                                axis=2)
        return (put(m, m_new), put(l, alpha * l_old + p.sum(-1)),
                put(acc, alpha[..., None] * acc_old + pv))

    noisy = None
    if st.diagonal:  # the online softmax starts from the noisy queries' own-block scores
        noisy = tuple(_heads_first(x[:, :st.key_start], st.key_start) for x in (k, v))
        s = _diagonal_scores(st, band, qh, noisy[0], cdt)
        m0 = s.max(-1)
        p = jnp.exp(s - m0[..., None])
        pv = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(v.dtype), _blocked(noisy[1], st.diagonal),
                        preferred_element_type=cdt)
        init = (_unblocked(m0, lqp).at[:, :, st.key_start:].set(_NEG),
                _unblocked(p.sum(-1), lqp), _unblocked(pv, lqp))
    else:  # *_like: the carries take q's sharding (explicit-sharding meshes need it to match)
        init = (jnp.full_like(qh[..., 0], _NEG, cdt), jnp.zeros_like(qh[..., 0], cdt),
                jnp.zeros_like(qh, cdt))
    m, l, acc = _scan_schedule(st, step, init)
    l = jnp.where(l > 0, l, 1.0)  # only padded rows can be untouched
    oh = (acc / l[..., None]).astype(q.dtype)
    o = jnp.swapaxes(oh[:, :, :st.lq], 1, 2)
    return o, (qh, kh, vh, oh, m + jnp.log(l), noisy)


def _backward(st: _Static, res, do):
    """Cotangents of q, k, v (and None for the band) from do (B, Lq, H, Dh)."""
    qh, kh, vh, oh, lse, noisy, band = res
    cdt = lse.dtype
    do_h = _heads_first(do, qh.shape[2]).astype(oh.dtype)  # padded rows: zero cotangent
    d = jnp.sum(do_h.astype(cdt) * oh.astype(cdt), -1)  # D = rowsum(dO ∘ O), (B, H, Lqp)

    def step(carry, pair):
        dq, dk, dv = carry  # heads-first, padded, in cdt; updated in place
        i, j = pair[0], pair[1]
        qt, s = _tile_scores(st, band, qh, kh, i, j, cdt)
        slq = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * st.tq,
                                slice_size=st.tq, axis=2)
        slk = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=j * st.tk,
                                slice_size=st.tk, axis=2)
        kt, vt, dot = slk(kh), slk(vh), slq(do_h)
        p = jnp.exp(s - slq(lse)[..., None])  # the forward's probabilities; masked -> 0
        dp = jnp.einsum("bhqd,bhkd->bhqk", dot, vt.astype(dot.dtype), preferred_element_type=cdt)
        ds = p * (dp - slq(d)[..., None])
        dv_t = jnp.einsum("bhqk,bhqd->bhkd", p.astype(dot.dtype), dot, preferred_element_type=cdt)
        dq_t = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(kt.dtype), kt, preferred_element_type=cdt)
        dk_t = jnp.einsum("bhqk,bhqd->bhkd", ds.astype(qt.dtype), qt, preferred_element_type=cdt)
        putq = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i * st.tq,
                                 axis=2)
        putk = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=j * st.tk,
                                 axis=2)
        return (putq(dq, slq(dq) + dq_t), putk(dk, slk(dk) + dk_t),
                putk(dv, slk(dv) + dv_t))

    dq0 = jnp.zeros_like(qh, cdt)
    if st.diagonal:  # the same three products on the noisy block diagonal, densely
        lb, L = st.diagonal, st.key_start
        kn, vn = (_blocked(x, lb) for x in noisy)
        qn, don = _blocked(qh[:, :, :L], lb), _blocked(do_h[:, :, :L], lb)
        s = _diagonal_scores(st, band, qh, noisy[0], cdt)
        p = jnp.exp(s - _blocked(lse[:, :, :L], lb)[..., None])
        dp = jnp.einsum("bhnqd,bhnkd->bhnqk", don, vn.astype(don.dtype),
                        preferred_element_type=cdt)
        ds = p * (dp - _blocked(d[:, :, :L], lb)[..., None])
        dv_n = jnp.einsum("bhnqk,bhnqd->bhnkd", p.astype(don.dtype), don,
                          preferred_element_type=cdt)
        dq0 = _unblocked(jnp.einsum("bhnqk,bhnkd->bhnqd", ds.astype(kn.dtype), kn,
                                    preferred_element_type=cdt), qh.shape[2])
        dk_n = jnp.einsum("bhnqk,bhnqd->bhnkd", ds.astype(qn.dtype), qn,
                          preferred_element_type=cdt)
    init = (dq0, jnp.zeros_like(kh, cdt), jnp.zeros_like(vh, cdt))
    dq, dk, dv = _scan_schedule(st, step, init)
    if st.diagonal:  # keys and values: the noisy half, then the clean half the tiles cover
        dk = jnp.concatenate([_unblocked(dk_n, L), dk], axis=2)
        dv = jnp.concatenate([_unblocked(dv_n, L), dv], axis=2)
    scale = 1.0 / math.sqrt(qh.shape[-1])

    def out(x, n, like):
        return jnp.swapaxes(x[:, :, :n], 1, 2).astype(like.dtype)
    return (out(dq * scale, st.lq, qh), out(dk * scale, st.lk, kh), out(dv, st.lk, vh), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, band):
    return _forward(st, q, k, v, band)[0]


def _flash_fwd(st, q, k, v, band):
    o, res = _forward(st, q, k, v, band)
    return o, res + (band,)


_flash.defvjp(_flash_fwd, _backward)
