"""Validation numbers with their standard error, low-variance time schemes, a sized evaluation.

The model in most tests is the exact denoiser of a tiny enumerable distribution p0
(`oracles.exact_x0_posterior`) inside the real MDLM method, so the estimand is known: the masked
NELBO with the exact denoiser is −log p0(x0) (test_elbo_identities), and its mean over x0 ~ p0
is the entropy H(p0) (up to the prior term at α(1) = ε, here 1e-3 and negligible).

  * the reported standard error falls as 1/√n and matches the spread of independent estimates;
  * iid, stratified and quadrature times agree with each other and with H(p0) within their
    errors, and at equal cost (same forward passes) stratified and quadrature have a smaller
    spread than plain Monte Carlo;
  * the estimate is a deterministic function of the seed (the batch index keys it);
  * the Markov source's reported entropy is H(X_1..X_L) / L of the chain, by brute force;
  * bad scheme / sample counts are a ConfigError naming the key; evaluation lines read
    `val/loss 0.669 ± 0.004 (4096 seq × 1 t)`; a target-sized validation stops where it should.
"""
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles, registry
from dlm_jax.config import ConfigError, DataConfig
from dlm_jax.evals.validation import (Validation, batch_moments, combine_moments,
                                      format_metrics, source_entropy)
from dlm_jax.methods import Masked
from dlm_jax.processes import corruption, schedules, transitions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

V, L, EPS = 2, 8, 1e-3
ROWS = 512            # sequences per batch


class _Oracle:
    """The exact denoiser called like a DiT: raw outputs whose SUBS log-probs are
    log p0(x0^i | x_t)."""

    def __init__(self, joint, process):
        self.joint, self.process = joint, process

    def __call__(self, xt, sigma, *, mask=None, deterministic=True, rngs=None):
        del mask, deterministic, rngs
        post = oracles.exact_x0_posterior(self.joint, self.process, xt, sigma)
        return jnp.log(post + 1e-30)


@pytest.fixture(scope="module")
def problem():
    process = transitions.make_process("absorbing", V)
    method = Masked(process=process, schedule=schedules.LogLinear(EPS), seq_len=L,
                    block_size=L, sampling_eps=EPS)
    joint = oracles.random_joint(3, V, L)
    p = joint.reshape(-1)
    entropy = float(-(p[p > 0] @ np.log(p[p > 0])))
    model = _Oracle(jnp.asarray(joint, jnp.float32), process)
    seqs = np.asarray(oracles.all_sequences(V, L))
    x0 = seqs[np.random.default_rng(0).choice(len(p), size=8 * ROWS, p=p)]
    return method, entropy, x0, model


@pytest.fixture(scope="module")
def estimate(problem):
    """estimate(batches, times, t_samples, seed) -> (R̂, SE, n) over the first `batches` batches
    of ROWS sequences, batch i keyed fold_in(key(seed), i) (one compile per scheme)."""
    method, _, x0, model = problem
    cache = {}

    def moments(x, key, t_samples, times):
        if (t_samples, times) not in cache:
            def f(x, key):
                sums, tokens, _ = method.sequence_loss(model, {"tokens": x}, key,
                                                       t_samples=t_samples, times=times)
                return batch_moments(sums, tokens)
            cache[(t_samples, times)] = jax.jit(f)
        return cache[(t_samples, times)](x, key)

    def run(batches, times, t_samples, seed):
        rows = [moments(jnp.asarray(x0[i * ROWS:(i + 1) * ROWS]),
                        jax.random.fold_in(jax.random.key(seed), i), t_samples, times)
                for i in range(batches)]
        return combine_moments(jax.device_get(rows))
    return run


def test_standard_error_shrinks_as_one_over_sqrt_n_and_is_honest(problem, estimate):
    """SE(4n)/SE(n) ≈ 1/2 (within 0.35..0.65: the 1/t weight makes the values heavy-tailed);
    and the reported SE matches the spread of 12 independent estimates over disjoint data (iid
    times: every sequence's draws independent)."""
    _, se_n, n = estimate(2, "iid", 1, 0)
    _, se_4n, n4 = estimate(8, "iid", 1, 0)
    assert (n, n4) == (2 * ROWS, 8 * ROWS)
    print(f"SE at n={n}: {se_n:.5f}, at 4n={n4}: {se_4n:.5f}")
    assert 0.35 < se_4n / se_n < 0.65, (se_n, se_4n)  # 1/√n: 0.5 (1/n would be 0.25)
    ests = [estimate(1, "iid", 1, s) for s in range(12)]
    spread = np.std([e[0] for e in ests], ddof=1)
    reported = np.mean([e[1] for e in ests])
    print(f"spread of 12 estimates {spread:.5f}, mean reported SE {reported:.5f}")
    # 12 estimates: the sample sd is within ±45% of the truth with high probability.
    assert 0.55 < spread / reported < 1.45, (spread, reported)


