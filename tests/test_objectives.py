"""Unit tests of the AR, MDLM/BD3-LM and SEDD objectives (dlm_jax/objectives)."""
from __future__ import annotations

import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from dlm_jax.objectives import (NEG_INF, ar_nll, bregman, log_expm1, masked_nelbo, mdlm_loss,
                                scale_by_sigma_offset, score_entropy, subs_log_probs,
                                true_log_ratios)
from dlm_jax.processes.corruption import block_times
from dlm_jax.processes.schedules import Geometric, LogLinear
from dlm_jax.processes.transitions import Absorbing, MatrixProcess, Uniform

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DIRS = [REPO / "tests" / "fixtures", REPO.parent / "shared" / "fixtures"]


# Jitted once per (process, method, shapes): much cheaper than op-by-op dispatch on CPU.
_se = jax.jit(score_entropy, static_argnums=0, static_argnames=("method",))


def _fixture(name: str):
    for d in FIXTURE_DIRS:
        if (d / f"{name}.npz").exists():
            return np.load(d / f"{name}.npz")
    pytest.skip(f"reference fixture {name}.npz not found in {FIXTURE_DIRS}")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random_matrix_process(num_states: int, seed: int) -> MatrixProcess:
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.1, 1.0, (num_states, num_states))
    np.fill_diagonal(q, 0.0)
    np.fill_diagonal(q, -q.sum(1))
    return MatrixProcess(q)


# ------------------------------------------------------------------------------------------------
# AR
# ------------------------------------------------------------------------------------------------
def test_ar_nll_shift_weights_and_segments(x64):
    rng = np.random.default_rng(0)
    b, l, v = 2, 5, 7
    logits = rng.normal(size=(b, l, v))
    tokens = rng.integers(0, v, (b, l))
    weights = np.array([[1, 1, 1, 0, 1], [0, 1, 1, 1, 1]], np.float64)  # per target token
    segs = np.array([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    per, aux = ar_nll(jnp.asarray(logits), jnp.asarray(tokens), weights=jnp.asarray(weights),
                      segment_ids=jnp.asarray(segs))
    chex.assert_shape(per, (b, l))
    lp = _log_softmax(logits)
    expect = np.zeros((b, l))
    for bi in range(b):
        for i in range(l - 1):  # logits at i predict token i + 1
            w = weights[bi, i + 1] * (segs[bi, i] == segs[bi, i + 1])
            expect[bi, i] = -w * lp[bi, i, tokens[bi, i + 1]]
    np.testing.assert_allclose(per, expect, rtol=1e-12)
    assert (np.asarray(per)[:, -1] == 0).all()
    np.testing.assert_allclose(aux["nll_sum"], expect.sum(), rtol=1e-12)
    # targets kept: row 0 → tokens 1, 2, 4; row 1 → tokens 1, 3, 4 (token 2 starts a segment).
    assert float(aux["num_targets"]) == 6.0
    np.testing.assert_allclose(aux["nll_mean"], expect.sum() / 6.0, rtol=1e-12)


def test_ar_nll_unweighted_float32_and_errors():
    logits = jnp.zeros((1, 4, 10), jnp.bfloat16)
    per, aux = ar_nll(logits, jnp.zeros((1, 4), jnp.int32))
    assert per.dtype == jnp.float32
    np.testing.assert_allclose(per[0, :3], math.log(10.0), rtol=1e-6)
    assert float(per[0, 3]) == 0.0 and float(aux["num_targets"]) == 3.0
    with pytest.raises(ValueError, match="tokens"):
        ar_nll(logits, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="weights"):
        ar_nll(logits, jnp.zeros((1, 4), jnp.int32), weights=jnp.ones((4,)))
    with pytest.raises(ValueError, match="logits"):
        ar_nll(jnp.zeros((4, 10)), jnp.zeros((1, 4), jnp.int32))


# ------------------------------------------------------------------------------------------------
# SUBS and the masked NELBO
# ------------------------------------------------------------------------------------------------
def test_subs_log_probs_semantics():
    rng = np.random.default_rng(1)
    v = 5
    m = v  # absorbing mask id = vocab_size, S = V + 1
    logits = rng.normal(size=(2, 4, v + 1)).astype(np.float32)
    xt = np.array([[m, 2, m, 0], [1, m, m, m]])
    out = subs_log_probs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(xt), m)
    chex.assert_shape(out, (2, 4, v + 1))
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    masked = xt == m
    # Masked rows: a distribution over the real tokens only; the mask gets the sentinel.
    np.testing.assert_allclose(np.exp(out[masked]).sum(-1), 1.0, rtol=1e-6)
    assert (out[masked][:, m] <= NEG_INF * 0.99).all()
    z = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))[masked][:, :v]
    np.testing.assert_allclose(out[masked][:, :v], _log_softmax(z), atol=1e-5)
    # Unmasked rows: carry-over one-hot (0 at xt, sentinel elsewhere).
    for b, i in zip(*np.nonzero(~masked)):
        row = out[b, i]
        assert row[xt[b, i]] == 0.0
        assert (np.delete(row, xt[b, i]) == NEG_INF).all()
    with pytest.raises(ValueError, match="mask_id"):
        subs_log_probs(jnp.asarray(logits), jnp.asarray(xt), v + 1)
    with pytest.raises(ValueError, match="xt"):
        subs_log_probs(jnp.asarray(logits), jnp.asarray(xt[:, :3]), m)


