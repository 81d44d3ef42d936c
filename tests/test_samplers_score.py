"""SEDD (Lou et al. 2024) and CTMC (Campbell et al. 2022) samplers driven by exact oracles.

The denoiser is the exact answer for a known joint distribution over V = 3 tokens and L = 3
positions (`oracles.exact_log_ratios` / `exact_x0_posterior`), so the only error left is the
samplers' time discretisation plus Monte Carlo noise. Each process gets one jitted program that
draws every sample set its tests need (one compilation per process keeps the file fast).

Bounds. With N samples over K outcomes a perfect sampler's empirical total variation (TV) is not 0:
`_tv_floor` simulates it (multinomial draws from the joint) and the tests allow its 99.9% quantile
plus the discretisation error. That error was measured by propagating each sampler's exact law over
all S^L states for these very joints (not kept here): it is first order, halving when the steps
double; at 64 steps it is 0.0065 (analytic = Euler for absorbing + log-linear), 0.0064 (CTMC,
absorbing), 0.0098 (analytic, uniform), 0.0053 (Euler, uniform), 0.0135 (CTMC, uniform), 0.0070
(CTMC + 1 corrector step, uniform); at 2 / 8 steps it is 0.14–0.22 / 0.047–0.11. With a clamped
position and 32 steps it is 0.011–0.012. `_BIAS` = 0.015 covers all of these.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.methods.base import Denoiser
from dlm_jax.processes.schedules import Geometric, LogLinear
from dlm_jax.processes.transitions import Absorbing, Uniform
from dlm_jax.samplers import score

V, L = 3, 3
N = 12288
_BIAS = 0.015          # discretisation error allowed at 64 steps (see the module docstring)
SHRINK_STEPS = (2, 8, 64)
CLAMP_POS, CLAMP_TOK = 1, 2   # the middle position is held at token 2


def _problem(kind):
    if kind == "absorbing":
        return Absorbing(V), LogLinear(1e-3), oracles.random_joint(0, V, L)
    # A moderate σ̄(1) = 8: p_1 is uniform to 3e-4, and float32 Tweedie steps stay accurate.
    return Uniform(V), Geometric(1e-3, 8.0), oracles.random_joint(1, V, L)


def _oracles(process, joint):
    """Exact denoisers. Every row of a sampler call shares one noise level, so the marginal is
    computed once, at row 0's σ̄."""
    table = jnp.asarray(joint, jnp.float32)

    def log_score(xt, sigma_bar):
        return oracles.exact_log_ratios(table, process, xt, sigma_bar[0])

    def x0_probs(xt, sigma_bar):
        return oracles.exact_x0_posterior(table, process, xt, sigma_bar[0])

    return log_score, x0_probs


def _per_token_log_score(process, joint):
    """Exact log-ratios for per-token noise (B, L) shared by all rows (row 0's):
    p_t(x) = Σ_{x0} p0(x0) Π_d q_{σ̄_d}(x^d | x0^d), by enumeration."""
    table = jnp.asarray(joint, jnp.float32).reshape(-1)
    S = process.num_states
    xs = oracles.all_sequences(S, L)                                     # (M, L)
    x0s = oracles.all_sequences(V, L)                                    # (K, L)

    def log_score(xt, sigma_bar):
        lik = process.likelihood(xs, jnp.broadcast_to(sigma_bar[0], xs.shape))  # (M, L, S)
        kernel = jnp.take_along_axis(lik[:, None], x0s[None, :, :, None], -1)[..., 0].prod(-1)
        log_pt = jnp.log(kernel @ table)                                 # (M,)
        nb = oracles.sequence_index(oracles.hamming_neighbors(xt, S), S)  # (B, L, S)
        out = log_pt[nb] - log_pt[oracles.sequence_index(xt, S)][:, None, None]
        return jnp.where(jax.nn.one_hot(xt, S, dtype=bool), 0.0, out)

    return log_score


def _keys(seed, n=N):
    return jax.random.split(jax.random.key(seed), n)


@functools.lru_cache(maxsize=None)
def _runs(kind):
    """Every sample set of one process, from one jitted program: {name: (N, L) int32}."""
    process, schedule, joint = _problem(kind)
    log_score, x0_probs = _oracles(process, joint)
    clamp = (jnp.zeros((N, L), bool).at[:, CLAMP_POS].set(True),
             jnp.full((N, L), CLAMP_TOK, jnp.int32))

    def draw():
        out = {}
        for steps in SHRINK_STEPS:
            out[f"analytic{steps}"] = score.sedd_sample(log_score, process, schedule,
                                                        _keys(steps), L, steps=steps)
            out[f"ctmc{steps}"] = score.ctmc_sample(x0_probs, process, schedule,
                                                    _keys(100 + steps), L, steps=steps)
        if kind == "absorbing":
            out["clamp_analytic"] = score.sedd_sample(log_score, process, schedule, _keys(7), L,
                                                      steps=32, clamp=clamp)
            out["clamp_ctmc"] = score.ctmc_sample(x0_probs, process, schedule, _keys(8), L,
                                                  steps=32, clamp=clamp)
        else:
            # Euler and the corrector; with a log-linear schedule the absorbing Euler step equals
            # the Tweedie step exactly (σ(t)Δt = e^{Δσ̄} − 1), so Euler is checked on uniform.
            out["euler64"] = score.sedd_sample(log_score, process, schedule, _keys(9), L,
                                               steps=64, predictor="euler")
            out["ctmc_pc"] = score.ctmc_sample(x0_probs, process, schedule, _keys(10), L,
                                               steps=64, corrector_steps=1)
            out["clamp_clean"] = score.sedd_sample(_per_token_log_score(process, joint),
                                                   process, schedule, _keys(11), L, steps=32,
                                                   clamp=clamp, clean_clamp=True)
        return out

    return {k: np.asarray(v) for k, v in jax.jit(draw)().items()}