def test_schemes_agree_with_plain_mc_and_the_exact_entropy(problem, estimate):
    """Plain MC (one time per sequence) and stratified / quadrature (4 per sequence) over 4096
    sequences estimate H(p0) / L within 4 of their SE, and agree with each other within 4
    combined SE."""
    _, entropy, _, _ = problem
    out = {s: estimate(8, s, 1 if s == "iid" else 4, 1)
           for s in ("iid", "stratified", "quadrature")}
    print("H(p0)/L", entropy / L, "scheme: (estimate, SE, n)", out)
    for s, (est, se, n) in out.items():
        assert n == 8 * ROWS
        assert abs(est - entropy / L) < 4 * se + 1e-3, (s, est, se, entropy / L)
        diff = abs(est - out["iid"][0])
        assert diff < 4 * np.hypot(se, out["iid"][1]) + 1e-9, (s, out)


class _Confident:
    """A tiny model whose SUBS prediction of token 0 is the more confident the fewer tokens are
    masked: p(0) = sigmoid(4(1 − m/L) − 1) at every masked position, m the masked count. On the
    all-zeros data its NELBO integrand depends strongly on t (as a trained LM's does), and its
    exact value is a 1-D integral (`_confident_nelbo`)."""

    def __call__(self, xt, sigma, *, mask=None, deterministic=True, rngs=None):
        del sigma, mask, deterministic, rngs
        frac = (xt == 2).mean(-1, keepdims=True)
        logit = 4.0 * (1.0 - frac) - 1.0
        zero = jnp.zeros(xt.shape, jnp.float32)
        return jnp.stack([jnp.broadcast_to(logit, xt.shape), zero, zero], -1)


def _confident_nelbo(length, eps, nodes=4000):
    """Exact NELBO per token of `_Confident` on x0 = 0: E_{t~U[eps,1]} (1/t) E_m[m · CE(m)] / L
    with m ~ Binomial(L, t) (LogLinear(0): move chance t, weight 1/t), by a midpoint rule."""
    from scipy.stats import binom
    t = eps + (np.arange(nodes) + 0.5) * (1.0 - eps) / nodes
    m = np.arange(length + 1)
    ce = np.logaddexp(0.0, -(4.0 * (1.0 - m / length) - 1.0))
    inner = (binom.pmf(m[None], length, t[:, None]) * m * ce).sum(-1) / t
    return inner.mean() / length


def test_stratified_and_quadrature_have_smaller_error_at_equal_cost():
    """`_Confident` on 32 all-zero sequences of 64 tokens, 4 draws per sequence under each
    scheme (the same forward passes), 64 seeds: every scheme's mean is the exact integral
    within its error; the reported SE of iid is its true spread, stratified's reported SE
    over-states its (smaller) spread, and quadrature's spread is the smallest."""
    Lc, B, R, seeds = 64, 32, 4, 64
    method = Masked(process=transitions.make_process("absorbing", 2),
                    schedule=schedules.LogLinear(0.0), seq_len=Lc, block_size=Lc,
                    sampling_eps=EPS)
    exact = _confident_nelbo(Lc, EPS)
    batch = {"tokens": jnp.zeros((B, Lc), jnp.int32)}
    out = {}
    for times in corruption.TIME_SCHEMES:
        def draw(key, times=times):
            return batch_moments(*method.sequence_loss(_Confident(), batch, key, t_samples=R,
                                                       times=times)[:2])
        run = jax.jit(draw, static_argnames="times")
        per_seed = jax.device_get([run(jax.random.fold_in(jax.random.key(3), i))
                                   for i in range(seeds)])
        ests = np.asarray([combine_moments([r])[0] for r in per_seed])
        reported = float(np.mean([combine_moments([r])[1] for r in per_seed]))
        spread = float(ests.std(ddof=1))
        out[times] = (float(ests.mean()), spread, reported)
        assert abs(ests.mean() - exact) < 4 * spread / np.sqrt(seeds) + 1e-4, (times, out, exact)
    print("exact", exact, "scheme: (mean, spread, reported SE)", out)
    iid, strat, quad = out["iid"], out["stratified"], out["quadrature"]
    assert 0.7 < iid[1] / iid[2] < 1.3, out             # iid: the reported SE is honest
    assert strat[1] < 0.8 * iid[1] and strat[2] > strat[1], out   # conservative for stratified
    assert quad[1] < 0.8 * iid[1], out
    assert 0.7 < quad[1] / quad[2] < 1.3, out           # independent sequences: honest


def test_estimates_are_deterministic_given_the_seed(estimate):
    a, b, c = estimate(1, "quadrature", 4, 7), estimate(1, "quadrature", 4, 7), \
        estimate(1, "quadrature", 4, 8)
    assert a == b and a[0] != c[0]


