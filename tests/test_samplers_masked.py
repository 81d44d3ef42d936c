"""Masked-diffusion and D3PM samplers (`dlm_jax.samplers.masked`) against exact oracles.

Exactness: the exact x0 posterior of a known joint (`oracles`) drives the sampler; the empirical
distribution of N batched samples must be within total variation
    bound = floor + bias,
floor = the 99.9th percentile of TV for N exact draws (the Monte Carlo floor, by simulating
multinomial counts), bias = a bound on the probability of the sampler's known approximation (two
positions revealed in one step, drawn from their marginals instead of jointly; 0 for exact
samplers). Each test also checks that what a wrong sampler would give (the product of the
marginals, which ignores the correlations; the marginal, which ignores the conditioning) is far
outside the bound, so the test can fail.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.methods.base import Denoiser
from dlm_jax.objectives.nelbo import subs_log_probs
from dlm_jax.processes.d3pm import D3PM
from dlm_jax.processes.schedules import LogLinear
from dlm_jax.processes.transitions import Absorbing
from dlm_jax.samplers import masked

N = 12_000
V = 3
PROC = Absorbing(V)
MASK = PROC.mask_id
SCHED = LogLinear()
JOINT2 = jnp.asarray(oracles.random_joint(0, V, 2), jnp.float32)
JOINT3 = jnp.asarray(oracles.random_joint(1, V, 3), jnp.float32)


def _log(p):
    return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


def _oracle(joint):
    def denoise(xt, sigma_bar):
        del sigma_bar  # the absorbing posterior does not depend on σ̄ (for 0 < α < 1)
        p = oracles.exact_x0_posterior(joint, PROC, xt, 1.0)
        return jnp.maximum(_log(p), -1e6)           # SUBS: −1e6 at impossible states
    return denoise


ORACLE2, ORACLE3 = _oracle(JOINT2), _oracle(JOINT3)


class CallCounter:
    """Wraps a denoiser; counts its executions (a host callback, so a call that `lax.cond`
    skips is not counted)."""

    def __init__(self, fn):
        self.count, self.inner, self.fn = 0, fn, self._fn   # one function object: one compile

    def _tick(self):
        self.count += 1

    def _fn(self, xt, sigma_bar):
        jax.debug.callback(self._tick, ordered=True)
        return self.inner(xt, sigma_bar)


COUNTED_ORACLE2 = CallCounter(ORACLE2)


def _net(length, seed=0):
    """A deterministic, σ̄-independent 'network': logits[l] = Σ_j E[j, x_j, l], then SUBS."""
    table = jnp.asarray(np.random.default_rng(seed).normal(size=(length, V + 1, length, V + 1)),
                        jnp.float32)

    def denoise(xt, sigma_bar):
        del sigma_bar
        logits = table[jnp.arange(length)[None, :], xt].sum(1)     # (B, L, S)
        return subs_log_probs(logits, xt, MASK)
    return denoise


NET6 = _net(6)


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _mc_floor(p, n, quantile=0.999, sims=4000):
    """The Monte Carlo floor: the `quantile` of TV(empirical, p) over `sims` simulated sets of n
    exact draws from p (multinomial; NumPy, seeded)."""
    counts = np.random.default_rng(0).multinomial(n, p, size=sims)
    return float(np.quantile(0.5 * np.abs(counts / n - p).sum(-1), quantile))


def _tv(samples, probs):
    """Empirical TV to the flat table `probs` over all V^L sequences, and the MC floor."""
    samples = np.asarray(samples)
    assert (samples != MASK).all(), "a mask token survived"
    p = np.asarray(probs, np.float64).reshape(-1)
    p = p / p.sum()
    vocab = int(round(p.size ** (1 / samples.shape[1])))
    idx = np.asarray(oracles.sequence_index(jnp.asarray(samples), vocab))
    emp = np.bincount(idx, minlength=p.size) / len(idx)
    return 0.5 * np.abs(emp - p).sum(), _mc_floor(p, len(idx))


def _product_tv(joint):
    """TV between a joint table and the product of its marginals."""
    j = np.asarray(joint, np.float64)
    prod = np.ones_like(j)
    for d in range(j.ndim):
        marg = j.sum(axis=tuple(a for a in range(j.ndim) if a != d))
        shape = [1] * j.ndim
        shape[d] = -1
        prod = prod * marg.reshape(shape)
    return 0.5 * np.abs(j - prod).sum()


def _no_clamp(batch, length):
    return (jnp.zeros((batch, length), bool), jnp.zeros((batch, length), jnp.int32))


# --------------------------------------------------------------------------------------------
# Exactness, infilling, caching and batch independence (N batched samples, exact oracles)
#
# Compilation dominates the runtime, so runs share programs: prompt, clamp and no conditioning
# give the same compiled ancestral program (only x enters it), and batch independence compares
# rows run alone (B = 1) with the same rows inside the batch of N.
# --------------------------------------------------------------------------------------------
ANC_STEPS = 64
ALONE_ROWS = 4


def _even_odd_clamp(n):
    """Even rows fix position 0 to token 1, odd rows position 1 to token 2 (L = 2)."""
    even = jnp.arange(n) % 2 == 0
    known = jnp.stack([even, ~even], axis=1)
    tokens = jnp.stack([jnp.ones(n, jnp.int32), jnp.full(n, 2, jnp.int32)], axis=1)
    return known, tokens


@pytest.fixture(scope="module")
def ancestral_runs():
    keys = _keys(N)
    run = functools.partial(masked.ancestral, ORACLE2, SCHED, length=2, mask_id=MASK,
                            steps=ANC_STEPS)
    clamp = _even_odd_clamp(N)
    prompt = (jnp.arange(N, dtype=jnp.int32) % V)[:, None]
    return {
        "keys": keys,
        "free": run(keys=keys),
        "infill": run(keys=keys, clamp=clamp), "clamp": clamp,
        "prompted": run(keys=keys, prompt=prompt), "prompt": prompt,
        "cached": _counted(lambda: masked.ancestral_cached(COUNTED_ORACLE2.fn, SCHED, keys, 2,
                                                           MASK, steps=ANC_STEPS)),
    }


def _counted(run):
    """(tokens, nfe, number of denoiser executions) of a run of COUNTED_ORACLE2."""
    COUNTED_ORACLE2.count = 0
    tokens, nfe = run()
    jax.effects_barrier()
    return tokens, nfe, COUNTED_ORACLE2.count


def _ancestral_collision_bias(steps, length):
    """P(some pair of positions is revealed at the same step) on the log-linear grid: pairs ×
    Σ_n (r_n − r_{n+1})², r_n = m(t_n)/m(1) = t_n the probability of being masked at t_n."""
    r = np.linspace(1.0, 1e-5, steps + 1)
    return math.comb(length, 2) * float(np.sum((r[:-1] - r[1:]) ** 2))


def test_ancestral_matches_joint(ancestral_runs):
    tokens, nfe = ancestral_runs["free"]
    tv, floor = _tv(tokens, JOINT2)
    bound = floor + _ancestral_collision_bias(ANC_STEPS, 2)
    print(f"ancestral L=2 steps={ANC_STEPS}: TV={tv:.4f} floor={floor:.4f} bound={bound:.4f}")
    assert tv < bound
    assert _product_tv(JOINT2) > 5 * bound       # a correlation-blind sampler would fail
    nfe = np.asarray(nfe)                        # +1 noise-removal call only where masks remain
    assert ((nfe == ANC_STEPS) | (nfe == ANC_STEPS + 1)).all()


def _check_conditional(samples, cond, label):
    tv, floor = _tv(samples, cond)
    print(f"{label}: TV={tv:.4f} floor={floor:.4f}")
    assert tv < floor                 # one free position given the rest: no bias


def test_ancestral_infilling_and_prompt_follow_conditionals(ancestral_runs):
    j = np.asarray(JOINT2, np.float64)
    tokens, _ = ancestral_runs["infill"]
    known, clamp_tok = (np.asarray(a) for a in ancestral_runs["clamp"])
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[known], clamp_tok[known])
    cond_x1, cond_x0 = j[1] / j[1].sum(), j[:, 2] / j[:, 2].sum()
    _check_conditional(tokens[0::2, 1:], cond_x1, "ancestral infill x1 | x0=1")
    _check_conditional(tokens[1::2, :1], cond_x0, "ancestral infill x0 | x1=2")
    # Ignoring the clamp (sampling the marginal) would be far outside the bound.
    assert 0.5 * np.abs(j.sum(0) - cond_x1).sum() > 5 * _mc_floor(cond_x1, N // 2)
    tokens, _ = ancestral_runs["prompted"]
    tokens, prompt = np.asarray(tokens), np.asarray(ancestral_runs["prompt"])
    np.testing.assert_array_equal(tokens[:, :1], prompt)
    for a in range(V):
        rows = prompt[:, 0] == a
        _check_conditional(tokens[rows, 1:], j[a] / j[a].sum(), f"ancestral prompt x1 | x0={a}")


def test_cached_equals_ancestral_with_fewer_calls(ancestral_runs):
    tokens, nfe = ancestral_runs["free"]
    c_tokens, c_nfe, calls = ancestral_runs["cached"]
    np.testing.assert_array_equal(np.asarray(c_tokens), np.asarray(tokens))
    c_nfe = np.asarray(c_nfe)
    # A row changes at most L = 2 times: ≤ 1 + 2 evaluations (+1 noise removal) instead of 65.
    print(f"cached NFE mean {c_nfe.mean():.3f} vs {np.asarray(nfe).mean():.2f}; batch of {N}: "
          f"{calls} network calls")
    assert c_nfe.max() <= 4 and c_nfe.min() >= 1
    # The batch calls the network when any row needs it: at least each row's count, at most all.
    assert c_nfe.max() <= calls <= ANC_STEPS + 1


def test_ancestral_batch_independence(ancestral_runs):
    keys = ancestral_runs["keys"]
    known, tokens = ancestral_runs["clamp"]
    infill, _ = ancestral_runs["infill"]
    cached, cached_nfe, _ = ancestral_runs["cached"]
    for i in range(ALONE_ROWS):
        alone, _ = masked.ancestral(ORACLE2, SCHED, keys[i:i + 1], 2, MASK, steps=ANC_STEPS,
                                    clamp=(known[i:i + 1], tokens[i:i + 1]))
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(infill)[i])
        # Alone, most steps really skip the network (lax.cond): executions = the row's NFE.
        alone, nfe, calls = _counted(lambda: masked.ancestral_cached(
            COUNTED_ORACLE2.fn, SCHED, keys[i:i + 1], 2, MASK, steps=ANC_STEPS))
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(cached)[i])
        assert calls == int(nfe[0]) == int(cached_nfe[i]) <= 4


FH_CLAMP_TOKEN = 1


@pytest.fixture(scope="module")
def first_hitting_runs():
    keys = _keys(N, seed=1)
    free = masked.first_hitting(ORACLE3, SCHED, keys, 3, MASK)
    known = jnp.zeros((N, 3), bool).at[:, 1].set(True)
    tokens = jnp.full((N, 3), FH_CLAMP_TOKEN, jnp.int32)
    infill = masked.first_hitting(ORACLE3, SCHED, keys, 3, MASK, clamp=(known, tokens))
    return keys, free, infill


def test_first_hitting_matches_joint(first_hitting_runs):
    keys, (tokens, nfe), _ = first_hitting_runs
    tv, floor = _tv(tokens, JOINT3)
    print(f"first_hitting L=3: TV={tv:.4f} floor={floor:.4f}")
    assert tv < floor
    assert _product_tv(JOINT3) > 5 * floor
    assert (np.asarray(nfe) == 3).all()
    for i in range(ALONE_ROWS):                                       # batch independence
        alone, _ = masked.first_hitting(ORACLE3, SCHED, keys[i:i + 1], 3, MASK)
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(tokens)[i])


def test_first_hitting_infilling(first_hitting_runs):
    _, _, (tokens, nfe) = first_hitting_runs
    tokens = np.asarray(tokens)
    assert (tokens[:, 1] == FH_CLAMP_TOKEN).all()
    j = np.asarray(JOINT3, np.float64)[:, FH_CLAMP_TOKEN, :]
    cond = j / j.sum()                                   # p(x0, x2 | x1 = 1), (V, V)
    tv, floor = _tv(tokens[:, [0, 2]], cond)
    print(f"first_hitting infill: TV={tv:.4f} floor={floor:.4f}")
    assert tv < floor
    assert _product_tv(cond) > 5 * floor
    assert (np.asarray(nfe) == 2).all()


def _d3pm_oracle(joint, proc):
    def reverse(xt, t):
        p = oracles.exact_x0_posterior(joint, proc, xt, t)
        return proc.reverse_log_probs(xt, _log(p), t)
    return reverse


D3PM_ABS = D3PM("absorbing", V, num_steps=100)          # jsd: q(mask | x0) = t/T
D3PM_UNI = D3PM("uniform", 4, num_steps=10)
D3PM_ABS_REV = _d3pm_oracle(JOINT2, D3PM_ABS)
JOINT_UNI = jnp.asarray(oracles.random_joint(2, 4, 1), jnp.float32)
D3PM_UNI_REV = _d3pm_oracle(JOINT_UNI, D3PM_UNI)


def test_d3pm_absorbing_matches_joint():
    keys = _keys(N, seed=2)
    tokens, nfe = masked.d3pm_ancestral(D3PM_ABS_REV, D3PM_ABS, keys, 2)
    tv, floor = _tv(tokens, JOINT2)
    # Both masks revealed at the same step t: Σ_t (t/T)² (1/t)² = 1/T per pair.
    bound = floor + 1 / D3PM_ABS.num_steps
    print(f"d3pm absorbing L=2 T={D3PM_ABS.num_steps}: TV={tv:.4f} floor={floor:.4f} "
          f"bound={bound:.4f}")
    assert tv < bound
    assert _product_tv(JOINT2) > 5 * bound
    assert (np.asarray(nfe) == D3PM_ABS.num_steps).all()
    for i in range(ALONE_ROWS):                                       # batch independence
        alone, _ = masked.d3pm_ancestral(D3PM_ABS_REV, D3PM_ABS, keys[i:i + 1], 2)
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(tokens)[i])


def test_d3pm_uniform_matches_marginal():
    """One position: the x0-parameterised reverse with the exact posterior is the exact reverse
    of the uniform kernel, from a uniform x_T, for any T."""
    tokens, _ = masked.d3pm_ancestral(D3PM_UNI_REV, D3PM_UNI, _keys(N, seed=4), 1)
    tokens = np.asarray(tokens)
    p = np.asarray(JOINT_UNI, np.float64)
    emp = np.bincount(tokens[:, 0], minlength=4) / N
    tv, floor = 0.5 * np.abs(emp - p).sum(), _mc_floor(p, N)
    print(f"d3pm uniform L=1 T=10: TV={tv:.4f} floor={floor:.4f}")
    assert tv < floor
    assert 0.5 * np.abs(p - 0.25).sum() > 5 * floor      # returning the prior would fail


# --------------------------------------------------------------------------------------------
# Confidence decoding: mechanics (recorded inputs of every denoiser call)
# --------------------------------------------------------------------------------------------
class Recorder:
    """A σ̄-independent denoiser with fixed per-position distributions that records its inputs."""

    def __init__(self, length, seed):
        z = np.random.default_rng(seed).normal(size=(length, V + 1)) * 2.0
        self.logits = jnp.asarray(z, jnp.float32)
        self.calls = []
        self.fn = self._fn  # one function object: compiled once

    def _record(self, xt):
        self.calls.append(np.asarray(xt))

    def _fn(self, xt, sigma_bar):
        del sigma_bar
        jax.debug.callback(self._record, xt, ordered=True)
        logits = jnp.broadcast_to(self.logits, xt.shape + (V + 1,))
        return subs_log_probs(logits, xt, MASK)

    def probs(self):
        """p_θ over real tokens per position, (L, V)."""
        return np.asarray(jax.nn.softmax(self.logits[:, :V], axis=-1), np.float64)

    def trajectory(self, out):
        """(steps + 1, B, L): the input of every call, then the output."""
        traj = np.stack(self.calls + [np.asarray(out)])
        self.calls = []
        return traj


L_CONF, P_CONF, STRIDE = 11, 2, 3        # strides [2,5) [5,8) [8,11)


def _conf_conditioning(batch):
    prompt = jnp.tile(jnp.array([[0, 1]], jnp.int32), (batch, 1))
    rows = jnp.arange(batch)[:, None]
    known = (jnp.arange(L_CONF)[None, :] == 3 + 2 * rows) & (rows > 0)
    tokens = jnp.full((batch, L_CONF), 2, jnp.int32)
    return prompt, (known, tokens)


def _stride_of(pos):
    return (pos - P_CONF) // STRIDE


TOPK_STEPS = 12                           # 4 per stride


def test_topk_schedule_strides_and_remasking():
    rec = Recorder(L_CONF, seed=11)
    keys = _keys(4, seed=12)
    prompt, (known, tokens) = _conf_conditioning(4)

    def run(k, p, c):
        return masked.confidence_decode(rec.fn, SCHED, k, L_CONF, MASK, steps=TOPK_STEPS,
                                        stride=STRIDE, remask=0.5, prompt=p,
                                        clamp=c)

    out, nfe = run(keys, prompt, (known, tokens))
    traj = rec.trajectory(out)
    assert traj.shape[0] == TOPK_STEPS + 1 and (np.asarray(nfe) == TOPK_STEPS).all()
    fixed = np.asarray(known).copy()
    fixed[:, :P_CONF] = True
    assert (traj[:, fixed] != MASK).all()                     # prompt/clamp never masked
    np.testing.assert_array_equal(traj[-1][:, :P_CONF], np.asarray(prompt))
    kn = np.asarray(known)
    np.testing.assert_array_equal(traj[-1][kn], np.asarray(tokens)[kn])
    assert (traj[-1] != MASK).all()
    pos = np.arange(L_CONF)
    J = TOPK_STEPS // 3
    remasked_total = 0
    for n in range(TOPK_STEPS):
        b, j = divmod(n, J)
        before, after = traj[n], traj[n + 1]
        changed = before != after
        in_stride = (pos >= P_CONF) & (_stride_of(pos) == b)
        assert not changed[:, ~in_stride].any(), f"step {n} touched outside stride {b}"
        assert not changed[fixed].any()
        later = (pos >= P_CONF) & (_stride_of(pos) > b)
        assert (after[:, later & ~fixed.any(0)] == MASK).all()      # later strides untouched
        active = in_stride[None, :] & ~fixed
        n_free = active.sum(-1)
        back = (active & (before != MASK) & (after == MASK)).sum(-1)
        remasked_total += back.sum()
        target = np.ceil(n_free * (j + 1) / J - 1e-4).astype(int)    # linear schedule
        revealed = (active & (after != MASK)).sum(-1)
        np.testing.assert_array_equal(revealed, np.minimum(target, n_free - back))
        if j == J - 1:
            assert (back == 0).all() and (revealed == n_free).all()
    assert remasked_total > 0                                         # remasking did happen
    for i in range(4):                                                # batch independence
        alone, _ = run(keys[i:i + 1], prompt[i:i + 1], (known[i:i + 1], tokens[i:i + 1]))
        rec.calls = []
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(out)[i])


def test_topk_counts_without_remasking():
    """No strides: after step j the revealed count is exactly ceil(N (j+1)/J) of N free."""
    rec = Recorder(7, seed=13)
    keys = _keys(3, seed=14)
    out, _ = masked.confidence_decode(rec.fn, SCHED, keys, 7, MASK, steps=3,
                                      strategy="margin")
    traj = rec.trajectory(out)
    revealed = (traj != MASK).sum(-1)                                 # (steps + 1, B)
    np.testing.assert_array_equal(revealed[:, 0], [0, 3, 5, 7])
    # Greedy and σ̄-independent: the top-margin positions go first.
    p = np.sort(rec.probs(), axis=-1)
    margin = p[:, -1] - p[:, -2]
    first = np.flatnonzero(traj[1, 0] != MASK)
    assert set(first) == set(np.argsort(-margin, kind="stable")[:3])


@pytest.mark.parametrize("strategy", ["confidence", "entropy"])
def test_threshold_reveals_above_threshold_or_best(strategy):
    rec = Recorder(L_CONF, seed=15)
    p = rec.probs()
    score = p.max(-1) if strategy == "confidence" else (p * np.log(p)).sum(-1)
    thr = float(np.quantile(score[P_CONF:], 0.6))
    keys = _keys(4, seed=16)
    prompt, (known, tokens) = _conf_conditioning(4)

    def run(k, pr, c):
        # The entropy score does not depend on the drawn token: sample it (temperature 1).
        return masked.confidence_decode(rec.fn, SCHED, k, L_CONF, MASK, strategy=strategy,
                                        threshold=thr, stride=STRIDE, prompt=pr, clamp=c,
                                        temperature=0.0 if strategy == "confidence" else 1.0)

    out, nfe = run(keys, prompt, (known, tokens))
    traj = rec.trajectory(out)
    fixed = np.asarray(known).copy()
    fixed[:, :P_CONF] = True
    pos = np.arange(L_CONF)
    assert (traj[-1] != MASK).all()
    kn = np.asarray(known)
    np.testing.assert_array_equal(traj[-1][kn], np.asarray(tokens)[kn])
    for i in range(4):
        steps_i = 0
        for n in range(traj.shape[0] - 1):
            before, after = traj[n, i], traj[n + 1, i]
            masked_free = (before == MASK) & ~fixed[i]
            if not masked_free.any():
                assert (before == after).all()
                continue
            steps_i += 1
            current = _stride_of(pos[masked_free]).min()
            m_act = masked_free & (pos >= P_CONF) & (_stride_of(pos) == current)
            s = np.where(m_act, score, -np.inf)
            expect = m_act & ((s > thr) | (pos == np.argmax(s)))
            np.testing.assert_array_equal(before != after, expect)
            assert expect.sum() >= 1
        assert steps_i == int(np.asarray(nfe)[i])
    alone, _ = run(keys[1:2], prompt[1:2], (known[1:2], tokens[1:2]))
    rec.calls = []
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(out)[1])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_bad_input():
    keys = _keys(2)
    with pytest.raises(ValueError, match="unknown masked-diffusion sampler"):
        masked.get_sampler("euler")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        masked.ancestral(NET6, SCHED, keys, 6, MASK, steps=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        masked.confidence_decode(NET6, SCHED, keys, 6, MASK, steps=0)
    with pytest.raises(ValueError, match="longer than the sequence length"):
        masked.first_hitting(NET6, SCHED, keys, 6, MASK, prompt=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="unknown confidence strategy"):
        masked.confidence_decode(NET6, SCHED, keys, 6, MASK, steps=2, strategy="loudest")
    with pytest.raises(ValueError, match="kind 'x0_log_probs'"):
        masked.ancestral(Denoiser("log_score", NET6), SCHED, keys, 6, MASK, steps=2)
    with pytest.raises(ValueError, match="typed PRNG keys"):
        masked.ancestral(NET6, SCHED, jnp.zeros((2, 2), jnp.uint32), 6, MASK, steps=2)
    with pytest.raises(ValueError, match="must return"):
        masked.ancestral(NET6, SCHED, keys, 6, 9, steps=2)        # S = 4 ≤ mask_id
    with pytest.raises(ValueError, match="multiple of the number of strides"):
        masked.confidence_decode(NET6, SCHED, keys, 6, MASK, steps=4, stride=2)
    with pytest.raises(ValueError, match="needs steps"):
        masked.confidence_decode(NET6, SCHED, keys, 6, MASK)
    with pytest.raises(ValueError, match="strategy 'random'"):
        masked.confidence_decode(NET6, SCHED, keys, 6, MASK, threshold=0.9, strategy="random")
    with pytest.raises(ValueError, match="clamp arrays must be"):
        masked.ancestral(NET6, SCHED, keys, 6, MASK, steps=2,
                         clamp=(jnp.zeros((2, 5), bool), jnp.zeros((2, 5), jnp.int32)))
    with pytest.raises(ValueError, match="must equal process.num_steps"):
        masked.d3pm_ancestral(D3PM_ABS_REV, D3PM_ABS, keys, 2, steps=3)
    with pytest.raises(ValueError, match="one-step reverse function"):
        masked.d3pm_ancestral(Denoiser("x0_log_probs", D3PM_ABS_REV), D3PM_ABS, keys, 2)