def _tv(samples, probs):
    """TV between the empirical law of (n, L') samples over V^L' sequences and `probs` (V,)*L';
    samples outside the support (a mask left over) count as mass off the table."""
    valid = (samples < V).all(-1)
    idx = np.asarray(oracles.sequence_index(jnp.asarray(samples[valid]), V))
    emp = np.bincount(idx, minlength=probs.size) / len(samples)
    return 0.5 * (np.abs(emp - probs.reshape(-1)).sum() + (1.0 - valid.mean()))


@functools.lru_cache(maxsize=None)
def _tv_floor(probs_bytes, n, q=0.999, reps=4000):
    """(mean, q-quantile) of the TV of n exact draws from probs: the Monte Carlo floor."""
    p = np.frombuffer(probs_bytes).reshape(-1)
    rng = np.random.default_rng(0)
    tv = 0.5 * np.abs(rng.multinomial(n, p, size=reps) / n - p).sum(-1)
    return tv.mean(), np.quantile(tv, q)


def _floor(probs, n=N):
    probs = np.ascontiguousarray(probs, np.float64)
    return _tv_floor(probs.tobytes(), n)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
@pytest.mark.parametrize("sampler", ["analytic", "ctmc"])
def test_tv_shrinks_with_steps_and_is_small_at_64(kind, sampler):
    joint = _problem(kind)[2]
    runs = _runs(kind)
    tv = {s: _tv(runs[f"{sampler}{s}"], joint) for s in SHRINK_STEPS}
    mean, q999 = _floor(joint)
    print(kind, sampler, {s: round(v, 4) for s, v in tv.items()}, "floor", round(mean, 4))
    # First-order error: 4× and 8× the steps cut the discretisation error by ≈ 4 and 8.
    assert tv[8] < 0.6 * tv[2], tv
    assert tv[64] < tv[8] - 0.01, tv
    assert tv[64] < q999 + _BIAS, (tv, q999)


@pytest.mark.parametrize("name", ["euler64", "ctmc_pc"])
def test_euler_and_corrector_uniform(name):
    joint = _problem("uniform")[2]
    tv = _tv(_runs("uniform")[name], joint)
    _, q999 = _floor(joint)
    print(name, round(tv, 4))
    assert tv < q999 + _BIAS, (tv, q999)


@pytest.mark.parametrize("kind,name", [("absorbing", "clamp_analytic"),
                                       ("absorbing", "clamp_ctmc"),
                                       ("uniform", "clamp_clean")])
def test_clamp_fixed_and_conditional_exact(kind, name):
    joint = _problem(kind)[2]
    samples = _runs(kind)[name]
    np.testing.assert_array_equal(samples[:, CLAMP_POS], CLAMP_TOK)
    cond = np.take(joint, CLAMP_TOK, axis=CLAMP_POS)
    cond = cond / cond.sum()
    free = np.delete(samples, CLAMP_POS, axis=1)
    tv = _tv(free, cond)
    _, q999 = _floor(cond)
    print(name, round(tv, 4), round(q999, 4))
    # 32 steps over the two free positions (exact 32-step error 0.011–0.012).
    assert tv < q999 + _BIAS, (tv, q999)


ROW = 5


def _timid_log_score(xt, sigma_bar):
    """A poor SEDD head (absorbing, S = V + 1): every ratio e^-20, so masks stay until the end."""
    own = jax.nn.one_hot(xt, V + 1, dtype=bool)
    return jnp.where(own, 0.0, -20.0)


def _timid_x0(xt, sigma_bar):
    """A poor x0-denoiser that puts 99% of its mass on the mask: masks stay until the end."""
    return jnp.full(xt.shape + (V + 1,), 0.01 / V, jnp.float32).at[..., V].set(0.99)


