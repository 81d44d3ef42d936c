"""Schedules and continuous-time processes against independent computations.

Closed forms are checked against `scipy.linalg.expm` and against the generic `MatrixProcess` (which
uses `jax.scipy.linalg.expm`), the Kolmogorov forward equation by finite differences, and sigma(t)
against the derivative of sigma_bar(t).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from dlm_jax.processes import schedules, transitions

SCHEDULES = [
    schedules.LogLinear(1e-3),
    schedules.LogLinear(0.0),
    schedules.Geometric(1e-3, 6.0),
    schedules.Linear(1e-3, 7.0),
    schedules.Cosine(1e-3),
    schedules.Clipped(schedules.LogLinear(1e-3), 0.3, 0.8),
]
PROCESSES = [transitions.Uniform(5), transitions.Absorbing(4), transitions.Uniform(2)]
SIGMAS = [1e-4, 0.3, 2.0, 9.0]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_schedule_derivatives_and_identities(schedule):
    with jax.enable_x64(True):
        t = jnp.linspace(0.02, 0.98, 49)
        h = 1e-6
        fd_sigma = (schedule.sigma_bar(t + h) - schedule.sigma_bar(t - h)) / (2 * h)
        chex.assert_trees_all_close(schedule.sigma(t), fd_sigma, rtol=1e-6)
        fd_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
        chex.assert_trees_all_close(schedule.dalpha(t), fd_alpha, rtol=1e-6, atol=1e-9)
        chex.assert_trees_all_close(schedule.alpha(t), jnp.exp(-schedule.sigma_bar(t)), rtol=1e-12)
        chex.assert_trees_all_close(schedule.move_prob(t), 1 - schedule.alpha(t), rtol=1e-10)
        weight = -schedule.dalpha(t) / (1 - schedule.alpha(t))
        chex.assert_trees_all_close(schedule.nelbo_weight(t), weight, rtol=1e-10)
        assert bool(jnp.all(schedule.sigma(t) > 0))


def test_schedule_float32_stable_near_zero():
    t = jnp.asarray([1e-6, 1e-4, 1e-2], jnp.float32)
    for schedule in SCHEDULES:
        move = schedule.move_prob(t)
        with jax.enable_x64(True):
            exact = schedule.move_prob(jnp.asarray(t, jnp.float64))
        chex.assert_trees_all_close(move, exact.astype(jnp.float32), rtol=1e-4)
    # Log-linear: the NELBO weight is exactly 1/t; sigma_bar(1) = -log(eps).
    ll = schedules.LogLinear(1e-3)
    chex.assert_trees_all_close(ll.nelbo_weight(t), 1 / t, rtol=1e-6)
    np.testing.assert_allclose(float(ll.sigma_bar(1.0)), -np.log(1e-3), rtol=1e-5)  # float32
    # A float32 weight computed as sigma / expm1(sigma_bar) agrees with 1/t.
    chex.assert_trees_all_close(ll.sigma(t) / jnp.expm1(ll.sigma_bar(t)), 1 / t, rtol=2e-3)


def test_clipped_bounds_and_errors():
    clip = schedules.Clipped(schedules.LogLinear(), 0.3, 0.8)
    assert schedules.time_bounds(clip) == (0.3, 0.8)
    assert schedules.time_bounds(schedules.LogLinear(), 1e-3) == (1e-3, 1.0)
    with pytest.raises(ValueError, match="beta_l"):
        schedules.Clipped(schedules.LogLinear(), 0.9, 0.2)
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.Geometric(5.0, 1.0)
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        schedules.make_schedule("foo")


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("sigma_bar", SIGMAS)
def test_closed_forms_equal_expm(process, sigma_bar):
    with jax.enable_x64(True):
        q = np.asarray(process.rate_matrix())
        np.testing.assert_allclose(q.sum(1), 0.0, atol=1e-14)
        p = expm(sigma_bar * q)
        states = jnp.arange(process.num_states)
        chex.assert_trees_all_close(process.transition(states, sigma_bar), p, atol=1e-12)
        chex.assert_trees_all_close(process.likelihood(states, sigma_bar), p.T, atol=1e-12)
        chex.assert_trees_all_close(process.transition(states, sigma_bar).sum(-1),
                                    jnp.ones(process.num_states), atol=1e-12)
        chex.assert_trees_all_close(process.rate_into(states), q.T, atol=0)
        score = np.random.default_rng(0).uniform(0.1, 2.0, (process.num_states,))
        chex.assert_trees_all_close(process.staggered_score(jnp.asarray(score), sigma_bar),
                                    expm(-sigma_bar * q).T @ score, rtol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_matrix_process_matches_closed_form(process):
    with jax.enable_x64(True):
        dense = transitions.MatrixProcess(process.rate_matrix(), limit=process.limit_probs())
        x = jnp.asarray([[0, 1], [process.num_states - 1, 0]])
        sigma_bar = jnp.asarray([[0.2], [1.7]])
        chex.assert_trees_all_close(dense.transition(x, sigma_bar),
                                    process.transition(x, sigma_bar), atol=1e-12)
        chex.assert_trees_all_close(dense.likelihood(x, sigma_bar),
                                    process.likelihood(x, sigma_bar), atol=1e-12)
        score = jax.random.uniform(jax.random.key(1), x.shape + (process.num_states,),
                                   jnp.float64, 0.1, 2.0)
        chex.assert_trees_all_close(dense.staggered_score(score, sigma_bar),
                                    process.staggered_score(score, sigma_bar), rtol=1e-9)
        chex.assert_trees_all_close(dense.reverse_rate(x, score), process.reverse_rate(x, score),
                                    atol=1e-12)


def test_matrix_process_default_limit_and_validation():
    q = np.array([[-1.0, 1.0, 0.0], [0.5, -1.0, 0.5], [0.0, 2.0, -2.0]])
    dense = transitions.MatrixProcess(q)
    with jax.enable_x64(True):
        limit = np.asarray(dense.limit_probs())
    np.testing.assert_allclose(limit @ q, 0.0, atol=1e-8)  # stationary
    np.testing.assert_allclose(limit.sum(), 1.0, atol=1e-8)
    with pytest.raises(ValueError, match="rows summing to 0"):
        transitions.MatrixProcess(np.ones((3, 3)))
    with pytest.raises(ValueError, match="square"):
        transitions.MatrixProcess(np.ones((3, 2)))


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("schedule", [schedules.LogLinear(1e-3), schedules.Geometric(1e-3, 6.0)],
                         ids=repr)
def test_forward_kolmogorov_equation(process, schedule):
    """d/dt q_t(·|x0) = sigma(t) · q_t(·|x0) Q, by central finite differences."""
    with jax.enable_x64(True):
        q = process.rate_matrix()
        x0 = jnp.arange(process.num_states)
        for t in (0.1, 0.5, 0.9):
            h = 1e-6
            dp = (process.transition(x0, schedule.sigma_bar(t + h))
                  - process.transition(x0, schedule.sigma_bar(t - h))) / (2 * h)
            rhs = schedule.sigma(t) * process.transition(x0, schedule.sigma_bar(t)) @ q
            chex.assert_trees_all_close(dp, rhs, atol=1e-7)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_reverse_rate_is_time_reversal(process):
    """With exact ratios p_t(y)/p_t(x), the reverse rates satisfy p(x)R̄(x,y) = p(y)Q(y,x)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p0 = rng.dirichlet(np.ones(process.num_states))
        if process.mask_id is not None:
            p0[process.mask_id] = 0.0
            p0 /= p0.sum()
        q = np.asarray(process.rate_matrix())
        pt = p0 @ expm(0.7 * q)
        x = jnp.arange(process.num_states)
        ratios = jnp.asarray(pt[None, :] / pt[:, None])
        rev = np.asarray(process.reverse_rate(x, ratios))
        flux_rev = pt[:, None] * rev
        flux_fwd = (pt[:, None] * q).T
        off = ~np.eye(process.num_states, dtype=bool)
        np.testing.assert_allclose(flux_rev[off], flux_fwd[off], atol=1e-12)
        np.testing.assert_allclose(rev.sum(1), 0.0, atol=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_sample_transition_frequencies(process):
    n = 20000
    x0 = jnp.zeros((n,), jnp.int32)
    xt = process.sample_transition(jax.random.key(0), x0, 0.8)
    freq = np.bincount(np.asarray(xt), minlength=process.num_states) / n
    expected = np.asarray(process.transition(jnp.zeros((), jnp.int32), 0.8))
    # 5 standard errors of a binomial proportion.
    np.testing.assert_array_less(np.abs(freq - expected),
                                 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)
    limit = process.sample_limit(jax.random.key(1), (n,))
    freq = np.bincount(np.asarray(limit), minlength=process.num_states) / n
    expected = np.asarray(process.limit_probs())
    np.testing.assert_array_less(np.abs(freq - expected),
                                 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


def test_make_process_errors():
    assert transitions.make_process("absorbing", 7).num_states == 8
    assert transitions.make_process("absorbing", 7).mask_id == 7
    with pytest.raises(ValueError, match="unknown process 'gauss'"):
        transitions.make_process("gauss", 4)
