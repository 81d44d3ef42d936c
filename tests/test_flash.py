"""Flash-style attention (`models.flash`, the ``xla`` backend) against independent references.

The references: a float64 softmax over the whole score matrix with the mask built by
`dlm_jax.masks` (not by `MaskPattern.allowed`, which the flash code uses), and `dense_attention`.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dlm_jax import masks
from dlm_jax.models import flash
from dlm_jax.models.attention import MaskPattern, dense_attention
from dlm_jax.models.flash import default_blocks, flash_attention, flash_plan, flash_schedule
from dlm_jax.models.transformer import DiT


def _mask(kind, block, band, lq, lk):
    """(Lq, Lk) bool from `dlm_jax.masks`: the definition the pattern must reproduce."""
    L = lk // 2 if kind == "two_pass" else lk
    m = {"full": lambda: masks.bidirectional_mask(L),
         "causal": lambda: masks.causal_mask(L),
         "block_causal": lambda: masks.block_causal_mask(L, block),
         "two_pass": lambda: masks.bd3lm_two_pass_mask(L, block)}[kind]()
    if band is not None:
        b = masks.band_mask(L, band)
        m = m & (jnp.tile(b, (2, 2)) if kind == "two_pass" else b)
    return m[:lq]


def _reference(q, k, v, mask):
    """Softmax attention with the (Lq, Lk) scores materialised, in q's precision."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, b, lq, lk, h, dh, dtype):
    """q, k, v and an output cotangent, standard normal (numpy: no eager XLA programs)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, n, h, dh)), dtype)
                 for n in (lq, lk, lk, lq))


# The programs are tiny; most of this file's time is XLA:CPU compiling them. Its cheaper
# backend passes halve that and change no numerics (no fast-math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(f, *args):
    """f(*args), jitted with `FAST_COMPILE`."""
    return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _value_and_grads(att, q, k, v, ct):
    """(out, (dq, dk, dv)) of sum(att(q, k, v) · ct)."""
    out, vjp = jax.vjp(att, q, k, v)
    return out, vjp(ct)


# (kind, block_size, band, Lq, Lk, tq, tk): lengths not divisible by the tiles, tiles smaller
# than / not aligned with the blocks, a band, and the two-pass last layer (Lq = L of 2L).
CASES = [
    ("full", 0, None, 37, 37, 16, 8),
    ("full", 0, 5, 20, 20, 8, 8),
    ("block_causal", 4, None, 40, 40, 16, 12),
    ("block_causal", 8, 2, 40, 40, 3, 5),
    ("two_pass", 4, None, 24, 48, 16, 12),  # blocks < key tile: dense noisy diagonal
    ("two_pass", 4, 1, 48, 48, 5, 7),
    ("two_pass", 8, 2, 64, 64, 16, 8),      # blocks ≥ key tile: tiles over both halves
    ("two_pass", 6, None, 30, 60, 16, 32),  # key tile (32) beyond the clean half (30)
    ("causal", 0, None, 300, 300, None, None),  # default tiles, 300 = 2·128 + 44
]


@pytest.mark.parametrize("kind,block,band,lq,lk,tq,tk", CASES)
def test_matches_reference_float64(kind, block, band, lq, lk, tq, tk):
    with jax.enable_x64(True):
        q, k, v, ct = _inputs(lq + lk, 2, lq, lk, 2, 8, jnp.float64)

        def both(q, k, v, ct, band):  # band traced
            pattern = MaskPattern(kind, block, band)
            fl = _value_and_grads(lambda *a: flash_attention(*a, pattern, block_q=tq,
                                                             block_k=tk), q, k, v, ct)
            ref = _value_and_grads(lambda *a: _reference(*a, _mask(kind, block, band, lq, lk)),
                                   q, k, v, ct)
            dense = _value_and_grads(lambda *a: dense_attention(*a, pattern), q, k, v, ct)
            return fl, ref, dense

        fl, ref, dense = _run(both, q, k, v, ct, None if band is None else jnp.int32(band))
        assert fl[0].dtype == jnp.float64 and fl[0].shape == q.shape
        for got, want in zip(jax.tree.leaves(fl), jax.tree.leaves(ref)):
            np.testing.assert_allclose(got, want, atol=1e-11, rtol=1e-10)
        for got, want in zip(jax.tree.leaves(fl), jax.tree.leaves(dense)):
            np.testing.assert_allclose(got, want, atol=1e-11, rtol=1e-10)


def _tiles_of(mask, tq, tk):
    """Independent tile occupancy of a (Lq, Lk) mask whose lengths the tiles divide."""
    m = np.asarray(mask)
    return m.reshape(m.shape[0] // tq, tq, m.shape[1] // tk, tk).any(axis=(1, 3))


def test_schedule_skips_masked_tiles():
    n, t = 8, 16
    L = n * t
    causal = flash_schedule(MaskPattern("causal"), L, L, t, t)
    assert len(causal) == n * (n + 1) // 2 and np.all(causal[:, 1] <= causal[:, 0])
    assert len(flash_schedule(MaskPattern("full"), L, L, t, 2 * t)) == n * n // 2
    # Two-pass with tiles = blocks: a noisy query tile i sees noisy tile i and clean tiles < i,
    # a clean one clean tiles ≤ i: n(n+1) pairs for all 2L rows, n(n+1)/2 for the noisy ones.
    two = MaskPattern("two_pass", t)
    assert len(flash_schedule(two, 2 * L, 2 * L, t, t)) == n * (n + 1)
    assert len(flash_schedule(two, L, 2 * L, t, t)) == n * (n + 1) // 2
    # Tiles not aligned with the blocks: exactly the tiles holding an allowed entry. Two-pass
    # blocks smaller than a key tile: the noisy diagonal is dense, the tiles cover the clean half.
    for kind, block in [("block_causal", 12), ("two_pass", 12), ("two_pass", 48)]:
        lk = 2 * 96 if kind == "two_pass" else 96
        plan = flash_plan(MaskPattern(kind, block), lk, lk, 16, 32)
        mask = _mask(kind, block, None, lk, lk)
        if block < 32 and kind == "two_pass":
            assert (plan.key_start, plan.diagonal) == (96, block)
            mask = mask[:, 96:]
        else:
            assert (plan.key_start, plan.diagonal) == (0, 0)
        np.testing.assert_array_equal(plan.pairs, np.argwhere(_tiles_of(mask, 16, 32)))
        assert plan.scores == len(plan.pairs) * 16 * 32 + plan.key_start * plan.diagonal
    # The band is traced: it never removes tiles from the static schedule.
    banded = flash_schedule(MaskPattern("block_causal", 16, jnp.int32(0)), L, L, t, t)
    np.testing.assert_array_equal(banded, flash_schedule(MaskPattern("block_causal", 16), L, L,
                                                         t, t))
    assert default_blocks(L, 2 * L) == (min(L, flash.BLOCK_Q), min(2 * L, flash.BLOCK_K))
    assert default_blocks(4096, 4096) == (flash.BLOCK_Q, flash.BLOCK_K) == (512, 256)
    assert default_blocks(100, 4096) == (100, 256)


def _scan_lengths(jaxpr):
    """The lengths of every scan in a jaxpr, nested ones included."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            out.append(e.params["length"])
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _scan_lengths(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _scan_lengths(sub)
    return out


def test_loop_runs_over_the_schedule_only():
    """The forward and backward scans have one step per scheduled pair, not per tile pair."""
    L, t = 128, 16
    pattern = MaskPattern("causal")
    x = jnp.zeros((1, L, 1, 8))
    f = jax.grad(lambda q: flash_attention(q, x, x, pattern, block_q=t, block_k=t).sum())
    lengths = _scan_lengths(jax.make_jaxpr(f)(x).jaxpr)
    P = len(flash_schedule(pattern, L, L, t, t))
    assert P == 36 and lengths == [P, P], lengths  # forward, backward


def _temp_bytes(att, L):
    x = jax.ShapeDtypeStruct((1, L, 2, 16), jnp.float32)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v) ** 2), (0, 1, 2)))
    return g.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_memory_linear_in_length():
    pattern = MaskPattern("causal")
    fl = [_temp_bytes(lambda *a: flash_attention(*a, pattern), L) for L in (1024, 2048)]
    dn = [_temp_bytes(lambda *a: dense_attention(*a, pattern), L) for L in (1024, 2048)]
    assert fl[1] / fl[0] < 2.5, fl
    assert dn[1] / dn[0] > 3.5, dn
    assert fl[1] * 8 < dn[1], (fl, dn)