@functools.lru_cache(maxsize=None)
def _imperfect_runs():
    """Batch of 8 and row ROW alone, for both samplers (clamp and corrector on for CTMC), driven
    by imperfect denoisers on the absorbing process; one jitted program."""
    process, schedule, _ = _problem("absorbing")
    keys = _keys(3, 8)
    tokens = jnp.arange(8 * L, dtype=jnp.int32).reshape(8, L) % V
    clamp = (jnp.zeros((8, L), bool).at[:, 0].set(True), tokens)

    def both(k, c):
        return (score.sedd_sample(_timid_log_score, process, schedule, k, L, steps=3),
                score.ctmc_sample(Denoiser("x0_probs", _timid_x0), process, schedule, k, L,
                                  steps=3, corrector_steps=1, clamp=c))

    def run():
        alone = both(keys[ROW:ROW + 1], (clamp[0][ROW:ROW + 1], clamp[1][ROW:ROW + 1]))
        return both(keys, clamp), alone

    batch, alone = jax.jit(run)()
    return batch, alone, np.asarray(tokens)


def test_batch_independence():
    batch, alone, tokens = _imperfect_runs()
    for b, a in zip(batch, alone):
        chex.assert_trees_all_equal(b[ROW:ROW + 1], a)
    # Rows do differ (the keys matter), and the clamp held.
    assert len({tuple(r) for r in np.asarray(batch[0])}) > 1
    np.testing.assert_array_equal(np.asarray(batch[1])[:, 0], tokens[:, 0])


def test_no_mask_left_with_an_imperfect_denoiser():
    """The final step excludes the mask (with exact ratios it has weight 0 anyway): the timid
    denoisers leave every unclamped position masked until then."""
    batch, _, _ = _imperfect_runs()
    for x in batch:
        assert x.dtype == jnp.int32 and x.shape == (8, L)
        assert int(jnp.max(x)) < V, np.asarray(x)


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_tweedie_weights_are_exact_reverse_for_one_token(kind):
    """Lou et al. eq. 19 with the exact ratios is q(x_s | x_t) for a single token."""
    process, _, _ = _problem(kind)
    S = process.num_states
    p0 = np.zeros(S)
    p0[:V] = np.random.default_rng(2).dirichlet(np.ones(V))
    sb_t, sb_s = 1.3, 0.8
    x = jnp.arange(S, dtype=jnp.int32)[None]                             # (1, S): every x_t
    p_t = np.asarray(process.transition(jnp.arange(S), sb_t)).T @ p0     # (S,)
    p_s = np.asarray(process.transition(jnp.arange(S), sb_s)).T @ p0
    ratios = jnp.asarray(p_t[None, None, :] / p_t[:, None][None], jnp.float32)  # (1, S, S)
    w = np.asarray(score.tweedie_weights(process, x, ratios, sb_t - sb_s))[0]
    step = np.asarray(process.transition(jnp.arange(S), sb_t - sb_s))    # q(x_t = · | x_s)
    exact = step.T * p_s[None, :] / p_t[:, None]                         # [x_t, x_s]
    np.testing.assert_allclose(w, exact, atol=2e-5)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=2e-5)


def test_leap_weights_poisson_single_jump():
    x = jnp.array([[0, 2]], jnp.int32)
    rates = jnp.array([[[-3.0, 1.0, 2.0], [0.5, 0.5, -1.0]]])
    w = np.asarray(score.leap_weights(x, rates, 0.2))[0]
    lam = np.array([3.0, 1.0]) * 0.2
    np.testing.assert_allclose(w[0, 1:], 0.2 * np.array([1.0, 2.0]) * np.exp(-lam[0]), rtol=1e-6)
    np.testing.assert_allclose(w[1, 2], 1 - lam[1] * np.exp(-lam[1]), rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def test_bad_input():
    process, schedule, joint = _problem("absorbing")
    log_score, x0_probs = _oracles(process, joint)
    keys = _keys(0, 4)
    with pytest.raises(ValueError, match="unknown predictor"):
        score.sedd_sample(log_score, process, schedule, keys, L, steps=4, predictor="heun")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            score.sedd_sample(log_score, process, schedule, keys, L, steps=bad)
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            score.ctmc_sample(x0_probs, process, schedule, keys, L, steps=bad)
    with pytest.raises(ValueError, match="needs a 'log_score' denoiser.*'x0_probs'"):
        score.sedd_sample(Denoiser("x0_probs", x0_probs), process, schedule, keys, L, steps=4)
    with pytest.raises(ValueError, match="needs a 'x0_probs' denoiser.*'log_score'"):
        score.ctmc_sample(Denoiser("log_score", log_score), process, schedule, keys, L, steps=4)
    with pytest.raises(ValueError, match="typed keys"):
        score.sedd_sample(log_score, process, schedule, jax.random.key_data(keys), L, steps=4)
    with pytest.raises(ValueError, match="clamp positions"):
        score.sedd_sample(log_score, process, schedule, keys, L, steps=4,
                          clamp=(jnp.zeros((4, L + 1), bool), jnp.zeros((4, L + 1), jnp.int32)))
    with pytest.raises(ValueError, match="clean_clamp=True needs clamp"):
        score.ctmc_sample(x0_probs, process, schedule, keys, L, steps=4, clean_clamp=True)
    with pytest.raises(ValueError, match="corrector_steps"):
        score.ctmc_sample(x0_probs, process, schedule, keys, L, steps=4, corrector_steps=-1)
    with pytest.raises(ValueError, match="eps"):
        score.sedd_sample(log_score, process, schedule, keys, L, steps=4, eps=0.0)
