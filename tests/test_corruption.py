"""Training-time sampling and forward corruption, including BD3-LM's resample rule."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.processes import corruption
from dlm_jax.processes.schedules import Clipped, Geometric, LogLinear
from dlm_jax.processes.transitions import Absorbing, Uniform


def _within(freq, prob, n, sigmas=5.0, floor=2e-3):
    """|empirical − expected| within `sigmas` binomial standard errors (plus a small floor)."""
    freq, prob = np.asarray(freq, np.float64), np.asarray(prob, np.float64)
    tol = sigmas * np.sqrt(prob * (1 - prob) / n) + floor
    bad = np.abs(freq - prob) > tol
    assert not bad.any(), f"freq {freq[bad]} vs prob {prob[bad]} (tol {tol[bad]})"


# --- times -------------------------------------------------------------------------------------
@pytest.mark.parametrize("permute", [True, False])
def test_stratified_one_per_stratum(permute):
    t_min, t_max, shape = 0.2, 0.9, (4, 8)
    n = math.prod(shape)
    for seed in range(5):
        t = corruption.sample_times(jax.random.key(seed), shape, t_min=t_min, t_max=t_max,
                                    permute=permute)
        chex.assert_shape(t, shape)
        assert t.dtype == jnp.float32
        t = np.asarray(t, np.float64)
        assert (t >= t_min - 1e-6).all() and (t <= t_max + 1e-6).all()
        u = (t - t_min) / (t_max - t_min)
        strata = np.clip(np.floor(u * n + 1e-4), 0, n - 1).astype(int).reshape(-1)
        chex.assert_trees_all_equal(np.sort(strata), np.arange(n))
        # one shared offset: all u mod 1/n are equal
        offs = u.reshape(-1) * n - strata
        assert np.ptp(offs) < 1e-3
        if not permute:  # reference ordering: element i in stratum i
            chex.assert_trees_all_equal(strata, np.arange(n))


def test_permuted_times_are_marginally_uniform():
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k: corruption.sample_times(k, (2, 4), t_min=0.0, t_max=1.0))
    t = np.asarray(draw(keys))  # (4000, 2, 4)
    # every element's mean is 1/2 and its first stratum is hit ~1/8 of the time
    assert np.abs(t.mean(0) - 0.5).max() < 0.03
    _within((t < 1 / 8).mean(0), np.full((2, 4), 1 / 8), 4000)
    unpermuted = jax.vmap(lambda k: corruption.sample_times(
        k, (2, 4), t_min=0.0, t_max=1.0, permute=False))(keys)
    assert float(unpermuted[:, 0, 0].max()) < 1 / 8 + 1e-6


def test_times_special_cases():
    ones = corruption.sample_times(jax.random.key(0), (3, 2), t_min=1.0, t_max=1.0)
    chex.assert_trees_all_equal(ones, jnp.ones((3, 2)))
    iid = corruption.sample_times(jax.random.key(1), (1000,), t_min=0.3, t_max=0.5,
                                  antithetic=False)
    assert float(iid.min()) >= 0.3 and float(iid.max()) <= 0.5
    with pytest.raises(ValueError, match="t_min"):
        corruption.sample_times(jax.random.key(0), (2,), t_min=0.6, t_max=0.5)
    # traced bounds work under jit
    f = jax.jit(lambda k, lo, hi: corruption.sample_times(k, (6,), t_min=lo, t_max=hi))
    t = f(jax.random.key(2), 0.25, 0.5)
    assert float(t.min()) >= 0.25 and float(t.max()) <= 0.5
    chex.assert_trees_all_equal(f(jax.random.key(2), 1.0, 1.0), jnp.ones(6))


def test_block_times_and_sample_block_times():
    tb = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    t = corruption.block_times(tb, 2)
    chex.assert_trees_all_equal(t, jnp.array([[0.1, 0.1, 0.2, 0.2, 0.3, 0.3],
                                              [0.4, 0.4, 0.5, 0.5, 0.6, 0.6]]))
    sched = Clipped(LogLinear(0.0), 0.3, 0.8)
    tb = corruption.sample_block_times(jax.random.key(0), 4, 16, 4, sched)
    chex.assert_shape(tb, (4, 4))
    assert float(tb.min()) >= 0.3 and float(tb.max()) <= 0.8
    tb = corruption.sample_block_times(jax.random.key(0), 4, 16, 16, LogLinear())
    chex.assert_shape(tb, (4, 1))
    assert float(tb.min()) >= 1e-3
    with pytest.raises(ValueError, match=r"block_size=3.*L=16"):
        corruption.sample_block_times(jax.random.key(0), 4, 16, 3, sched)


# --- plain corruption ----------------------------------------------------------------------------
def test_corrupt_absorbing_frequencies():
    proc, sched = Absorbing(5), LogLinear(1e-3)
    n, t_row = 20000, jnp.array([0.05, 0.3, 0.6, 0.95])
    x0 = jnp.tile(jnp.array([[0, 1, 2, 4]]), (n, 1))
    t = jnp.tile(t_row[None], (n, 1))
    xt = np.asarray(corruption.corrupt(jax.random.key(0), x0, t, proc, sched))
    assert xt.dtype == np.asarray(x0).dtype
    expected = np.asarray(proc.transition(x0[0], sched.sigma_bar(t_row)))  # (4, V+1)
    freq = np.stack([(xt == s).mean(0) for s in range(proc.num_states)], -1)
    _within(freq, expected, n)


def test_corrupt_uniform_frequencies():
    proc, sched = Uniform(4), Geometric(1e-2, 5.0)
    n, t_row = 20000, jnp.array([0.1, 0.5, 0.8])
    x0 = jnp.tile(jnp.array([[3, 0, 2]]), (n, 1))
    xt = np.asarray(corruption.corrupt(jax.random.key(1), x0, t_row[None], proc, sched))
    expected = np.asarray(proc.transition(x0[0], sched.sigma_bar(t_row)))
    freq = np.stack([(xt == s).mean(0) for s in range(proc.num_states)], -1)
    _within(freq, expected, n)


# Shared shapes keep the number of jit compilations (and the test time) down.
SHAPE, LB = (1024, 32), 8
K = SHAPE[1] // LB


def test_corrupt_keep_first():
    proc, sched = Absorbing(7), LogLinear(0.0)
    x0 = jax.random.randint(jax.random.key(0), SHAPE, 0, 7)
    xt = corruption.corrupt(jax.random.key(1), x0, jnp.ones(SHAPE), proc, sched,
                            keep_first=True)
    chex.assert_trees_all_equal(xt[:, 0], x0[:, 0])
    assert (xt[:, 1:] == proc.mask_id).all()
    xt = corruption.corrupt_blocks(jax.random.key(1), x0, jnp.ones((SHAPE[0], K)), LB, proc,
                                   Clipped(LogLinear(0.0), 0.5, 1.0), resample=True,
                                   keep_first=True)
    chex.assert_trees_all_equal(xt[:, 0], x0[:, 0])
    assert (xt[:, 1:] == proc.mask_id).all()


def test_corrupt_blocks_uses_block_times():
    proc, sched = Absorbing(3), LogLinear(0.0)
    n = 8000
    x0 = jnp.zeros((n, 6), jnp.int32)
    tb = jnp.tile(jnp.array([[0.1, 0.5, 0.9]]), (n, 1))
    xt = np.asarray(corruption.corrupt_blocks(jax.random.key(0), x0, tb, 2, proc, sched))
    _within((xt == proc.mask_id).mean(0), np.repeat([0.1, 0.5, 0.9], 2), n)
    with pytest.raises(ValueError, match="K=3"):
        corruption.corrupt_blocks(jax.random.key(0), x0, tb[:, :2], 2, proc, sched)


# --- resample --------------------------------------------------------------------------------------
def _masked_fraction(xt, block_size, mask_id):
    m = np.asarray(xt) == mask_id
    return m.reshape(m.shape[0], -1, block_size).mean(-1)


def test_resample_count_range():
    assert corruption.resample_count_range(10, (0.3, 0.8)) == (3, 8)
    assert corruption.resample_count_range(8, (0.25, 0.6)) == (2, 4)
    assert corruption.resample_count_range(8, (1e-3, 0.6)) == (0, 4)  # lower not enforced
    assert corruption.resample_count_range(8, (2e-3, 0.6)) == (1, 4)
    assert corruption.resample_count_range(8, (0.3, 1.0)) == (3, 8)
    assert corruption.resample_count_range(8, (1e-3, 1.0)) == (0, 8)
    with pytest.raises(ValueError, match="block_size=4"):
        corruption.resample_count_range(4, (0.3, 0.45))
    # float32-rounded bounds behave like their decimals
    f32 = lambda *b: tuple(float(np.float32(x)) for x in b)  # noqa: E731
    assert corruption.resample_count_range(10, f32(0.3, 0.7)) == (3, 7)
    assert corruption.resample_count_range(8, f32(1e-3, 0.6)) == (0, 4)


@pytest.mark.parametrize("bounds", [(0.3, 0.8), (0.45, 0.95)])
def test_resample_fractions_within_bounds(bounds):
    proc, lb = Absorbing(11), 10
    sched = Clipped(LogLinear(0.0), *bounds)
    x0 = jax.random.randint(jax.random.key(0), (256, 40), 0, 11)
    tb = corruption.sample_block_times(jax.random.key(1), 256, 40, lb, sched)
    xt = corruption.corrupt_blocks(jax.random.key(2), x0, tb, lb, proc, sched, resample=True)
    f = _masked_fraction(xt, lb, proc.mask_id)
    assert f.min() >= bounds[0] - 1e-9 and f.max() <= bounds[1] + 1e-9
    # unmasked tokens keep their clean value
    keep = np.asarray(xt) != proc.mask_id
    chex.assert_trees_all_equal(np.asarray(xt)[keep], np.asarray(x0)[keep])
    # without resample the same times do leave the bounds
    plain = corruption.corrupt_blocks(jax.random.key(2), x0, tb, lb, proc, sched)
    f = _masked_fraction(plain, lb, proc.mask_id)
    assert f.min() < bounds[0] or f.max() > bounds[1]


def test_resample_exceptions():
    proc, lb = Absorbing(5), LB
    x0 = jnp.zeros(SHAPE, jnp.int32)
    run = functools.partial(corruption.corrupt_blocks, jax.random.key(3), x0,
                            block_size=lb, process=proc, schedule=LogLinear(0.0), resample=True)
    low = jnp.full((SHAPE[0], K), 0.02)
    # beta_l == 1e-3: only the upper bound, so empty blocks survive
    f = _masked_fraction(run(t_blocks=low, bounds=(1e-3, 0.5)), lb, proc.mask_id)
    assert (f == 0).any() and f.max() <= 0.5
    # a lower bound just above 1e-3 is enforced: at least one masked token
    f = _masked_fraction(run(t_blocks=low, bounds=(2e-3, 0.5)), lb, proc.mask_id)
    assert f.min() >= 1 / lb
    high = jnp.full((SHAPE[0], K), 0.97)
    # beta_u == 1: only the lower bound, fully masked blocks survive
    f = _masked_fraction(run(t_blocks=high, bounds=(0.5, 1.0)), lb, proc.mask_id)
    assert (f == 1).any() and f.min() >= 0.5
    f = _masked_fraction(run(t_blocks=high, bounds=(0.5, 0.99)), lb, proc.mask_id)
    assert f.max() <= 7 / 8
    # (1e-3, 1): nothing resampled, identical to the plain draw
    chex.assert_trees_all_equal(
        run(t_blocks=low, bounds=(1e-3, 1.0)),
        corruption.corrupt_blocks(jax.random.key(3), x0, low, lb, proc, LogLinear(0.0)))


def test_resample_count_is_truncated_binomial():
    proc, lb, p = Absorbing(3), LB, 0.4
    bounds = (0.25, 0.6)  # counts 2..4
    x0 = jnp.zeros(SHAPE, jnp.int32)
    tb = jnp.full((SHAPE[0], K), p)
    # also under an outer jit, with the static arguments static
    f = jax.jit(corruption.corrupt_blocks, static_argnums=(3, 4, 5),
                static_argnames=("resample", "bounds"))
    xt = f(jax.random.key(4), x0, tb, lb, proc, LogLinear(0.0), resample=True, bounds=bounds)
    counts = np.round(_masked_fraction(xt, lb, proc.mask_id) * lb).astype(int).reshape(-1)
    n = counts.size
    pmf = np.array([math.comb(lb, c) * p ** c * (1 - p) ** (lb - c) for c in range(lb + 1)])
    pmf[:2] = pmf[5:] = 0
    pmf /= pmf.sum()
    hist = np.bincount(counts, minlength=lb + 1) / n
    _within(hist, pmf, n, floor=0.0)
    # every position of a block is equally likely to be masked
    per_pos = (np.asarray(xt) == proc.mask_id).reshape(-1, lb).mean(0)
    _within(per_pos, np.full(lb, (pmf * np.arange(lb + 1)).sum() / lb), n)


def test_resample_subset_is_uniform_given_count():
    proc, lb = Absorbing(3), 4
    x0 = jnp.zeros(SHAPE, jnp.int32)
    xt = corruption.corrupt_blocks(jax.random.key(5), x0, jnp.full((SHAPE[0], 8), 0.2), lb, proc,
                                   LogLinear(0.0), resample=True, bounds=(0.5, 0.5))
    m = (np.asarray(xt) == proc.mask_id).reshape(-1, lb)
    assert (m.sum(-1) == 2).all()
    patterns = m @ (2 ** np.arange(lb))
    pairs = [3, 5, 6, 9, 10, 12]
    hist = np.array([(patterns == v).mean() for v in pairs])
    _within(hist, np.full(6, 1 / 6), patterns.size, floor=0.0)


def test_resample_errors():
    x0 = jnp.zeros((2, 8), jnp.int32)
    tb = jnp.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="block_size=4"):
        corruption.corrupt_blocks(jax.random.key(0), x0, tb, 4, Absorbing(3), LogLinear(0.0),
                                  resample=True, bounds=(0.3, 0.45))
    with pytest.raises(ValueError, match="mask_id"):
        corruption.corrupt_blocks(jax.random.key(0), x0, tb, 4, Uniform(3), LogLinear(0.0),
                                  resample=True, bounds=(0.3, 0.8))


def test_resample_degenerate_probabilities_stay_finite():
    # move prob exactly 0 with a lower bound, or exactly 1 with an upper bound < 1: the
    # truncated pmf has no mass; we return the nearest allowed count instead of NaN/garbage.
    proc, lb = Absorbing(3), LB
    x0 = jnp.zeros(SHAPE, jnp.int32)
    tb = jnp.zeros((SHAPE[0], K))
    xt = corruption.corrupt_blocks(jax.random.key(0), x0, tb, lb, proc,
                                   LogLinear(0.0), resample=True, bounds=(0.25, 0.75))
    chex.assert_trees_all_equal(_masked_fraction(xt, lb, proc.mask_id), np.full(tb.shape, 0.25))
    xt = corruption.corrupt_blocks(jax.random.key(0), x0, tb + 1.0, lb, proc,
                                   LogLinear(0.0), resample=True, bounds=(0.25, 0.75))
    chex.assert_trees_all_equal(_masked_fraction(xt, lb, proc.mask_id), np.full(tb.shape, 0.75))


def test_traced_bounds_match_static():
    proc, sched = Absorbing(3), LogLinear(0.0)
    x0 = jnp.zeros(SHAPE, jnp.int32)
    tb = corruption.sample_times(jax.random.key(6), (SHAPE[0], K), t_min=0.0, t_max=1.0)

    @jax.jit
    def traced(lo, hi):
        return corruption.corrupt_blocks(jax.random.key(7), x0, tb, LB, proc, sched,
                                         resample=True, bounds=(lo, hi))

    for bounds in [(0.25, 0.6), (1e-3, 0.5), (0.5, 1.0), (0.3, 0.7)]:
        static = corruption.corrupt_blocks(jax.random.key(7), x0, tb, LB, proc, sched,
                                           resample=True, bounds=bounds)
        chex.assert_trees_all_equal(traced(*bounds), static)
    # no enforced bound, or an empty range (0.3 < c/8 < 0.35): the full range 0..Lb
    full = corruption.corrupt_blocks(jax.random.key(7), x0, tb, LB, proc, sched,
                                     resample=True, bounds=(0.0, 1.0))
    chex.assert_trees_all_equal(traced(1e-3, 1.0), full)
    chex.assert_trees_all_equal(traced(0.3, 0.35), full)
