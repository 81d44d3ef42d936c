"""Exact ELBO identities on a tiny sequence space, by enumeration of every sequence.

Setting: vocabulary ≤ 4 states, length L ≤ 3, a random known data distribution p0 over
sequences. The forward process acts independently per token, so the exact marginal is
p_t = p0 · expm(σ̄(t) G), where G is the Hamming-1 generator over the whole sequence space (sum
over positions of the per-token Q, row convention) and expm(σ̄ G) = ⊗_i expm(σ̄ Q) (checked
against scipy's expm below). From p_t every exact quantity follows:
The exact kernels, marginals, scores and denoisers come from `dlm_jax.oracles`.
  * SEDD: exact scores s_{i,y}(x) = p_t(x with x_i ← y) / p_t(x); then per x0
        ∫_{t0}^1 E_{x_t|x0} Σ_i DSE_i dt + KL(q_1(·|x0) ‖ p_1) = KL(q_{t0}(·|x0) ‖ p_{t0}),
    which is −log p0(x0) when σ̄(t0) = 0 (log-linear, t0 = 0).
  * MDLM: the exact denoiser p(x0_i | x_t) (posterior marginal); with SUBS the masked NELBO
    integrates to the same right-hand side. It equals the SEDD-absorbing integrand pointwise in t.

The prior term and t → 1 (why the p_1 above is the process marginal, not the limit):
  * LogLinear(eps > 0): alpha(1) = eps, q_1(·|x0) keeps each token with probability eps, so the
    KL against the all-mask limit is infinite. We use the exact process marginal p_1 as the base
    (a "leaky" base in SEDD's words); KL(q_1(·|x0) ‖ p_1) is finite and is included.
  * LogLinear(eps = 0): alpha(1) = 0, q_1 = p_1 = all-mask, the prior term is exactly 0
    (σ̄(1) = ∞; quadrature nodes never touch t = 1).
  * Geometric(σmin, σmax): σ̄(1) = σmax; the prior term vanishes only as σmax → ∞, so we
    include KL(q_1(·|x0) ‖ p_1) against the exact marginal (≈ e^{−σmax}-small against uniform).
Bounds with a perturbed model are strictly larger on average over x0 (per x0 they need not be:
only the p0-average of the objective is minimised by the truth).

Quadrature: Gauss–Legendre in t. For absorbing + log-linear the exact-score integrand is a
polynomial in t of degree L − 1 (the 1/t weight cancels the O(t) masking probability), so a
few nodes are exact; we still use t = u² (dt = 2u du) to be safe near t = 0, which keeps the
integrand smooth even for perturbed models. For geometric the integrand is smooth in t (t is
linear in log σ̄).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from dlm_jax import oracles
from dlm_jax.objectives import masked_nelbo, score_entropy, subs_log_probs
from dlm_jax.processes.schedules import Geometric, LogLinear
from dlm_jax.processes.transitions import Absorbing, Uniform


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------------------------------------------
# Enumeration helpers (numpy float64).
# ------------------------------------------------------------------------------------------------
class Space:
    """All S^L sequences (`oracles.all_sequences`), their indices and Hamming-1 neighbours."""

    def __init__(self, num_states: int, length: int):
        self.S, self.L = num_states, length
        self.seqs = np.asarray(oracles.all_sequences(num_states, length), np.int64)
        self.n = len(self.seqs)
        self.place = num_states ** np.arange(length - 1, -1, -1)  # (L,)
        idx = self.seqs @ self.place
        assert (idx == np.arange(self.n)).all()
        assert (np.asarray(oracles.sequence_index(self.seqs, num_states)) == idx).all()
        y = np.arange(num_states)
        # nb[x, i, y] = index of x with x_i ← y.
        self.nb = (idx[:, None, None]
                   + (y[None, None, :] - self.seqs[:, :, None]) * self.place[None, :, None])

    def generator(self, q: np.ndarray) -> np.ndarray:
        """The Hamming-1 generator G (n, n) of independent per-token chains with rates q."""
        g = np.zeros((self.n, self.n))
        for x in range(self.n):
            for i in range(self.L):
                for y in range(self.S):
                    g[x, self.nb[x, i, y]] += q[self.seqs[x, i], y]
        return g


def _random_p0(space: Space, support: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.zeros(space.n)
    p[support] = rng.dirichlet(np.ones(len(support)))
    return p


def _kl_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(a_k ‖ b) for each row a_k of a (n0, n) against b (n,), with 0 log 0 = 0."""
    pos = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pos, a * (np.log(np.where(pos, a, 1.0)) - np.log(b)), 0.0).sum(-1)


