"""Concrete score matching and the CTMC ELBO on enumerable problems.

Equation numbers refer to the module docstrings of `dlm_jax.objectives.csm` (CSM, Meng et al.,
2022) and `dlm_jax.objectives.ctmc` (the CTMC ELBO, Campbell et al., 2022).

Every check enumerates a tiny state space (vocabulary ≤ 3, length ≤ 2) with a random data
distribution, so the expectations are exact sums and the reference values are closed forms
(the exact denoisers and marginals come from `dlm_jax.oracles`):
  * CSM: the explicit (csm (2)) and trainable (csm (3)) objectives differ by Σ_x p(x)‖c_p(x)‖²
    for every model; both are minimised at the true concrete score, with zero gradient there.
  * CTMC: with the exact denoiser (the true posterior marginals q(x0^d | x_t)) the reverse rate
    (ctmc (2)) is the true time reversal, and the time integral of the bound equals
    KL(q_{t0|0}(·|x0) ‖ p_{t0}) - KL(q_{1|0}(·|x0) ‖ p_1) for every x0 (-log p0(x0) when σ̄(t0) = 0
    and the process reaches p_1 exactly); the Monte-Carlo estimator (ctmc (8)) is unbiased.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.objectives import csm, ctmc
from dlm_jax.processes import schedules, transitions

_seqs = oracles.all_sequences
_flat = oracles.sequence_index


# ------------------------------------------------------------------------------------------------
# Concrete score matching
# ------------------------------------------------------------------------------------------------

def _table_model(table, num_states):
    """A 'model' that is a free table of concrete scores, one (L, S) array per sequence."""
    return lambda x: table[_flat(x, num_states)]


def test_hamming_neighbors_and_true_score():
    x = jnp.asarray([[0, 2], [1, 1]], jnp.int32)
    nb = csm.hamming_neighbors(x, 3)
    chex.assert_shape(nb, (2, 2, 3, 2))
    np.testing.assert_array_equal(nb[0, 0, 1], [1, 2])
    np.testing.assert_array_equal(nb[0, 1, 0], [0, 0])
    np.testing.assert_array_equal(nb[1, 1, 1], [1, 1])  # y = x^i: x itself
    with jax.enable_x64(True):
        p = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(9)).reshape(3, 3))
        c = csm.concrete_score_table(p, x)
        chex.assert_shape(c, (2, 2, 3))
        chex.assert_trees_all_close(c[0, 0, 1], p[1, 2] / p[0, 2] - 1, rtol=1e-12)
        chex.assert_trees_all_close(c[1, 1, 0], p[1, 0] / p[1, 1] - 1, rtol=1e-12)
        np.testing.assert_allclose(c[0, 0, 0], 0.0, atol=1e-15)  # not a neighbour
        # A single token: neighbours are all other states.
        p1 = jnp.asarray([0.2, 0.5, 0.3])
        c1 = csm.concrete_score_table(p1, jnp.asarray([[1]], jnp.int32))
        chex.assert_trees_all_close(c1[0, 0], p1 / 0.5 - 1, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(S,\)\*L"):
        csm.concrete_score_table(jnp.ones((3, 2)), x)
    with pytest.raises(ValueError, match="integer tokens"):
        csm.hamming_neighbors(jnp.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match=r"\(B, L, S\)"):
        csm.csm_explicit(jnp.zeros((2, 2)), jnp.zeros((2, 2, 3)), x)


@pytest.mark.parametrize("num_states,length", [(3, 1), (3, 2)])
def test_csm_forms_differ_by_model_independent_constant(num_states, length):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        k = num_states ** length
        p = jnp.asarray(rng.dirichlet(np.ones(k)))                      # full support
        xs = _seqs(num_states, length)
        truth = csm.concrete_score_table(p.reshape((num_states,) * length), xs)  # (K, L, S)
        const = float((p * (truth ** 2).sum((-2, -1))).sum())         # Σ p ‖c_p‖²

        @jax.jit
        def objectives(table):
            explicit, _ = csm.csm_explicit(table, truth, xs)
            implicit, _ = csm.csm_loss(_table_model(table, num_states), xs)
            return (p * explicit).sum(), (p * implicit).sum()

        grads = jax.jit(jax.jacrev(lambda tb: jnp.stack(objectives(tb))))

        diffs, implicit_vals = [], []
        for seed in range(4):
            table = jnp.asarray(np.random.default_rng(10 + seed).normal(
                size=(k, length, num_states)))
            explicit, implicit = objectives(table)
            assert float(explicit) > 0
            diffs.append(float(explicit - implicit))
            implicit_vals.append(float(implicit))
        np.testing.assert_allclose(diffs, const, rtol=1e-10, atol=1e-12)

        # Minimum at the true score: explicit = 0, implicit = -C, zero gradient for both.
        explicit, implicit = objectives(truth)
        np.testing.assert_allclose(float(explicit), 0.0, atol=1e-14)
        np.testing.assert_allclose(float(implicit), -const, rtol=1e-10)
        assert min(implicit_vals) > float(implicit)
        np.testing.assert_allclose(grads(truth), 0.0, atol=1e-12)
        # Entries at (i, x^i) are not neighbours: changing them changes nothing.
        bumped = truth + 5.0 * jax.nn.one_hot(xs, num_states)
        np.testing.assert_allclose(float(objectives(bumped)[1]), -const, rtol=1e-10)


def test_csm_sampled_estimator_is_unbiased():
    with jax.enable_x64(True):
        num_states, length, reps = 3, 2, 3000
        xs = _seqs(num_states, length)
        table = jnp.asarray(np.random.default_rng(3).normal(size=(9, length, num_states)))
        model = _table_model(table, num_states)
        exact, _ = jax.jit(lambda x: csm.csm_loss(model, x))(xs)
        x_rep = jnp.repeat(xs, reps, axis=0)
        vals, aux = jax.jit(lambda k, x: csm.csm_loss_sampled(k, model, x, num_states))(
            jax.random.key(0), x_rep)
        chex.assert_shape(vals, (9 * reps,))
        vals = np.asarray(vals).reshape(9, reps)
        se = vals.std(1) / np.sqrt(reps)
        np.testing.assert_array_less(np.abs(vals.mean(1) - np.asarray(exact)), 5 * se + 1e-9)
        assert set(aux) == {"self_term", "cross_term"}


# ------------------------------------------------------------------------------------------------
# CTMC: the exact denoiser of a tiny data distribution
# ------------------------------------------------------------------------------------------------

def _data(process, length, seed):
    """Random p0 over (S,)*L; zero on any sequence containing the absorbing mask."""
    return oracles.random_joint(seed, process.num_states, length, process.mask_id)


def _denoiser(process, p0_flat, length, pert=None, eps=0.0):
    """Exact posterior marginals q(x0^d | x_t) (times exp(eps·pert[x_t, d, x0]) if perturbed)."""
    s = process.num_states
    joint = p0_flat.reshape((s,) * length)

    def fn(xt, sigma_bar):
        post = oracles.exact_x0_posterior(joint, process, xt, sigma_bar)  # (N, L, S)
        if pert is not None:
            post = post * jnp.exp(eps * pert[_flat(xt, s)])
            post = post / post.sum(-1, keepdims=True)
        return post
    return fn


def _marginal(process, p0, sigma_bar):
    """p_t over (S,)*L."""
    return np.asarray(oracles.exact_marginal(jnp.asarray(p0), process, sigma_bar))


def _cond(process, x0, sigma_bar):
    """q_{t|0}(· | x0) over (S,)*L, flattened."""
    return np.asarray(oracles.transition_table(process, jnp.asarray(x0)[None], sigma_bar)[0])


def _kl(a, b):
    m = a > 0
    return float(np.sum(a[m] * (np.log(a[m]) - np.log(b[m]))))


DENSE_Q = np.array([[-1.0, 0.7, 0.3], [0.2, -0.5, 0.3], [0.9, 0.6, -1.5]])


@pytest.mark.parametrize("process", [transitions.Uniform(3), transitions.Absorbing(2),
                                     transitions.MatrixProcess(DENSE_Q)],
                         ids=["uniform3", "absorbing2", "dense3"])  # stable across workers
@pytest.mark.parametrize("length", [1, 2])
def test_x0_reverse_rate_with_exact_posterior_is_time_reversal(process, length):
    with jax.enable_x64(True):
        s = process.num_states
        p0 = _data(process, length, seed=2)
        fn = _denoiser(process, jnp.asarray(p0.reshape(-1)), length)
        q = np.asarray(process.rate_matrix())
        xs = _seqs(s, length)
        sigma_bar, sigma = 0.8, 1.7
        pt = _marginal(process, p0, sigma_bar).reshape(-1)
        keep = pt > 0                                       # reachable states only
        xs = xs[keep]
        rates = jax.jit(lambda x: ctmc.x0_reverse_rate(
            process, fn(x, jnp.full((x.shape[0],), sigma_bar)), x, sigma_bar, sigma))(xs)
        rates = np.asarray(rates)
        chex.assert_shape(rates, (xs.shape[0], length, s))
        np.testing.assert_allclose(rates.sum(-1), 0.0, atol=1e-12)
        # Expected: σQ[y, x^d]·p_t(x^{d←y})/p_t(x) for y ≠ x^d.
        xs_np = np.asarray(xs)
        ratio = np.exp(np.asarray(oracles.exact_log_ratios(jnp.asarray(p0), process, xs,
                                                           sigma_bar)))    # (N, L, S)
        expected = sigma * q.T[xs_np] * ratio                              # q.T[x, y] = Q[y, x]
        off = ~np.eye(s, dtype=bool)[xs_np]
        np.testing.assert_allclose(rates[off], expected[off], rtol=1e-9, atol=1e-12)


def test_x0_reverse_rate_handles_zero_likelihood():
    """Absorbing: a real token x has q(x | x0) = 0 for x0 ≠ x; a model with mass there is safe."""
    process = transitions.Absorbing(3)
    xt = jnp.asarray([[0, 3], [3, 2]], jnp.int32)                 # 3 is the mask
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 2, 4)))
    rate_fn = jax.jit(lambda p, sb: ctmc.x0_reverse_rate(process, p, xt, sb, 2.0))
    rates = rate_fn(probs, jnp.asarray([0.4, 1e-6]))
    assert bool(jnp.all(jnp.isfinite(rates)))
    np.testing.assert_allclose(rates[0, 0], 0.0)                  # real tokens never move back
    np.testing.assert_allclose(rates[1, 1], 0.0)
    # Out of the mask: σ p(y) e^{-σ̄}/(1 - e^{-σ̄}) for real y (model mass on x0 = mask dropped).
    sb = 0.4
    expected = 2.0 * probs[0, 1, :3] * np.exp(-sb) / -np.expm1(-sb)
    np.testing.assert_allclose(rates[0, 1, :3], expected, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda p: ctmc.x0_reverse_rate(process, p, xt, 0.4, 2.0).sum()
                            + ctmc.ctmc_elbo(process, p, p, xt, xt, xt, 0.4, 2.0)[0].sum()))(probs)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # float32 agrees with float64.
    with jax.enable_x64(True):
        rates64 = rate_fn(probs.astype(jnp.float64), jnp.asarray([0.4, 1e-6]))
    chex.assert_trees_all_close(rates, rates64.astype(jnp.float32), rtol=1e-5)
    with pytest.raises(ValueError, match="x0_probs must have shape"):
        ctmc.x0_reverse_rate(process, probs[..., :3], xt, 0.4, 2.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        ctmc.x0_reverse_rate(process, probs, xt, jnp.ones((3,)), 2.0)


# Configurations for the integrated bound: (process, schedule, length).
BOUND_CASES = [
    (transitions.Uniform(3), schedules.Geometric(1e-6, 3.0), 1),
    (transitions.Uniform(3), schedules.Geometric(1e-6, 3.0), 2),
    (transitions.Absorbing(2), schedules.LogLinear(0.0), 2),
]


@functools.lru_cache(maxsize=None)
def _bound_fn(process, schedule, length, num_points=160):
    def f(p0_flat, x0, pert, eps):
        fn = _denoiser(process, p0_flat, length, pert, eps)
        return ctmc.ctmc_nelbo_exact(process, schedule, fn, x0, num_points=num_points)
    return jax.jit(f)


@pytest.mark.parametrize("process,schedule,length", BOUND_CASES, ids=repr)
def test_bound_with_exact_denoiser_is_tight(process, schedule, length):
    """∫ E[integrand|x0] dt = KL(q_{t0|0}‖p_{t0}) - KL(q_{1|0}‖p_1) per x0; perturbed is larger.

    Averaged over p0 with the prior term against p_ref, the bound is
    E_{x0} KL(q_{t0|0}(·|x0) ‖ p_{t0}) + KL(p_1 ‖ p_ref) ≈ H(p0) + KL(p_1 ‖ p_ref) as σ̄(t0) → 0.
    (The prior term E KL(q_{1|0} ‖ p_ref) is part of the bound; the time integral alone is
    H(p0) - E KL(q_{1|0} ‖ p_1).)
    """
    with jax.enable_x64(True):
        s = process.num_states
        p0 = _data(process, length, seed=5)
        xs = _seqs(s, length)
        keep = p0.reshape(-1) > 0
        x0 = xs[keep]
        w = p0.reshape(-1)[keep]
        pert = jnp.asarray(np.random.default_rng(7).normal(size=(s ** length, length, s)))
        f = _bound_fn(process, schedule, length)
        p0_flat = jnp.asarray(p0.reshape(-1))
        bound, aux = f(p0_flat, x0, pert, 0.0)
        bound_pert, _ = f(p0_flat, x0, pert, 0.6)

        sb0 = float(schedule.sigma_bar(0.0))
        sb1 = float(schedule.sigma_bar(1.0))
        p_t0 = _marginal(process, p0, sb0).reshape(-1)
        p_1 = _marginal(process, p0, sb1).reshape(-1)
        ref = np.asarray(process.limit_probs())
        p_ref = ref
        for _ in range(length - 1):
            p_ref = np.multiply.outer(p_ref, ref).reshape(-1)
        kl0 = np.array([_kl(_cond(process, np.asarray(x), sb0), p_t0) for x in x0])
        kl1 = np.array([_kl(_cond(process, np.asarray(x), sb1), p_1) for x in x0])
        np.testing.assert_allclose(aux["integral"], kl0 - kl1, rtol=1e-8, atol=1e-9)

        entropy = -float(np.sum(w * np.log(w)))
        prior_gap = _kl(p_1, p_ref)
        np.testing.assert_allclose(float(w @ bound), float(w @ kl0) + prior_gap, rtol=1e-8)
        np.testing.assert_allclose(float(w @ bound), entropy + prior_gap, atol=1e-4)
        if sb0 == 0.0:       # absorbing + log-linear(0): -log p0(x0) exactly, per x0.
            np.testing.assert_allclose(aux["integral"], -np.log(w), rtol=1e-8)
            np.testing.assert_allclose(aux["prior"], 0.0, atol=1e-12)
        assert float(w @ bound_pert) > float(w @ bound) + 1e-3


@pytest.mark.parametrize("process,schedule", [
    (transitions.Uniform(3), schedules.Geometric(1e-3, 3.0)),
    (transitions.Absorbing(2), schedules.LogLinear(0.0)),
], ids=repr)
def test_mc_estimator_is_exactly_unbiased_at_fixed_t(process, schedule):
    """Σ_{x_t, x̃} q(x_t|x0) r_t(x̃|x_t) · ctmc_elbo(...) = ctmc_elbo_expected(...), any denoiser."""
    with jax.enable_x64(True):
        s, length = process.num_states, 2
        p0 = _data(process, length, seed=3)
        pert = jnp.asarray(np.random.default_rng(4).normal(size=(s ** length, length, s)))
        fn = _denoiser(process, jnp.asarray(p0.reshape(-1)), length, pert, 0.5)
        xs = np.asarray(_seqs(s, length))
        x0 = xs[p0.reshape(-1) > 0]
        t = 0.37
        sb, sg = float(schedule.sigma_bar(t)), float(schedule.sigma(t))
        expected, _ = jax.jit(lambda z: ctmc.ctmc_elbo_expected(process, fn, z, sb, sg))(x0)
        chex.assert_shape(expected, x0.shape)
        # Given x0 and t, the x_t-averaged integrand is a generalised KL between reverse rates.
        assert np.all(np.asarray(expected).sum(-1) > 0)

        # Every (x0, x_t, x̃) triple with its probability q(x_t|x0)·r_t(x̃|x_t), in one batch.
        q = np.asarray(process.rate_matrix())
        kernel = np.asarray(process.transition(jnp.arange(s), sb))        # [x0, x]
        rows, weights, owner = [], [], []
        for b, z0 in enumerate(x0):
            for x in xs:
                qx = np.prod(kernel[z0, x])
                jumps = [(d, y, q[x[d], y]) for d in range(length) for y in range(s)
                         if y != x[d] and q[x[d], y] > 0]
                total = sum(r for *_, r in jumps)
                if qx == 0:
                    continue
                if total == 0:                                            # no jump possible
                    jumps, total = [(0, x[0], 1.0)], 1.0
                for d, y, r in jumps:
                    xj = x.copy()
                    xj[d] = y
                    rows.append((z0, x, xj))
                    weights.append(qx * r / total)
                    owner.append(b)
        z0s, xts, xjs = (jnp.asarray(np.stack(c), jnp.int32) for c in zip(*rows))

        @jax.jit
        def mc_values(z0s, xts, xjs):
            sbn = jnp.full((z0s.shape[0],), sb)
            return ctmc.ctmc_elbo(process, fn(xts, sbn), fn(xjs, sbn), z0s, xts, xjs, sb, sg)

        vals, aux = mc_values(z0s, xts, xjs)
        chex.assert_shape(vals, (len(rows), length))
        total = np.zeros(expected.shape)
        np.add.at(total, np.asarray(owner), np.asarray(weights)[:, None] * np.asarray(vals))
        np.testing.assert_allclose(total, expected, rtol=1e-10, atol=1e-12)
        assert set(aux) == {"reverse_exit", "forward_exit", "jump_term"}


def test_mc_training_estimator_mean_matches_quadrature():
    """The sampled t, x_t, x̃ estimator (`ctmc_elbo_mc`) averages to the quadrature integral."""
    with jax.enable_x64(True):
        process, schedule, length = BOUND_CASES[1]
        s = process.num_states
        p0 = _data(process, length, seed=5)
        pert = jnp.asarray(np.random.default_rng(7).normal(size=(s ** length, length, s)))
        p0_flat = jnp.asarray(p0.reshape(-1))
        x0 = _seqs(s, length)
        _, aux = _bound_fn(process, schedule, length)(p0_flat, x0, pert, 0.6)  # cached compile
        fn = _denoiser(process, p0_flat, length, pert, 0.6)
        reps = 2000
        mc = jax.jit(lambda k, x: ctmc.ctmc_elbo_mc(k, fn, x, process=process,
                                                   schedule=schedule)[0].sum(-1))
        vals = np.asarray(mc(jax.random.key(0), jnp.repeat(x0, reps, axis=0))).reshape(-1, reps)
        w = p0.reshape(-1)
        mean, exact = w @ vals.mean(1), float(w @ np.asarray(aux["integral"]))
        se = np.sqrt(np.sum(w ** 2 * vals.var(1) / reps))
        assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_sample_jump_and_prior_kl():
    with jax.enable_x64(True):
        absorb = transitions.Absorbing(2)
        xt = jnp.asarray([[2, 2], [0, 2]] * 100, jnp.int32)
        jump = jax.jit(ctmc.sample_jump, static_argnums=1)
        xj = np.asarray(jump(jax.random.key(0), absorb, xt))
        np.testing.assert_array_equal(xj[0::2], 2)                 # all-mask: no jump possible
        np.testing.assert_array_equal(xj[1::2], [[2, 2]] * 100)    # the only jump: 0 -> mask
        uni = transitions.Uniform(3)
        xt = jnp.zeros((6000, 2), jnp.int32)
        xj = np.asarray(jump(jax.random.key(1), uni, xt))
        assert np.all((xj != 0).sum(1) == 1)                       # exactly one position moves
        freq = np.bincount(xj[:, 0] * 3 + xj[:, 1], minlength=9) / 6000
        np.testing.assert_allclose(freq[[1, 2, 3, 6]], 0.25, atol=0.03)

        x0 = jnp.asarray([[0, 1]], jnp.int32)
        np.testing.assert_allclose(ctmc.ctmc_prior_kl(absorb, x0, jnp.inf), 0.0, atol=1e-15)
        assert bool(jnp.all(jnp.isinf(ctmc.ctmc_prior_kl(absorb, x0, 5.0))))
        q = np.asarray(uni.transition(jnp.int32(0), 2.0))
        np.testing.assert_allclose(ctmc.ctmc_prior_kl(uni, x0, 2.0)[0, 0],
                                   np.sum(q * np.log(3 * q)), rtol=1e-12)
    with pytest.raises(ValueError, match="exceeds"):
        ctmc.ctmc_elbo_expected(uni, lambda x, s: None, jnp.zeros((1, 9), jnp.int32), 1.0, 1.0)
    with pytest.raises(ValueError, match="must match"):
        z = jnp.zeros((2, 2), jnp.int32)
        p = jnp.full((2, 2, 3), 1 / 3)
        ctmc.ctmc_elbo(uni, p, p, z, z, jnp.zeros((2, 3), jnp.int32), 1.0, 1.0)