@pytest.mark.parametrize("name", ["bd3lm_dit_mdlm", "bd3lm_dit_twopass"])
def test_subs_log_probs_matches_reference_fixture(name):
    """Parity with the reference SUBS outputs (finite entries to 1e-5, sentinel pattern)."""
    f = _fixture(name)
    xt = f["input/tokens"] if name == "bd3lm_dit_mdlm" else f["input/xt"]
    ref = f["output/subs_log_probs"]
    out = np.asarray(subs_log_probs(jnp.asarray(f["output/logits_sigma0"]), jnp.asarray(xt), 47))
    finite = np.abs(ref) < 1e3
    np.testing.assert_array_equal(np.abs(out) < 1e3, finite)
    np.testing.assert_allclose(out[finite], ref[finite], atol=1e-5)
    assert (out[~finite] <= -9.9e5).all() and (ref[~finite] <= -9.9e5).all()


def test_masked_nelbo_hand_computed(x64):
    v, m = 3, 3
    logits = np.array([[[0.5, -1.0, 2.0, 9.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.3, -0.2, 1.0]]])
    x0 = np.array([[0, 1, 2]])
    xt = np.array([[m, 1, m]])
    t = 0.25
    per, aux = mdlm_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt), t,
                         LogLinear(1e-3), m)
    lp0 = _log_softmax(logits[0, 0, :v])[0]
    lp2 = _log_softmax(logits[0, 2, :v])[2]
    # log-linear: -alpha'/(1 - alpha) = (1 - eps) / ((1 - eps) t) = 1/t = 4.
    np.testing.assert_allclose(per, [[-4.0 * lp0, 0.0, -4.0 * lp2]], rtol=1e-12)
    assert float(aux["num_masked"]) == 2.0
    np.testing.assert_allclose(aux["masked_ce_mean"], -(lp0 + lp2) / 2, rtol=1e-12)
    np.testing.assert_allclose(aux["nelbo_sum"], -4.0 * (lp0 + lp2), rtol=1e-12)
    # Another schedule: the weight is sigma / expm1(sigma_bar).
    geo = Geometric(1e-3, 5.0)
    per_g, _ = mdlm_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt), t, geo, m)
    w = float(geo.sigma(t)) / math.expm1(float(geo.sigma_bar(t)))
    np.testing.assert_allclose(per_g, [[-w * lp0, 0.0, -w * lp2]], rtol=1e-10)