def _gauss_legendre_t(num: int, square: bool):
    """Nodes t_k ∈ (0, 1) and weights for ∫_0^1 f(t) dt, optionally through t = u²."""
    u, w = np.polynomial.legendre.leggauss(num)
    u, w = 0.5 * (u + 1.0), 0.5 * w
    if square:
        return u ** 2, w * 2.0 * u
    return u, w


def _marginals(process, space: Space, p0: np.ndarray, sigma_bar: np.ndarray):
    """K[t, x0, xt] = q(xt | x0) and p_t = p0 K, for every node: (T, n, n), (T, n)."""
    seqs = jnp.asarray(space.seqs, jnp.int32)
    k = np.asarray(jax.vmap(lambda sb: oracles.transition_table(process, seqs, sb))(
        jnp.asarray(sigma_bar)))
    return k, np.einsum("x,txy->ty", p0, k)


def _joint(space: Space, p0: np.ndarray) -> jnp.ndarray:
    """p0 (n,) as the joint table (S,)*L of `dlm_jax.oracles`."""
    return jnp.asarray(p0.reshape((space.S,) * space.L))


def _sedd_integrand(process, space, support, k, p0, sigma_bar, sigma, perturb: bool,
                    method: str = "auto"):
    """∫-integrand per node and x0: Σ_xt q(xt|x0) Σ_i DSE_i(xt), shape (T, n0)."""
    t_num = len(sigma_bar)
    joint, seqs = _joint(space, p0), jnp.asarray(space.seqs, jnp.int32)
    log_score = np.asarray(jax.vmap(lambda sb: oracles.exact_log_ratios(joint, process, seqs, sb))(
        jnp.asarray(sigma_bar)))  # (T, n, L, S): exact log p_t(x with x_i ← y) / p_t(x)
    if perturb:
        phase = (np.arange(space.n)[:, None, None] * 1.7 + np.arange(space.L)[None, :, None] * 2.3
                 + np.arange(space.S)[None, None, :] * 0.9)
        log_score = log_score + np.log1p(0.1 * np.sin(phase))[None]
    # Positions where x_t itself is impossible (absorbing at t > 0 never; kept for safety).
    log_score = np.nan_to_num(log_score, nan=0.0, neginf=-50.0, posinf=50.0)
    n0 = len(support)
    ls = np.broadcast_to(log_score[:, None], (t_num, n0, space.n, space.L, space.S))
    xt = np.broadcast_to(space.seqs[None, None], (t_num, n0, space.n, space.L))
    x0 = np.broadcast_to(space.seqs[support][None, :, None], (t_num, n0, space.n, space.L))
    sb = np.broadcast_to(sigma_bar[:, None, None], (t_num, n0, space.n))
    sg = np.broadcast_to(sigma[:, None, None], (t_num, n0, space.n))
    flat = lambda a, tail: jnp.asarray(a.reshape((-1,) + tail))  # noqa: E731
    per, _ = jax.jit(functools.partial(score_entropy, process, method=method))(
        flat(ls, (space.L, space.S)), flat(xt, (space.L,)), flat(x0, (space.L,)),
        flat(sb, ()), flat(sg, ()))
    per = np.asarray(per).reshape(t_num, n0, space.n, space.L).sum(-1)
    q = k[:, support, :]  # (T, n0, n)
    return np.where(q > 0, q * per, 0.0).sum(-1)


def _sedd_bound(process, schedule, space, support, p0, nodes, square, perturb=False,
                method="auto"):
    t, w = _gauss_legendre_t(nodes, square)
    sigma_bar = np.asarray(schedule.sigma_bar(jnp.asarray(t)))
    sigma = np.asarray(schedule.sigma(jnp.asarray(t)))
    k, _ = _marginals(process, space, p0, sigma_bar)
    integrand = _sedd_integrand(process, space, support, k, p0, sigma_bar, sigma, perturb,
                                method)
    integral = (w[:, None] * integrand).sum(0)  # (n0,)
    k1, p1 = _marginals(process, space, p0, np.asarray(schedule.sigma_bar(jnp.asarray([1.0]))))
    prior = _kl_rows(k1[0][support], p1[0])
    return integral, prior