@pytest.mark.parametrize("kind,block,lq,lk", [("causal", 0, 64, 64), ("two_pass", 8, 32, 64)])
def test_bfloat16_close_to_float32(kind, block, lq, lk):
    q, k, v, ct = _inputs(1, 2, lq, lk, 2, 16, jnp.bfloat16)
    pattern = MaskPattern(kind, block)

    def both(q, k, v, ct):
        lo = _value_and_grads(lambda *a: flash_attention(*a, pattern, block_q=16, block_k=16),
                              q, k, v, ct)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
        hi = _value_and_grads(lambda *a: _reference(*a, _mask(kind, block, None, lq, lk)), *f32)
        return lo, hi

    lo, hi = _run(both, q, k, v, ct)
    assert lo[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in lo[1])
    for got, want in zip(jax.tree.leaves(lo), jax.tree.leaves(hi)):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        err = np.max(np.abs(got - want))
        assert err < 0.05 * np.max(np.abs(want)), err


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_matches_unsharded(axis_type):
    """Batch and heads sharded over a (data, tensor) mesh: GSPMD partitions the loops."""
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(axis_type,) * 2)
    pattern = MaskPattern("block_causal", 8)
    q, k, v, ct = _inputs(2, 2, 40, 40, 2, 8, jnp.float32)

    def f(q, k, v, ct):
        fl = _value_and_grads(lambda *a: flash_attention(*a, pattern, block_q=16, block_k=16),
                              q, k, v, ct)
        ref = _value_and_grads(lambda *a: _reference(*a, _mask("block_causal", 8, None, 40, 40)),
                               q, k, v, ct)
        return fl, ref
    spec = NamedSharding(mesh, P("data", None, "tensor", None))
    sharded, ref = _run(f, *[jax.device_put(x, spec) for x in (q, k, v, ct)])
    assert sharded[0].sharding.is_equivalent_to(spec, 4), sharded[0].sharding
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", ["full", "causal", "two_pass"])
def test_model_matches_dense_backend(variant, monkeypatch):
    """A whole DiT with the xla backend equals the same parameters with the dense one, logits
    and parameter gradients; tiles of 8 so the model's lengths span several tiles."""
    monkeypatch.setattr(flash, "BLOCK_Q", 8)
    monkeypatch.setattr(flash, "BLOCK_K", 8)
    vocab, L, B = 13, 24, 2
    kw = dict(width=32, depth=2, heads=2, cond_dim=16, dropout=0.0,
              causal=variant == "causal")
    # Built abstractly (no eager initialisers to compile); one shared parameter state.
    graph_x, state = nnx.split(nnx.eval_shape(lambda: DiT(vocab, attention="xla",
                                                          rngs=nnx.Rngs(0), **kw)))
    graph_d, _ = nnx.split(nnx.eval_shape(lambda: DiT(vocab, attention="dense",
                                                      rngs=nnx.Rngs(0), **kw)))
    rng = np.random.default_rng(3)
    # Random parameters (the zero-initialised adaLN gates would switch attention off).
    state = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                         state)
    xt, x0 = (jnp.asarray(rng.integers(0, vocab, (B, L)), jnp.int32) for _ in range(2))
    sigma = jnp.asarray(rng.uniform(size=(B,)), jnp.float32)

    def loss(graph, state):
        model = nnx.merge(graph, state)
        if variant == "two_pass":
            logits = model.two_pass(xt, x0, sigma, 4)
        else:
            logits = model(xt, None if variant == "causal" else sigma)
        return jnp.sum(jnp.sin(logits)), logits

    def both(state):
        return [jax.value_and_grad(lambda s: loss(g, s), has_aux=True)(state)
                for g in (graph_x, graph_d)]

    ((_, lx), gx), ((_, ld), gd) = _run(both, state)
    assert lx.shape == (B, L, vocab)
    np.testing.assert_allclose(lx, ld, atol=1e-5, rtol=1e-5)
    leaves_x, leaves_d = jax.tree.leaves(gx), jax.tree.leaves(gd)
    assert len(leaves_x) == len(leaves_d) > 0
    for a, b in zip(leaves_x, leaves_d):  # float32 rounding, relative to each gradient's scale
        np.testing.assert_allclose(a, b, atol=1e-4 * np.max(np.abs(b)), rtol=1e-4)
