"""D3PM process and objectives against independent computations.

* Closed-form Q̄_t against explicit products of the one-step matrices (both kinds, all schedules).
* Rows, columns and posteriors against Bayes' rule on dense matrices, by enumeration.
* The x0-parameterisations: posterior mixture == joint form for absorbing, != for uniform.
* The variational bound on tiny problems with an exact denoiser built by enumeration:
      E_{x0}[Σ_t E L_t] = H(data) - I(x_0; x_T)   and, with the prior term,
      E_{x0}[bound]     = H(data) + KL(q(x_T) ‖ π),
  any other denoiser (perturbed, or the wrong x0-parameterisation) gives strictly more, and the
  sampled-t training loss averages to the exact sum.
"""
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.objectives.d3pm import (d3pm_bound_all_steps, d3pm_exact_bound, d3pm_loss,
                                     d3pm_prior_term)
from dlm_jax.processes.d3pm import D3PM, d3pm_betas

KINDS = ["uniform", "absorbing"]
SCHEDULES = ["linear", "cosine", "jsd"]


def _dense_one_step(p: D3PM) -> np.ndarray:
    """Q_1 … Q_T written out entry by entry from the paper's definitions: (T+1, S, S), [0] = I."""
    s, k = p.num_states, p.vocab_size
    betas = d3pm_betas(p.schedule, p.num_steps, p.beta_min, p.beta_max)
    mats = [np.eye(s)]
    for b in betas:
        if p.kind == "uniform":
            q = np.full((s, s), b / k)
            np.fill_diagonal(q, 1 - b * (k - 1) / k)
        else:
            m = p.mask_id
            q = np.eye(s) * (1 - b)
            q[:, m] = b
            q[m, m] = 1.0
        mats.append(q)
    return np.stack(mats)


def _dense_products(p: D3PM) -> tuple[np.ndarray, np.ndarray]:
    """(Q_t, Q̄_t) for t = 0 … T by NumPy float64 matrix products: each (T+1, S, S)."""
    q = _dense_one_step(p)
    qbar = [np.eye(p.num_states)]
    for t in range(1, p.num_steps + 1):
        qbar.append(qbar[-1] @ q[t])
    return q, np.stack(qbar)


def _exact_denoiser(p: D3PM, seqs: np.ndarray, probs: np.ndarray, joint_optimal: bool = False):
    """Exact per-token posterior q(x_0^l | x_t) of a data distribution, as a table of logits.

    seqs (N, L) real-token sequences with probabilities probs (N,). With `joint_optimal` the table
    holds log q(x0|x_t) - log q(x_t|x0), the optimum of the joint parameterisation (L = 1).
    Returns the float64 table (T+1, C, L, S), C = S^L noisy sequences in row-major order; rows of
    impossible noisy sequences (and t = 0) are 0. The posteriors are `oracles.exact_x0_posterior`.
    """
    s, T = p.num_states, p.num_steps
    length = seqs.shape[1]
    joint = np.zeros((p.vocab_size,) * length)
    np.add.at(joint, tuple(seqs.T), probs)
    with jax.enable_x64(True):
        configs = oracles.all_sequences(s, length)  # (C, L), row-major
        table = np.zeros((T + 1, configs.shape[0], length, s))
        for t in range(1, T + 1):
            post = np.asarray(oracles.exact_x0_posterior(jnp.asarray(joint), p, configs, t))
            if joint_optimal:
                col = np.asarray(p.likelihood(configs, t))  # q(x_t^l | x0^l = ·): (C, L, S)
                post = np.where(col > 0, post / np.where(col > 0, col, 1), 0.0)
            possible = post.sum(-1, keepdims=True) > 0
            with np.errstate(divide="ignore"):
                table[t] = np.where(possible, np.log(post), 0.0)
    return table