def _rhs(process, schedule, space, support, p0):
    k0, pt0 = _marginals(process, space, p0, np.asarray(schedule.sigma_bar(jnp.asarray([0.0]))))
    return _kl_rows(k0[0][support], pt0[0])


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------
def test_kronecker_marginal_equals_expm_of_hamming_generator():
    proc = Absorbing(2)
    space = Space(proc.num_states, 2)
    q = np.asarray(proc.rate_matrix())
    g = space.generator(q)
    np.testing.assert_allclose(g.sum(1), 0.0, atol=1e-12)
    for sb in (0.3, 2.0):
        k, _ = _marginals(proc, space, np.full(space.n, 1.0 / space.n), np.array([sb]))
        np.testing.assert_allclose(k[0], expm(sb * g), atol=1e-12)
    proc = Uniform(3)
    space = Space(3, 2)
    g = space.generator(np.asarray(proc.rate_matrix()))
    k, _ = _marginals(proc, space, np.full(space.n, 1.0 / space.n), np.array([0.7]))
    np.testing.assert_allclose(k[0], expm(0.7 * g), atol=1e-12)


CASES = {
    # name: (process, schedule, length, Gauss-Legendre nodes, substitute t = u²)
    "absorbing-loglinear": (Absorbing(3), LogLinear(1e-3), 3, 24, True),
    "absorbing-loglinear-eps0": (Absorbing(2), LogLinear(0.0), 3, 24, True),
    "uniform-geometric": (Uniform(3), Geometric(1e-3, 6.0), 3, 48, False),
}


def _support(proc, space):
    if isinstance(proc, Absorbing):
        return np.flatnonzero((space.seqs != proc.mask_id).all(1))
    return np.arange(space.n)


@pytest.mark.parametrize("name", list(CASES))
def test_sedd_elbo_identity_exact_scores(name):
    proc, sched, length, nodes, square = CASES[name]
    space = Space(proc.num_states, length)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=len(name))
    integral, prior = _sedd_bound(proc, sched, space, support, p0, nodes, square)
    rhs = _rhs(proc, sched, space, support, p0)
    if float(sched.sigma_bar(0.0)) == 0.0:  # log-linear: the RHS is the data NLL
        np.testing.assert_allclose(rhs, -np.log(p0[support]), rtol=1e-12)
    if isinstance(sched, LogLinear) and sched.eps == 0.0:
        np.testing.assert_allclose(prior, 0.0, atol=1e-12)
    # Per x0 and on average (for log-linear the average is the data entropy H(p0)). The
    # quadrature is converged to ~1e-13 here, so 1e-8 leaves a wide margin.
    np.testing.assert_allclose(integral + prior, rhs, atol=1e-8, rtol=0)
    np.testing.assert_allclose(p0[support] @ (integral + prior), p0[support] @ rhs, atol=1e-8)


@pytest.mark.parametrize("name", ["absorbing-loglinear", "uniform-geometric"])
def test_sedd_bound_with_perturbed_scores_is_larger(name):
    proc, sched, length, nodes, square = CASES[name]
    space = Space(proc.num_states, length)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=len(name))
    exact, _ = _sedd_bound(proc, sched, space, support, p0, nodes, square)
    pert, _ = _sedd_bound(proc, sched, space, support, p0, nodes, square, perturb=True)
    gap = p0[support] @ (pert - exact)
    assert gap > 1e-4, gap


def test_sedd_generic_path_gives_the_same_identity():
    """The generic (transition/rate_into) path reproduces the identity too (absorbing, L = 2)."""
    proc, sched = Absorbing(2), LogLinear(1e-3)
    space = Space(proc.num_states, 2)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=3)
    integral, prior = _sedd_bound(proc, sched, space, support, p0, 16, True, method="generic")
    np.testing.assert_allclose(integral + prior, -np.log(p0[support]), atol=1e-8, rtol=0)