def test_masked_nelbo_time_shapes_and_block_times(x64):
    rng = np.random.default_rng(2)
    b, k, lb, v = 3, 2, 3, 4
    length, m = k * lb, v
    logits = jnp.asarray(rng.normal(size=(b, length, v + 1)))
    x0 = jnp.asarray(rng.integers(0, v, (b, length)))
    xt = jnp.where(jnp.asarray(rng.uniform(size=(b, length)) < 0.5), m, x0)
    sched = LogLinear(0.0)
    t_seq = jnp.asarray([0.2, 0.5, 0.9])
    per_1d, _ = mdlm_loss(logits, x0, xt, t_seq, sched, m)
    per_2d, _ = mdlm_loss(logits, x0, xt, jnp.broadcast_to(t_seq[:, None], (b, length)), sched, m)
    chex.assert_trees_all_close(per_1d, per_2d)
    # BD3-LM: per-block times repeated over each block = the per-token formula.
    t_blocks = jnp.asarray(rng.uniform(0.1, 1.0, (b, k)))
    t_tok = block_times(t_blocks, lb)
    chex.assert_shape(t_tok, (b, length))
    per_blk, _ = mdlm_loss(logits, x0, xt, t_tok, sched, m)
    lp = subs_log_probs(logits, xt, m)
    ce = -jnp.take_along_axis(lp, x0[..., None], -1)[..., 0]
    expect = jnp.where(xt == m, ce / t_tok, 0.0)
    chex.assert_trees_all_close(per_blk, expect, rtol=1e-12)
    with pytest.raises(ValueError, match="t"):
        mdlm_loss(logits, x0, xt, jnp.ones((length,)), sched, m)  # (L,) is not per-sequence
    with pytest.raises(ValueError, match="x0"):
        mdlm_loss(logits, x0[:, :2], xt, 0.5, sched, m)


def test_masked_nelbo_t_zero_is_finite_with_finite_gradient():
    logits = jnp.zeros((1, 3, 4))
    x0 = jnp.array([[0, 1, 2]])
    per, _ = mdlm_loss(logits, x0, x0, 0.0, LogLinear(), 3)  # nothing masked, weight 1/0
    assert (per == 0).all()
    g = jax.grad(lambda z: mdlm_loss(z, x0, x0, 0.0, LogLinear(), 3)[0].sum())(logits)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) == 0.0


# ------------------------------------------------------------------------------------------------
# Score entropy
# ------------------------------------------------------------------------------------------------
def _brute_force_dse(q, log_score, xt, x0, sigma_bar, sigma):
    """Direct double loop over positions and y ≠ xt (numpy float64)."""
    b_num, l_num, _ = log_score.shape
    out = np.zeros((b_num, l_num))
    for b in range(b_num):
        p = expm(sigma_bar[b] * q)  # row convention: p[x0, y] = q_t(y | x0)
        for i in range(l_num):
            x, a = xt[b, i], x0[b, i]
            total = 0.0
            for y in range(q.shape[0]):
                if y == x or q[y, x] == 0:
                    continue
                r = p[a, y] / p[a, x]
                ls = log_score[b, i, y]
                k = r * (math.log(r) - 1.0) if r > 0 else 0.0
                total += q[y, x] * (math.exp(ls) - r * ls + k)
            out[b, i] = sigma[b] * total
    return out


def _inputs(proc, seed, b=4, l=5, sigma_bar=None):
    """Random (x0, xt ~ q(·|x0), log_score, sigma_bar, sigma), numpy."""
    rng = np.random.default_rng(seed)
    s = proc.num_states
    real = proc.vocab_size if isinstance(proc, Absorbing) else s
    x0 = rng.integers(0, real, (b, l))
    sb = rng.uniform(0.05, 3.0, b) if sigma_bar is None else np.full(b, sigma_bar)
    q = np.asarray(proc.rate_matrix(), np.float64)
    probs = np.stack([expm(v * q)[x0[bi]] for bi, v in enumerate(sb)])  # (B, L, S)
    xt = np.array([[rng.choice(s, p=probs[bi, i] / probs[bi, i].sum()) for i in range(l)]
                   for bi in range(b)])
    if isinstance(proc, Absorbing):
        xt[:, 0] = proc.mask_id  # at least one masked and one clean position
        xt[:, 1] = x0[:, 1]
    log_score = rng.normal(0.0, 1.5, (b, l, s))
    sigma = rng.uniform(0.5, 2.0, b)
    return x0, xt, log_score, sb, sigma


PROCS = {"uniform": Uniform(5), "absorbing": Absorbing(4), "dense": _random_matrix_process(4, 3)}