def _lookup(table, xt, t):
    """Table logits (T+1, C, L, S) at noisy sequences xt (M, L) and steps t (M,): (M, L, S)."""
    s = table.shape[-1]
    powers = s ** jnp.arange(xt.shape[-1] - 1, -1, -1)
    return table[t, (xt * powers).sum(-1)]


def _table_bound(table, x0, p, parameterization="mixture"):
    """Exact Σ_t E[L_t] per token (B, L) of the denoiser stored in `table`. Run eagerly: the
    primitives compile once per shape and are reused across processes and tables."""
    table = jnp.asarray(table)
    fn = lambda xt, t: _lookup(table, xt, t)  # noqa: E731
    return d3pm_exact_bound(fn, x0, p, parameterization=parameterization)[0]


_table_bound_jit = jax.jit(_table_bound, static_argnames=("p", "parameterization"))


def _entropy_terms(p: D3PM, seqs: np.ndarray, probs: np.ndarray):
    """H(data), I(x_0; x_T) and KL(q(x_T) ‖ π^L) for a sequence distribution, by enumeration."""
    s, length = p.num_states, seqs.shape[1]
    _, qbar = _dense_products(p)
    configs = np.array(list(itertools.product(range(s), repeat=length)))
    lik = np.prod(qbar[-1][seqs[:, None, :], configs[None, :, :]], axis=-1)  # (N, C)
    q_T = probs @ lik
    pi = np.asarray(p.prior_probs())
    pi_L = np.prod(pi[configs], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(probs * np.log(probs))
        mi = np.sum(np.where(lik > 0, probs[:, None] * lik * np.log(lik / q_T[None]), 0.0))
        kl = np.sum(np.where(q_T > 0, q_T * (np.log(q_T) - np.log(pi_L)), 0.0))
    return h, mi, kl


# --------------------------------------------------------------------------------------------
def test_schedules_values_and_errors():
    np.testing.assert_allclose(d3pm_betas("cosine", 10)[:3], [0.01405, 0.03849, 0.06426],
                               atol=1e-5)
    assert d3pm_betas("cosine", 10)[-1] == pytest.approx(0.999)
    np.testing.assert_allclose(d3pm_betas("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1])
    np.testing.assert_allclose(d3pm_betas("linear", 3, 0.1, 0.5), [0.1, 0.3, 0.5])
    assert D3PM("uniform", 5).schedule == "cosine" and D3PM("absorbing", 5).schedule == "jsd"
    p = D3PM("absorbing", 5, 7)
    assert p.num_states == 6 and p.mask_id == 5 and D3PM("uniform", 5).mask_id is None
    assert hash(p) == hash(D3PM("absorbing", 5, 7, "jsd"))  # usable as a static jit argument
    with pytest.raises(ValueError, match="'sqrt'"):
        D3PM("uniform", 3, 4, "sqrt")
    with pytest.raises(ValueError, match="'gaussian'"):
        D3PM("gaussian", 3, 4)
    with pytest.raises(ValueError, match="num_steps"):
        D3PM("uniform", 3, 0)
    with pytest.raises(ValueError, match="beta_min"):
        D3PM("uniform", 3, 4, "linear", beta_min=0.5, beta_max=0.1)
    with pytest.raises(ValueError, match="vocab_size"):
        D3PM("uniform", 1, 4)
    with pytest.raises(ValueError, match="'bogus'"):
        p.reverse_log_probs(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 6)), 1,
                            parameterization="bogus")
    with pytest.raises(ValueError, match="last axis"):
        p.x0_log_probs(jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="integer"):
        p.q_xt_given_x0(jnp.zeros((2,), jnp.int32), 0.5)
    x = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="logits"):
        d3pm_loss(jnp.zeros((2, 3, 4)), x, x, jnp.ones((2,), jnp.int32), p)
    with pytest.raises(ValueError, match="hybrid_lambda"):
        d3pm_loss(jnp.zeros((2, 3, 6)), x, x, jnp.ones((2,), jnp.int32), p, hybrid_lambda=-1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_qbar_is_product_of_one_step_matrices(kind, schedule):
    p = D3PM(kind, 3, 6, schedule)
    q_np, qbar_np = _dense_products(p)
    with jax.enable_x64(True):
        ts = jnp.arange(p.num_steps + 1)
        chex.assert_trees_all_close(p.q_one_step(ts[1:]), q_np[1:], atol=1e-14)
        chex.assert_trees_all_close(p.q_bar(ts), qbar_np, atol=1e-12)
        chex.assert_trees_all_close(p.q_bar_by_product(), qbar_np, atol=1e-12)
        for mats in (p.q_one_step(ts[1:]), p.q_bar(ts)):
            chex.assert_trees_all_close(mats.sum(-1), jnp.ones(mats.shape[:-1]), atol=1e-13)
            assert bool(jnp.all(mats >= 0))
        # ᾱ_t is the diagonal of Q̄_t at a non-mask state
        chex.assert_trees_all_close(p.alpha_bars(), qbar_np[:, 0, 0] - qbar_np[:, 1, 0],
                                    atol=1e-13)
        # the limit: Q̄_T rows approach π (exactly when β_T = 1)
        if schedule != "cosine":
            chex.assert_trees_all_close(p.q_bar(p.num_steps), jnp.tile(p.prior_probs(), (4 if
                                        kind == "absorbing" else 3, 1)), atol=1e-14)
    if kind == "absorbing" and schedule == "jsd":  # q(x_t = mask | x0) = t/T exactly
        np.testing.assert_allclose(qbar_np[:, 0, p.mask_id], np.arange(7) / 6, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_columns_and_forward_probs(kind):
    p = D3PM(kind, 3, 5, "cosine")
    q_np, qbar_np = _dense_products(p)
    s = p.num_states
    with jax.enable_x64(True):
        x = jnp.arange(s)
        for t in range(p.num_steps + 1):
            chex.assert_trees_all_close(p.q_xt_given_x0(x, t), qbar_np[t], atol=1e-13)
            chex.assert_trees_all_close(p.likelihood(x, t), qbar_np[t].T, atol=1e-13)
            if t:
                chex.assert_trees_all_close(p.q_xt_given_xprev(x, t), q_np[t], atol=1e-13)
                chex.assert_trees_all_close(p.likelihood_one_step(x, t), q_np[t].T, atol=1e-13)
        probs = np.random.default_rng(0).dirichlet(np.ones(s), size=(2, 4))
        t = jnp.asarray([1, 4])  # per sequence: prefix-broadcast over the 4 positions
        want = np.einsum("bls,bsj->blj", probs, qbar_np[np.asarray(t)])
        chex.assert_trees_all_close(p.forward_probs(jnp.asarray(probs), t), want, atol=1e-13)
        # per-sequence t equals the per-token broadcast
        x0 = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 4)))
        chex.assert_trees_all_close(p.q_xt_given_x0(x0, t),
                                    p.q_xt_given_x0(x0, jnp.broadcast_to(t[:, None], (2, 4))))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_is_bayes_rule(kind, schedule):
    p = D3PM(kind, 3, 4, schedule)
    q_np, qbar_np = _dense_products(p)
    s, T = p.num_states, p.num_steps
    grid = np.array(list(itertools.product(range(1, T + 1), range(s), range(s))))  # (t, x0, xt)
    t, x0, xt = (jnp.asarray(grid[:, i]) for i in range(3))
    with jax.enable_x64(True):
        post = np.asarray(p.posterior(xt, x0, t))
        hot = jax.nn.one_hot(x0, s, dtype=jnp.float64)
        mix = np.asarray(p.posterior(xt, hot, t, parameterization="mixture"))
        joint = np.asarray(p.posterior(xt, hot, t, parameterization="joint"))
    for i, (tt, a, b) in enumerate(grid):
        norm = qbar_np[tt, a, b]
        if norm == 0:  # impossible pair: zeros by convention
            np.testing.assert_array_equal(post[i], 0.0)
            continue
        bayes = qbar_np[tt - 1, a, :] * q_np[tt, :, b] / norm
        np.testing.assert_allclose(post[i], bayes, atol=1e-12)
        if kind == "absorbing" and a == p.mask_id:
            continue  # x0 = mask is never a data token; the denoiser excludes it
        np.testing.assert_allclose(mix[i], bayes, atol=1e-12)
        np.testing.assert_allclose(joint[i], bayes, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_mixture_vs_joint_and_true_reverse(kind):
    p = D3PM(kind, 3, 5, "cosine")
    q_np, qbar_np = _dense_products(p)
    s, k, T = p.num_states, p.vocab_size, p.num_steps
    rng = np.random.default_rng(2)
    post = jax.jit(p.posterior, static_argnames="parameterization")
    with jax.enable_x64(True):
        # Arbitrary denoiser outputs (no mass on the mask) at every (t, x_t).
        grid = np.array(list(itertools.product(range(1, T + 1), range(s))))  # (t, x_t)
        t, xt = jnp.asarray(grid[:, 0]), jnp.asarray(grid[:, 1])
        p0 = np.zeros((len(grid), s))
        p0[:, :k] = rng.dirichlet(np.ones(k), size=len(grid))
        mix = post(xt, jnp.asarray(p0), t, parameterization="mixture")
        joint = post(xt, jnp.asarray(p0), t, parameterization="joint")
        chex.assert_trees_all_close(mix.sum(-1), jnp.ones(len(grid)), atol=1e-13)
        chex.assert_trees_all_close(joint.sum(-1), jnp.ones(len(grid)), atol=1e-13)
        diff = float(jnp.abs(mix - joint)[t > 1].max())
        if kind == "absorbing":
            assert diff < 1e-13
        else:
            assert diff > 1e-3

        # With p̃ = the true q(x0 | x_t) of a data distribution the mixture is the true reverse
        # q(x_{t-1} | x_t); the joint form needs p̃ ∝ q(x0 | x_t) / q(x_t | x0) instead.
        prior0 = np.zeros(s)
        prior0[:k] = rng.dirichlet(np.ones(k))
        col = qbar_np[grid[:, 0], :, grid[:, 1]]  # q(x_t | x0 = ·): (G, S)
        post0 = prior0 * col
        post0 /= post0.sum(-1, keepdims=True)
        true_rev = (prior0 @ qbar_np[grid[:, 0] - 1]) * q_np[grid[:, 0], :, grid[:, 1]]
        true_rev /= true_rev.sum(-1, keepdims=True)
        chex.assert_trees_all_close(post(xt, jnp.asarray(post0), t, parameterization="mixture"),
                                    true_rev, atol=1e-12)
        opt = np.where(col > 0, post0 / np.where(col > 0, col, 1), 0)
        opt /= opt.sum(-1, keepdims=True)
        chex.assert_trees_all_close(post(xt, jnp.asarray(opt), t, parameterization="joint"),
                                    true_rev, atol=1e-12)


CASES_L1 = [(kind, sched) for kind in KINDS for sched in SCHEDULES]


@pytest.mark.parametrize("kind,schedule", CASES_L1)
def test_exact_bound_with_exact_denoiser_single_token(kind, schedule):
    """L = 1: the bound is tight for the exact denoiser and strictly larger otherwise."""
    p = D3PM(kind, 3, 4, schedule)
    rng = np.random.default_rng(3)
    seqs = np.arange(3)[:, None]  # every real token as a length-1 sequence
    probs = rng.dirichlet(np.ones(3))
    h, mi, kl_T = _entropy_terms(p, seqs, probs)
    table = _exact_denoiser(p, seqs, probs)
    expect = lambda per_token: float(probs @ np.asarray(per_token)[:, 0])  # noqa: E731
    with jax.enable_x64(True):
        x0 = jnp.asarray(seqs)
        exact = expect(_table_bound(table, x0, p))
        np.testing.assert_allclose(exact, h - mi, atol=1e-10)
        prior = np.asarray(d3pm_prior_term(x0, p))[:, 0]
        if np.all(np.isfinite(prior)):
            np.testing.assert_allclose(exact + probs @ prior, h + kl_T, atol=1e-10)
        else:  # absorbing + cosine: β_T < 1 leaves mass off the mask, the prior KL is infinite
            assert kind == "absorbing" and schedule == "cosine" and np.isinf(kl_T)

        # A perturbed denoiser: strictly larger.
        noise = np.random.default_rng(4).normal(size=table.shape)
        assert expect(_table_bound(table + 0.5 * noise, x0, p)) > exact + 1e-4

        # The joint parameterisation with the true posterior: tight for absorbing only; with its
        # own optimum q(x0|x_t)/q(x_t|x0) it is tight for both.
        joint = expect(_table_bound(table, x0, p, "joint"))
        if kind == "absorbing":
            np.testing.assert_allclose(joint, exact, atol=1e-10)
        else:
            assert joint > exact + 1e-4
        opt = _exact_denoiser(p, seqs, probs, joint_optimal=True)
        np.testing.assert_allclose(expect(_table_bound(opt, x0, p, "joint")), h - mi, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_bound_two_tokens(kind):
    """L = 2: tight for a product data distribution (the factorised exact denoiser is then the
    true reverse); for a correlated one the bound exceeds H(data) (β_T = 1, no prior term)."""
    p = D3PM(kind, 2, 3, "jsd")
    seqs = np.array(list(itertools.product(range(2), repeat=2)))  # (4, 2)
    marg = [np.array([0.3, 0.7]), np.array([0.8, 0.2])]
    product = marg[0][seqs[:, 0]] * marg[1][seqs[:, 1]]
    correlated = np.array([0.45, 0.05, 0.05, 0.45])
    with jax.enable_x64(True):
        x0 = jnp.asarray(seqs)
        np.testing.assert_array_equal(np.asarray(d3pm_prior_term(x0, p)), 0.0)
        for probs, tight in ((product, True), (correlated, False)):
            h, mi, kl_T = _entropy_terms(p, seqs, probs)
            assert abs(mi) < 1e-14 and abs(kl_T) < 1e-14  # β_T = 1: x_T ~ π regardless of x_0
            total = _table_bound_jit(_exact_denoiser(p, seqs, probs), x0, p)
            bound = float(probs @ np.asarray(total).sum(-1))
            if tight:
                np.testing.assert_allclose(bound, h, atol=1e-10)
            else:
                assert bound > h + 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_t_loss_averages_to_exact_sum(kind):
    """E_{t ~ U{1..T}, x_t}[d3pm_loss] equals the exact Σ_t E[L_t]: by enumeration, and by Monte
    Carlo with the process's own sampler, for the training loss (t sampled) and for
    `d3pm_bound_all_steps` (every t, x_t sampled). The denoiser is deliberately imperfect."""
    p = D3PM(kind, 3, 4, "cosine" if kind == "uniform" else "jsd")
    s, T = p.num_states, p.num_steps
    seqs = np.arange(3)[:, None]
    probs = np.random.default_rng(5).dirichlet(np.ones(3))
    table = _exact_denoiser(p, seqs, probs)
    table = table + 0.3 * np.random.default_rng(6).normal(size=table.shape)
    loss = jax.jit(functools.partial(d3pm_loss, process=p, hybrid_lambda=0.0))
    with jax.enable_x64(True):
        exact = np.asarray(_table_bound(table, jnp.asarray(seqs), p))[:, 0]
        grid = np.array(list(itertools.product(range(3), range(1, T + 1), range(s))))
        x0_g, t_g, xt_g = (jnp.asarray(grid[:, i]) for i in range(3))
        w = p.q_xt_given_x0(x0_g, t_g)[jnp.arange(len(grid)), xt_g]
        per_token, aux = loss(_lookup(jnp.asarray(table), xt_g[:, None], t_g), x0_g[:, None],
                              xt_g[:, None], t_g)
        avg = jax.ops.segment_sum(jnp.where(w > 0, w * per_token[:, 0], 0.0), x0_g,
                                  num_segments=3) / T
        chex.assert_trees_all_close(avg, exact, atol=1e-10)
        assert set(aux) == {"loss", "vb", "ce", "decoder_frac"}

    # Monte Carlo in float32 (jit): n draws per clean token.
    n = 4000
    tab32 = jnp.asarray(table, jnp.float32)
    fn = lambda xt, t: _lookup(tab32, xt, t)  # noqa: E731
    x0 = jnp.asarray(np.repeat(seqs, n, axis=0))  # (3n, 1)
    key_t, key_x, key_all = jax.random.split(jax.random.key(0), 3)
    t = jax.random.randint(key_t, (3 * n,), 1, T + 1)
    xt = p.sample_xt(key_x, x0, t)
    sampled, _ = loss(fn(xt, t), x0, xt, t)
    total, per_step = jax.jit(lambda k: d3pm_bound_all_steps(k, fn, x0, p))(key_all)
    chex.assert_shape(per_step, (T, 3 * n, 1))
    chex.assert_trees_all_close(per_step.sum(0), total, rtol=1e-6)
    for draws in (sampled, total):
        draws = np.asarray(draws)[:, 0].reshape(3, n)
        se = draws.std(1) / np.sqrt(n)
        assert np.all(np.abs(draws.mean(1) - exact) < 5 * se + 1e-5), (draws.mean(1), exact)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_xt_frequencies(kind):
    p = D3PM(kind, 4, 10, "jsd")
    n = 40000
    x0 = jnp.full((n,), 2, jnp.int32)
    for t in (0, 3, 7, 10):
        xt = p.sample_xt(jax.random.key(t), x0, t)
        assert xt.dtype == x0.dtype
        freq = np.bincount(np.asarray(xt), minlength=p.num_states) / n
        want = np.asarray(p.q_xt_given_x0(jnp.asarray(2), t))
        assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-12), (t, freq)
    prior = p.sample_prior(jax.random.key(0), (3, 5))
    chex.assert_shape(prior, (3, 5))
    if kind == "absorbing":
        assert bool(jnp.all(prior == p.mask_id))


@pytest.mark.parametrize("kind", KINDS)
def test_hybrid_term_and_mask_logit(kind):
    p = D3PM(kind, 5, 8)
    s = p.num_states
    rng = np.random.default_rng(7)
    b, length = 3, 4
    x0 = jnp.asarray(rng.integers(0, 5, (b, length)))
    t = jnp.asarray([1, 4, 8])
    xt = p.sample_xt(jax.random.key(3), x0, t)
    logits = jnp.asarray(rng.normal(size=(b, length, s)) * 2, jnp.float32)
    loss = jax.jit(d3pm_loss, static_argnames="process")
    base, _ = loss(logits, x0, xt, t, p, hybrid_lambda=0.0)
    hyb, aux = loss(logits, x0, xt, t, p, hybrid_lambda=0.25)
    lg = np.asarray(logits, np.float64)
    if kind == "absorbing":
        lg = lg[..., :5]  # the mask is never a prediction of x0
    ce = -(np.take_along_axis(lg, np.asarray(x0)[..., None], -1)[..., 0]
           - np.log(np.exp(lg).sum(-1)))
    np.testing.assert_allclose(hyb - base, 0.25 * ce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["ce"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["decoder_frac"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(aux["vb"], base.mean(), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(hyb)))
    bad = loss(logits, x0, xt, jnp.asarray([0, 4, 9]), p)[0]  # steps outside [1, T] give NaN
    assert bool(jnp.all(jnp.isnan(bad[0]))) and bool(jnp.all(jnp.isnan(bad[2])))
    assert bool(jnp.all(jnp.isfinite(bad[1])))
    if kind == "absorbing":
        changed = logits.at[..., p.mask_id].set(50.0)
        chex.assert_trees_all_close(loss(changed, x0, xt, t, p)[0], loss(logits, x0, xt, t, p)[0],
                                    rtol=1e-6)
        chex.assert_trees_all_close(loss(logits[..., :5], x0, xt, t, p)[0],
                                    loss(logits, x0, xt, t, p)[0], rtol=1e-6)
        # the loss at t = 1 is the decoder term: -log p̃(x0) at masked positions, 0 elsewhere
        vb1, _ = loss(logits, x0, xt, jnp.ones((b,), jnp.int32), p, hybrid_lambda=0.0)
        want = np.where(np.asarray(xt) == p.mask_id, ce, 0.0) * p.num_steps
        np.testing.assert_allclose(vb1, want, rtol=1e-5, atol=1e-5)


def test_gradients_finite_and_float32_matches_float64():
    """Both kinds, every schedule and parameterisation, edge steps t = 1 and t = T included, with a
    confident (±80 logits) position: finite values and gradients, no gradient into the mask logit,
    float32 within 1e-4 of float64. (Uniform over 6 tokens and absorbing over 5 share S = 6, so the
    eager primitives compile once.)"""
    rng = np.random.default_rng(8)
    b, length, s = 4, 6, 6
    x0 = jnp.asarray(rng.integers(0, 5, (b, length)))
    t = jnp.asarray([1, 2, 5, 6])
    logits = jnp.asarray(rng.normal(size=(b, length, s)) * 4, jnp.float32)
    logits = logits.at[0, 0].set(jnp.asarray([80.0, -80, 0, 0, 0, 0]))
    for kind, schedule, parameterization in itertools.product(KINDS, SCHEDULES,
                                                              ["mixture", "joint"]):
        p = D3PM(kind, 6 if kind == "uniform" else 5, 6, schedule)
        xt = p.sample_xt(jax.random.key(4), x0, t)

        def f(lg):
            per, _ = d3pm_loss(lg, x0, xt, t, p, parameterization=parameterization)
            return per.sum()

        case = (kind, schedule, parameterization)
        val, grad = jax.value_and_grad(f)(logits)
        assert np.isfinite(float(val)), case
        assert bool(jnp.all(jnp.isfinite(grad))), case
        if kind == "absorbing":
            assert bool(jnp.all(grad[..., p.mask_id] == 0)), case
        with jax.enable_x64(True):
            val64 = f(logits.astype(jnp.float64))
        np.testing.assert_allclose(float(val), float(val64), rtol=1e-4, err_msg=str(case))


def test_prior_kl():
    with jax.enable_x64(True):
        for p in (D3PM("uniform", 4, 5, "cosine"), D3PM("uniform", 4, 5, "linear", 0.01, 0.3)):
            x0 = jnp.arange(4)
            q = p.q_xt_given_x0(x0, p.num_steps)
            direct = jnp.sum(q * jnp.log(q / p.prior_probs()), -1)
            chex.assert_trees_all_close(p.prior_kl(x0), direct, atol=1e-13)
            assert float(direct[0]) > 0
        assert np.all(np.asarray(D3PM("uniform", 4, 5, "jsd").prior_kl(jnp.arange(4))) == 0)
        ab = D3PM("absorbing", 4, 5, "cosine")
        np.testing.assert_array_equal(ab.prior_kl(jnp.asarray([0, 3, 4])), [np.inf, np.inf, 0.0])
        np.testing.assert_array_equal(D3PM("absorbing", 4, 5).prior_kl(jnp.arange(4)), 0.0)