# --- MDLM ---------------------------------------------------------------------------------------
def _mdlm_bound(proc, sched, space, support, p0, nodes, perturb=False):
    t, w = _gauss_legendre_t(nodes, True)
    sigma_bar = np.asarray(sched.sigma_bar(jnp.asarray(t)))
    k, _ = _marginals(proc, space, p0, sigma_bar)  # (T, n, n)
    m, s_num, l_num = proc.mask_id, space.S, space.L
    # Exact posterior marginals p(x0_i = s | xt) ∝ Σ p0(x0) q(xt | x0): (T, xt, L, S).
    joint, seqs = _joint(space, p0), jnp.asarray(space.seqs, jnp.int32)
    denoiser = np.asarray(jax.vmap(
        lambda sb: oracles.exact_x0_posterior(joint, proc, seqs, sb))(jnp.asarray(sigma_bar)))
    with np.errstate(divide="ignore"):
        logits = np.log(denoiser)
    logits = np.maximum(logits, -1e3)  # finite stand-in for log 0 (SUBS handles the rest)
    if perturb:
        phase = (np.arange(space.n)[:, None, None] * 1.3 + np.arange(l_num)[None, :, None] * 0.7
                 + np.arange(s_num)[None, None, :] * 2.1)
        logits = logits + 0.3 * np.sin(phase)[None]
    t_num, n0 = len(t), len(support)
    xt = np.broadcast_to(space.seqs[None], (t_num, space.n, l_num)).reshape(-1, l_num)
    logp = subs_log_probs(jnp.asarray(logits.reshape(-1, l_num, s_num)), jnp.asarray(xt), m)
    logp = np.asarray(logp).reshape(t_num, 1, space.n, l_num, s_num)
    logp = np.broadcast_to(logp, (t_num, n0, space.n, l_num, s_num))
    x0 = np.broadcast_to(space.seqs[support][None, :, None], (t_num, n0, space.n, l_num))
    xt_b = np.broadcast_to(space.seqs[None, None], (t_num, n0, space.n, l_num))
    tt = np.broadcast_to(t[:, None, None], (t_num, n0, space.n))
    per, _ = masked_nelbo(jnp.asarray(logp.reshape(-1, l_num, s_num)),
                          jnp.asarray(x0.reshape(-1, l_num)), jnp.asarray(xt_b.reshape(-1, l_num)),
                          jnp.asarray(tt.reshape(-1)), sched, m)
    per = np.asarray(per).reshape(t_num, n0, space.n, l_num).sum(-1)
    q = k[:, support, :]
    integrand = np.where(q > 0, q * per, 0.0).sum(-1)  # (T, n0)
    integral = (w[:, None] * integrand).sum(0)
    k1, p1 = _marginals(proc, space, p0, np.asarray(sched.sigma_bar(jnp.asarray([1.0]))))
    prior = _kl_rows(k1[0][support], p1[0])
    return integral, prior


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2])
def test_mdlm_nelbo_identity_exact_denoiser(eps):
    proc, sched = Absorbing(3), LogLinear(eps)
    space = Space(proc.num_states, 3)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=7)
    integral, prior = _mdlm_bound(proc, sched, space, support, p0, nodes=12)
    if eps == 0.0:
        np.testing.assert_allclose(prior, 0.0, atol=1e-12)
    else:
        assert (prior > 0).all()
    np.testing.assert_allclose(integral + prior, -np.log(p0[support]), atol=1e-8, rtol=0)
    entropy = -(p0[support] @ np.log(p0[support]))
    np.testing.assert_allclose(p0[support] @ (integral + prior), entropy, atol=1e-8)


def test_mdlm_nelbo_with_perturbed_denoiser_is_larger():
    proc, sched = Absorbing(3), LogLinear(0.0)
    space = Space(proc.num_states, 3)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=7)
    exact, _ = _mdlm_bound(proc, sched, space, support, p0, nodes=12)
    pert, _ = _mdlm_bound(proc, sched, space, support, p0, nodes=12, perturb=True)
    assert p0[support] @ (pert - exact) > 1e-3


def test_mdlm_integrand_equals_sedd_absorbing_integrand():
    """Exact denoiser (MDLM) and exact scores (SEDD) give the same integrand at every t."""
    proc, sched = Absorbing(2), LogLinear(1e-3)
    space = Space(proc.num_states, 2)
    support = _support(proc, space)
    p0 = _random_p0(space, support, seed=11)
    a, _ = _mdlm_bound(proc, sched, space, support, p0, nodes=8)
    b, _ = _sedd_bound(proc, sched, space, support, p0, 8, True)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