@pytest.mark.parametrize("name", list(PROCS))
def test_score_entropy_matches_brute_force_and_is_nonnegative(name, x64):
    proc = PROCS[name]
    x0, xt, ls, sb, sg = _inputs(proc, seed=5)
    q = np.asarray(proc.rate_matrix(), np.float64)
    per, aux = _se(proc, jnp.asarray(ls), jnp.asarray(xt), jnp.asarray(x0),
                             jnp.asarray(sb), jnp.asarray(sg))
    chex.assert_shape(per, x0.shape)
    expect = _brute_force_dse(q, ls, xt, x0, sb, sg)
    np.testing.assert_allclose(per, expect, rtol=1e-9, atol=1e-12)
    assert (np.asarray(per) >= 0).all()
    np.testing.assert_allclose(aux["loss_sum"], expect.sum(), rtol=1e-9)
    # Generic path agrees with the closed forms.
    per_g, aux_g = _se(proc, jnp.asarray(ls), jnp.asarray(xt), jnp.asarray(x0),
                                 jnp.asarray(sb), jnp.asarray(sg), method="generic")
    np.testing.assert_allclose(per_g, expect, rtol=1e-9, atol=1e-12)
    assert float(aux_g["num_active"]) == float(aux["num_active"])
    if isinstance(proc, Absorbing):
        assert (np.asarray(per)[xt != proc.mask_id] == 0).all()
        assert float(aux["num_active"]) == (xt == proc.mask_id).sum()


@pytest.mark.parametrize("name", list(PROCS))
def test_score_entropy_zero_with_zero_gradient_at_true_ratios(name, x64):
    proc = PROCS[name]
    x0, xt, _, sb, sg = _inputs(proc, seed=6)
    log_r = true_log_ratios(proc, jnp.asarray(xt), jnp.asarray(x0), jnp.asarray(sb))
    chex.assert_shape(log_r, x0.shape + (proc.num_states,))
    for method in ("auto", "generic"):
        def loss(ls):
            return _se(proc, ls, jnp.asarray(xt), jnp.asarray(x0), jnp.asarray(sb),
                                 jnp.asarray(sg), method=method)[0]
        np.testing.assert_allclose(loss(log_r), 0.0, atol=1e-12)
        grad = jax.grad(lambda ls: loss(ls).sum())(log_r)
        assert bool(jnp.isfinite(grad).all())
        np.testing.assert_allclose(grad, 0.0, atol=1e-12)
        # Any other score is strictly worse at every position with in-rates into x_t.
        active = xt == proc.mask_id if isinstance(proc, Absorbing) else np.ones(xt.shape, bool)
        assert (np.asarray(loss(log_r + 0.1))[active] > 0).all()


def test_absorbing_closed_form_is_the_normalised_form(x64):
    """σ·(1/E)[Σ_{y≠m} e^{ℓ̃_y} − 1 − ℓ̃_{x0}] with ℓ̃ = ℓ + log E, for arbitrary ℓ (the absorbing
    fast path of `dlm_jax.objectives.score_entropy`, the form the SEDD code evaluates)."""
    proc = Absorbing(6)
    x0, xt, ls, sb, sg = _inputs(proc, seed=7)
    per, _ = _se(proc, jnp.asarray(ls), jnp.asarray(xt), jnp.asarray(x0),
                           jnp.asarray(sb), jnp.asarray(sg))
    e = np.expm1(sb)[:, None, None]
    lt = ls + np.log(e)
    real = np.arange(proc.num_states) != proc.mask_id
    l_x0 = np.take_along_axis(lt, x0[..., None], -1)[..., 0]
    form = (np.exp(lt) * real).sum(-1) - 1.0 - l_x0
    form = sg[:, None] / e[..., 0] * form
    np.testing.assert_allclose(per, np.where(xt == proc.mask_id, form, 0.0), rtol=1e-10)


def test_uniform_closed_form_matches_sedd_pos_neg_const_form(x64):
    """The uniform-graph score entropy written as SEDD's code writes it (Lou et al., 2024), a
    positive term minus a negative term plus a constant, equals our per-token value / σ."""
    n = 6
    proc = Uniform(n)
    x0, xt, ls, sb, sg = _inputs(proc, seed=8, b=6, l=6)
    xt[:, :2] = x0[:, :2]  # make sure both branches occur
    per = np.asarray(_se(proc, jnp.asarray(ls), jnp.asarray(xt), jnp.asarray(x0),
                                   jnp.asarray(sb), jnp.asarray(sg))[0])
    for b in range(ls.shape[0]):
        e = math.expm1(sb[b])
        rho = e / (e + n)
        for i in range(ls.shape[1]):
            x, a = xt[b, i], x0[b, i]
            ell = ls[b, i].copy()
            ell[x] = 0.0
            pos = np.exp(ell).mean() - 1.0 / n
            if x == a:
                neg = rho * (ell.mean() - ell[x] / n)
                const = (n - 1) / n * rho * (math.log(rho) - 1)
            else:
                neg = ell.mean() - ell[x] / n + ell[a] / e
                const = ((-math.log(rho) - 1) / rho - (n - 2)) / n
            np.testing.assert_allclose(per[b, i], sg[b] * (pos - neg + const), rtol=1e-10)