def test_evaluation_times_are_marginally_uniform():
    """Every scheme's times lie in [t_min, t_max] and each element's are U[t_min, t_max]
    (mean and variance of 20000 draws); quadrature times of an element are evenly spaced."""
    for scheme in corruption.TIME_SCHEMES:
        t = np.asarray(corruption.evaluation_times(jax.random.key(0), (5000,), scheme=scheme,
                                                   samples=4, t_min=0.2, t_max=1.0))
        assert t.shape == (4, 5000) and t.min() >= 0.2 and t.max() <= 1.0
        np.testing.assert_allclose([t.mean(), t.var()], [0.6, 0.8 ** 2 / 12], rtol=0.02)
    t = np.sort(np.asarray(corruption.evaluation_times(
        jax.random.key(1), (3,), scheme="quadrature", samples=5, t_min=0.0, t_max=1.0)), 0)
    np.testing.assert_allclose(np.diff(t, axis=0), 0.2, atol=1e-6)


def test_ratio_standard_error_of_unequal_lengths():
    """combine_moments over several batches = the ratio estimator's formula on the pooled
    sequences, computed directly."""
    rng = np.random.default_rng(0)
    c = rng.integers(1, 30, 300).astype(np.float32)
    y = (c * 0.7 + rng.normal(0, 2, 300)).astype(np.float32)
    rows = [jax.device_get(batch_moments(jnp.asarray(y[i:i + 100]), jnp.asarray(c[i:i + 100])))
            for i in range(0, 300, 100)]
    est, se, n = combine_moments(rows)
    r = y.sum() / c.sum()
    want = np.sqrt(((y - r * c) ** 2).sum() * 300 / 299) / c.sum()
    np.testing.assert_allclose([est, se], [r, want], rtol=1e-4)
    assert n == 300


def _brute_force_entropy(chain, length):
    """H(X_1..X_L) / L by enumerating every sequence, with the stationary k-gram distribution
    solved here from the chain's transition table."""
    V_, k = chain.vocab, chain.order
    S = V_ ** k
    M = np.zeros((S, S))
    for s in range(S):
        for y in range(V_):
            M[s, (s % (S // V_)) * V_ + y] += chain.transition[s, y]
    w, vecs = np.linalg.eig(M.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    pi = pi / pi.sum()
    h = 0.0
    for x in itertools.product(range(V_), repeat=length):
        s = 0
        for tok in x[:k]:
            s = s * V_ + tok
        p = pi[s]
        for tok in x[k:]:
            p *= chain.transition[s, tok]
            s = (s % (S // V_)) * V_ + tok
        h -= p * np.log(p)
    return h / length


def test_markov_source_entropy_is_the_exact_segment_entropy():
    from dlm_jax.data.pipeline import markov_chain
    data = DataConfig(source="markov", seq_len=6, markov_vocab=3, markov_order=2, markov_seed=4)
    chain = markov_chain(3, 2, 4, data.markov_concentration)
    np.testing.assert_allclose(source_entropy(data), _brute_force_entropy(chain, 6), rtol=1e-9)
    assert source_entropy(DataConfig(source="stdlib")) is None


def test_config_errors_name_the_key():
    cfg = tiny.get_config("mdlm")
    cfg.train.eval_times = "sobol"
    with pytest.raises(ConfigError, match="train.eval_times"):
        registry.build(cfg)
    cfg = tiny.get_config("mdlm")
    cfg.train.eval_t_samples = 0
    with pytest.raises(ConfigError, match="train.eval_t_samples"):
        registry.build(cfg)


def test_format_line():
    line = format_metrics({"val/loss": 0.6691, "val/loss_se": 0.0043, "val/sequences": 4096,
                           "val/t_samples": 1, "val/ppl": 1.952, "val/source_entropy": 0.634})
    assert line.startswith("val/loss 0.6691 ± 0.0043 (4096 seq × 1 t) | val/ppl 1.952")
    assert "val/source_entropy 0.634" in line
    assert format_metrics({"val/loss": 2.0, "val/loss_se": 0.1, "val/sequences": 8,
                           "val/t_samples": 0}) == "val/loss 2 ± 0.1 (8 seq)"


def test_validation_reports_error_counts_entropy_and_sizes_to_a_target():
    """The trainer's validation on a tiny MDLM: SE, counts and the Markov entropy; with a target
    SE it adds batches up to its cap (a tiny target) or stays at the pilot (a loose one)."""
    from flax import nnx

    from dlm_jax.evals import validation_batches
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram
    cfg = tiny.get_config("mdlm")
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.seq_len, cfg.train.batch_size = 16, 8
    cfg.train.eval_t_samples = 2
    exp = registry.build(cfg, jax.devices()[:1])
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    params = jax.device_put(params, exp.param_shardings)
    out, _ = Validation(exp, program.eval_step, 2)(params, validation_batches(exp))
    assert (out["val/sequences"], out["val/t_samples"]) == (16, 2)
    assert 0 < out["val/loss_se"] < 1 and out["val/source_entropy"] < out["val/loss"]
    tight = Validation(exp, program.eval_step, 2, target_se=1e-6, max_batches=5)
    assert tight(params, validation_batches(exp))[0]["val/sequences"] == 40
    loose = Validation(exp, program.eval_step, 2, target_se=10.0, max_batches=5)
    assert loose(params, validation_batches(exp))[0]["val/sequences"] == 16