@pytest.mark.parametrize("name", ["uniform", "absorbing"])
@pytest.mark.parametrize("sigma_bar", [1e-4, 12.0, 20.0])
def test_score_entropy_float32_is_stable(name, sigma_bar):
    """float32 at tiny and large σ̄ is finite and matches float64 on the same inputs.

    Scores are near the truth (ℓ = log r + δ, |δ| ≈ 0.03), where a naive s − r log s + r log r − r
    cancels catastrophically (r ≈ 1/σ̄ = 1e4 for the absorbing mask at σ̄ = 1e-4).
    """
    proc = PROCS[name]
    x0, xt, _, sb, sg = _inputs(proc, seed=9, b=3, l=8, sigma_bar=sigma_bar)
    rng = np.random.default_rng(10)
    with jax.enable_x64(True):
        log_r = np.asarray(true_log_ratios(proc, jnp.asarray(xt), jnp.asarray(x0),
                                           jnp.asarray(sb)))
    ls = np.where(np.isfinite(log_r), log_r, -5.0) + rng.normal(0.0, 0.03, log_r.shape)
    ls32 = ls.astype(np.float32)
    sb32, sg32 = sb.astype(np.float32), sg.astype(np.float32)
    per32 = np.asarray(_se(proc, jnp.asarray(ls32), jnp.asarray(xt), jnp.asarray(x0),
                                     jnp.asarray(sb32), jnp.asarray(sg32))[0])
    assert per32.dtype == np.float32 and np.isfinite(per32).all()
    with jax.enable_x64(True):
        per64 = np.asarray(_se(
            proc, jnp.asarray(ls32.astype(np.float64)), jnp.asarray(xt), jnp.asarray(x0),
            jnp.asarray(sb32.astype(np.float64)), jnp.asarray(sg32.astype(np.float64)))[0])
    assert (per64 >= 0).all() and per64.max() > 0
    # The naive float32 formula is off by up to 2e-3 (relative to the largest value) here; the
    # residual error of ours (~3e-5) is what rounding log r to float32 costs.
    assert np.abs(per32 - per64).max() <= 1e-4 * per64.max()
    np.testing.assert_allclose(per32, per64, rtol=3e-4)


def test_score_entropy_absorbing_infinite_noise():
    """σ̄ = ∞ (log-linear with eps = 0 at t = 1): r = 0, the loss is σ·Σ_{y≠m} s_y."""
    proc = Absorbing(3)
    ls = jnp.log(jnp.array([[[0.1, 0.2, 0.3, 7.0]]]))
    per, _ = _se(proc, ls, jnp.array([[3]]), jnp.array([[1]]), jnp.inf, 2.0)
    np.testing.assert_allclose(per, [[2.0 * 0.6]], rtol=1e-6)


@pytest.mark.parametrize("num_states", [8, 50258])
def test_score_entropy_at_init_is_log_vocab(num_states):
    """Zero network output with scale_by_sigma: E[loss per token] = (1 − ε)·log(V − 1).

    V counts the mask (GPT-2: V − 1 = 50257 → 10.81408 nats). At a masked position the loss is
    nelbo_weight(t)·log(V − 1) = log(V − 1)/t, and a token is masked with probability (1 − ε)t.
    """
    proc, sched = Absorbing(num_states - 1), LogLinear(1e-3)
    t = jnp.array([1e-3, 0.3, 1.0])
    sb, sg = sched.sigma_bar(t), sched.sigma(t)
    ls = jnp.broadcast_to(scale_by_sigma_offset(sb, num_states)[:, None, None], (3, 1, num_states))
    xt = jnp.full((3, 1), proc.mask_id)
    x0 = jnp.array([[0], [5], [num_states - 2]])
    per, _ = _se(proc, ls, xt, x0, sb, sg)
    np.testing.assert_allclose(per[:, 0], math.log(num_states - 1) / t, rtol=2e-5)
    expected = sched.move_prob(t) * per[:, 0]
    np.testing.assert_allclose(expected, (1 - 1e-3) * math.log(num_states - 1), rtol=2e-5)
    if num_states == 50258:
        np.testing.assert_allclose(expected, 10.81408, atol=1e-4)


def test_scale_by_sigma_offset_matches_reference_fixture():
    f = _fixture("sedd_ddit")
    raw, ref, tokens = f["output/raw"], f["output/log_score"], f["input/tokens"]
    sigma = f["input/sigma"]
    out = raw + np.asarray(scale_by_sigma_offset(jnp.asarray(sigma), raw.shape[-1]))[:, None, None]
    not_current = ~np.eye(raw.shape[-1], dtype=bool)[tokens]
    np.testing.assert_allclose(out[not_current], ref[not_current], atol=1e-5)


def test_log_expm1_and_bregman_edge_cases(x64):
    x = jnp.array([1e-8, 1e-3, 0.7, 1.0, 5.0, 40.0, 800.0])
    np.testing.assert_allclose(log_expm1(x), [math.log(math.expm1(v)) if v < 700 else v
                                              for v in np.asarray(x)], rtol=1e-13)
    assert float(log_expm1(jnp.inf)) == math.inf
    # bregman: r = 0 gives s; equals the definition elsewhere; huge δ does not overflow early.
    np.testing.assert_allclose(bregman(jnp.log(2.0), -jnp.inf), 2.0)
    for ls, lr in [(0.3, -0.2), (5.0, -3.0), (-4.0, 2.0), (30.0, -30.0)]:
        s, r = math.exp(ls), math.exp(lr)
        np.testing.assert_allclose(bregman(ls, lr), s - r * ls + r * (lr - 1), rtol=1e-12)
    with jax.enable_x64(False):
        v = bregman(jnp.float32(80.0), jnp.float32(-80.0))  # e^{160} would overflow float32
        assert bool(jnp.isfinite(v))


@pytest.mark.parametrize("name", ["uniform", "absorbing"])
def test_ignored_entries_get_no_value_and_no_gradient(name):
    """The y = x_t entry (and, for absorbing, every unmasked position) is ignored entirely."""
    proc = PROCS[name]
    x0, xt, ls, sb, sg = _inputs(proc, seed=12)
    ignored = np.eye(proc.num_states, dtype=bool)[xt]
    if isinstance(proc, Absorbing):
        ignored |= (xt != proc.mask_id)[..., None]
    wild = np.where(ignored, 1e4, ls).astype(np.float32)
    tame = np.where(ignored, 0.0, ls).astype(np.float32)
    args = (jnp.asarray(xt), jnp.asarray(x0), jnp.asarray(sb, jnp.float32),
            jnp.asarray(sg, jnp.float32))
    np.testing.assert_allclose(_se(proc, jnp.asarray(wild), *args)[0],
                               _se(proc, jnp.asarray(tame), *args)[0], rtol=1e-6)
    for method in ("auto", "generic"):
        g = jax.grad(lambda z: _se(proc, z, *args, method=method)[0].sum())(jnp.asarray(wild))
        assert bool(jnp.isfinite(g).all())
        assert float(jnp.abs(jnp.where(ignored, g, 0.0)).max()) == 0.0


def test_score_entropy_errors_and_jit():
    proc = Absorbing(4)
    ls = jnp.zeros((2, 3, 5))
    xt = jnp.full((2, 3), 4)
    x0 = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="log_score"):
        score_entropy(proc, jnp.zeros((2, 3, 4)), xt, x0, 1.0, 1.0)
    with pytest.raises(ValueError, match="x0"):
        score_entropy(proc, ls, xt, x0[:, :2], 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma_bar"):
        score_entropy(proc, ls, xt, x0, jnp.ones(3), 1.0)
    with pytest.raises(ValueError, match="method"):
        score_entropy(proc, ls, xt, x0, 1.0, 1.0, method="fast")
    with pytest.raises(ValueError, match="closed_form"):
        score_entropy(PROCS["dense"], jnp.zeros((2, 3, 4)), xt * 0, x0, 1.0, 1.0,
                      method="closed_form")
    f = jax.jit(lambda ls, sb: score_entropy(proc, ls, xt, x0, sb, 1.0)[0])
    out = f(ls, jnp.array([0.5, 2.0]))
    chex.assert_shape(out, (2, 3))
    assert bool(jnp.isfinite(out).all())
