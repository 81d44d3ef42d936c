"""Exact samplers of an AR model that use a diffusion model as drafter or proposal.

The AR model is enumerable: the exact conditionals p(x_i | x_<i) of a known joint over V = 3
tokens and L = 4 positions (after a BOS), with a few sequences of probability 0. The drafters are
deliberately wrong: the exact SUBS denoiser of a *different* joint, so exactness comes from the
accept/reject rules, not from the drafter.

* speculative sampling reproduces the joint (TV against the sampling floor) for one-step,
  chunked left-to-right and random-order drafts; a perfect drafter revealing left to right is
  always accepted; prompts kept, rows independent of the batch, errors;
* MH: from a bad init the chains' law approaches the joint for the uniform and the masked
  proposal; the code's log α equals the enumerated likelihood × proposal ratio; Gibbs (the
  exact denoiser, m = 1) and full masking of a factorised target accept every move.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.methods.base import Denoiser
from dlm_jax.samplers import mh, speculative

V, L = 3, 4                 # real tokens, generated positions
LT = L + 1                  # with the BOS (token 0) at position 0
MASK, S = V, V + 1          # the drafter's mask state and its state count


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _tv(samples, joint):
    idx = np.asarray(oracles.sequence_index(jnp.asarray(samples), joint.shape[0]))
    emp = np.bincount(idx, minlength=joint.size) / len(idx)
    return 0.5 * np.abs(emp - np.asarray(joint).reshape(-1)).sum()


def _tv_floor(joint, n):
    """E[TV] of n exact samples ≈ Σ sqrt(p(1 − p)/(2πn)) (half-normal means)."""
    p = np.asarray(joint).reshape(-1)
    return float(np.sum(np.sqrt(p * (1 - p) / (2 * np.pi * n))))


def _joint(seed, zeros=0):
    """A random joint over (V,)*L in float64; `zeros` of its smallest entries set to 0."""
    p = oracles.random_joint(seed, V, L).reshape(-1)
    p[np.argsort(p)[:zeros]] = 0.0
    return (p / p.sum()).reshape((V,) * L)


def ar_model(joint):
    """tokens (B, LT) -> (B, LT, V): row i = log p(x_{i+1} | x_1 … x_i) of `joint` (the BOS at
    0 is ignored; conditionals of impossible prefixes are uniform; the last row is unused)."""
    tables = []
    for i in range(L):
        marg = joint.sum(axis=tuple(range(i + 1, L))).reshape(V ** i, V)
        tot = marg.sum(-1, keepdims=True)
        cond = np.where(tot > 0, marg / np.where(tot > 0, tot, 1.0), 1.0 / V)
        with np.errstate(divide="ignore"):
            tables.append(jnp.asarray(np.log(cond), jnp.float32))

    def fn(tokens):
        rows = [tables[i][oracles.sequence_index(tokens[:, 1:i + 1], V) if i else 0]
                for i in range(L)]
        rows = [jnp.broadcast_to(r, (tokens.shape[0], V)) for r in rows]
        return jnp.stack(rows + [jnp.full((tokens.shape[0], V), -np.log(V), jnp.float32)], 1)
    return fn


def subs_model(joint):
    """(xt (B, LT), σ̄) -> (B, LT, S): the exact SUBS log p(x_0 | x_t) of `joint` (absorbing, the
    mask carries no information), from a float64 table over every masked pattern."""
    seqs = np.asarray(oracles.all_sequences(V, L))                      # (K, L)
    pats = np.asarray(oracles.all_sequences(S, L))                      # (M, L)
    fits = ((pats[:, None] == MASK) | (pats[:, None] == seqs[None])).all(-1)   # (M, K)
    w = fits * joint.reshape(-1)[None]
    post = np.einsum("mk,kls->mls", w, np.eye(S)[seqs])
    tot = w.sum(-1)[:, None, None]
    post = np.where(tot > 0, post / np.where(tot > 0, tot, 1.0), np.eye(S)[:V].mean(0))
    post[pats != MASK] = np.eye(S)[pats[pats != MASK]]                  # carry-over
    with np.errstate(divide="ignore"):
        table = jnp.asarray(np.log(post), jnp.float32)

    def fn(xt, sigma_bar):
        del sigma_bar
        rest = table[oracles.sequence_index(xt[:, 1:], S)]
        first = jnp.log(jax.nn.one_hot(xt[:, :1], S))
        return jnp.concatenate([first, rest], axis=1)
    return fn


def _bos(n):
    return jnp.zeros((n, 1), jnp.int32)


@pytest.fixture(scope="module")
def target():
    return _joint(11, zeros=6)


@pytest.fixture(scope="module")
def wrong():
    return _joint(12)


# ---------------------------------------------------------------------------------------------
# speculative sampling
# ---------------------------------------------------------------------------------------------

N_SPEC = 40_000


@pytest.mark.parametrize("order,k,steps", [
    ("left_to_right", 2, 1), ("left_to_right", 4, 2), ("random", 4, 3)])
def test_speculative_follows_the_ar_joint(target, wrong, order, k, steps):
    ar, sub = ar_model(target), subs_model(wrong)
    run = jax.jit(lambda keys: speculative.speculative_sample(
        ar, sub, keys, _bos(N_SPEC), length=LT, draft_len=k,
        mask_id=MASK, draft_steps=steps, order=order))
    out = run(_keys(N_SPEC, 1))
    tokens = np.asarray(out["tokens"])
    assert np.all(tokens[:, 0] == 0) and tokens.min() >= 0 and tokens.max() < V
    tv, floor = _tv(tokens[:, 1:], target), _tv_floor(target, N_SPEC)
    print(f"\n{order} k={k} steps={steps}: TV {tv:.4f} floor {floor:.4f} acceptance "
          f"{float(out['acceptance']):.3f} tokens/AR pass "
          f"{float(np.mean(out['tokens_per_pass'])):.2f} rounds {int(out['rounds'])}")
    assert tv < 1.5 * floor + 0.005, (tv, floor)
    ar, dp = np.asarray(out["ar_passes"]), np.asarray(out["draft_passes"])
    assert np.all((ar >= 1) & (ar <= L)) and int(out["rounds"]) == ar.max()
    assert np.all(dp <= steps * ar) and np.all(dp >= ar) and int(out["draft_nfe"]) >= dp.max()
    acc, tested = np.asarray(out["accepted"]), np.asarray(out["tested"])
    assert np.all(acc <= tested) and np.all(tested <= np.asarray(out["drafted"]))
    assert 0.0 < float(out["acceptance"]) < 1.0      # a wrong drafter: some rejections
    # every round emits the kept tokens plus one (residual or bonus) until the length is hit
    assert np.all(acc + ar >= L) and np.all(acc + ar <= L + 1)


def test_perfect_drafter_is_always_accepted(target):
    """The exact SUBS denoiser of the target, revealing one token per step left to right, is
    the AR model's own conditional: all 3 draft tokens are kept and the bonus completes the
    4 tokens in one AR pass. (In one parallel step it would propose the marginals instead.)"""
    n = 4096
    ar, sub = ar_model(target), subs_model(target)
    out = jax.jit(lambda keys: speculative.speculative_sample(
        ar, sub, keys, _bos(n), length=LT, draft_len=3,
        draft_steps=3, mask_id=MASK))(_keys(n, 2))
    assert float(out["acceptance"]) == 1.0
    for name, want in (("accepted", 3), ("tested", 3), ("ar_passes", 1), ("draft_passes", 3),
                       ("tokens_per_pass", L)):
        assert np.all(np.asarray(out[name]) == want), name
    assert int(out["rounds"]) == 1 and int(out["draft_nfe"]) == 3


def test_speculative_prompt_batch_independence(target, wrong):
    """A prompt [BOS, 1]: the rest follows p(x_2: | x_1 = 1); a row's result (tokens and
    per-row counts) does not depend on the other rows of its batch; a Denoiser is accepted in
    place of a function."""
    n = 20_000
    prompt = jnp.asarray([[0, 1]] * n, jnp.int32)
    ar = Denoiser("next_token_log_probs", ar_model(target))
    sub = Denoiser("x0_log_probs", subs_model(wrong))
    run = jax.jit(lambda keys, prompt: speculative.speculative_sample(
        ar, sub, keys, prompt, length=LT, draft_len=2,
        mask_id=MASK, draft_steps=2, order="random"))
    keys = _keys(n, 4)
    out = run(keys, prompt)
    tokens = np.asarray(out["tokens"])
    np.testing.assert_array_equal(tokens[:, :2], prompt)
    cond = target[1] / target[1].sum()
    tv = _tv(tokens[:, 2:], cond)
    assert tv < 1.5 * _tv_floor(cond, n) + 0.005, (tv, _tv_floor(cond, n))
    rows = np.array([0, 7, 123])
    others = run(_keys(n, 5).at[rows].set(keys[rows]), prompt)   # same rows, new neighbours
    np.testing.assert_array_equal(np.asarray(others["tokens"])[rows], tokens[rows])
    for name in ("ar_passes", "draft_passes", "accepted", "tested", "drafted"):
        np.testing.assert_array_equal(np.asarray(others[name])[rows],
                                      np.asarray(out[name])[rows], err_msg=name)
    assert np.any(np.asarray(others["tokens"]) != tokens)


def test_speculative_errors(target, wrong):
    ar, sub, keys = ar_model(target), subs_model(wrong), _keys(2)
    call = speculative.speculative_sample
    kw = dict(length=LT, draft_len=2, mask_id=MASK)
    with pytest.raises(ValueError, match="prompt of at least one token"):
        call(ar, sub, keys, jnp.zeros((2, 0), jnp.int32), **kw)
    with pytest.raises(ValueError, match="more than the length"):
        call(ar, sub, keys, jnp.zeros((2, 9), jnp.int32), **kw)
    with pytest.raises(ValueError, match="one key per row"):
        call(ar, sub, _keys(3), _bos(2), **kw)
    with pytest.raises(ValueError, match=r"draft_steps must be in \[1, draft_len=2\]"):
        call(ar, sub, keys, _bos(2), draft_steps=3, **kw)
    with pytest.raises(ValueError, match="unknown draft order 'backwards'"):
        call(ar, sub, keys, _bos(2), order="backwards", **kw)
    with pytest.raises(ValueError, match="must be a Denoiser of kind 'x0_log_probs'"):
        call(ar, Denoiser("log_score", sub), keys, _bos(2), **kw)
    with pytest.raises(ValueError, match="fewer than the AR vocabulary"):
        call(ar, lambda x, s: sub(x, s)[..., :2], keys, _bos(2), **kw)
    with pytest.raises(ValueError, match="mask_id 1 is a token of the AR vocabulary"):
        call(ar, sub, keys, _bos(2), length=LT, draft_len=2, mask_id=1)


# ---------------------------------------------------------------------------------------------
# Metropolis–Hastings
# ---------------------------------------------------------------------------------------------

N_MH = 20_000


@pytest.mark.parametrize("proposal,m,steps", [("uniform", 1, 150), ("masked", 2, 60)])
def test_mh_converges_to_the_ar_joint(target, wrong, proposal, m, steps):
    """From one bad init (an impossible sequence), the chains' law approaches the joint. (The
    exact T-step law, by enumerating the 81 × 81 kernels, is within 2e-4 of the joint at these
    T; the same masked chain without the proposal ratio in α ends 0.2 away.)"""
    bad = np.argmin(target.reshape(-1))                     # probability 0
    init = np.concatenate([[0], np.asarray(oracles.all_sequences(V, L))[bad]])
    init = jnp.asarray(np.tile(init, (N_MH, 1)), jnp.int32)
    ar, sub = ar_model(target), subs_model(wrong)
    run = jax.jit(lambda keys: mh.mh_sample(
        ar, keys, init, steps=steps, prompt_len=1, proposal=proposal,
        denoiser=sub, mask_id=MASK, num_masked=m, track_log_prob=True))
    out = run(_keys(N_MH, 5))
    tokens = np.asarray(out["tokens"])
    assert np.all(tokens[:, 0] == 0)
    tv, floor = _tv(tokens[:, 1:], target), _tv_floor(target, N_MH)
    print(f"\nMH {proposal} m={m} T={steps}: TV {tv:.4f} floor {floor:.4f} acceptance "
          f"{float(out['acceptance']):.3f}")
    assert tv < 1.5 * floor + 0.005, (tv, floor)
    lp = np.log(target.reshape(-1)[np.asarray(oracles.sequence_index(tokens[:, 1:], V))])
    np.testing.assert_allclose(np.asarray(out["log_prob"]), lp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["log_probs"])[:, -1], np.asarray(out["log_prob"]))
    assert np.all(np.isfinite(np.asarray(out["log_prob"])))
    assert 0.0 < float(out["acceptance"]) < 1.0
    assert int(out["ar_nfe"]) == steps + 1


def _cond_marginal(joint, x, subset, i):
    """p(x_i = · | x_¬S) by enumeration: (V,)."""
    seqs = np.asarray(oracles.all_sequences(V, L))
    fits = np.all([seqs[:, j] == x[j] for j in range(L) if j not in subset], axis=0)
    w = joint.reshape(-1) * fits
    return np.bincount(seqs[:, i], weights=w, minlength=V) / w.sum()


def test_mh_log_acceptance_matches_enumeration(target, wrong):
    """Hand-picked (x, x′, S): log α from the code against log p(x′)/p(x) + Σ_{i∈S}
    log p_θ(x_i | x_¬S) − log p_θ(x′_i | x_¬S) by direct enumeration of the two joints."""
    pairs = [([0, 1, 2, 0], [0, 2, 2, 1], (1, 3)), ([2, 2, 1, 0], [1, 2, 1, 0], (0,)),
             ([1, 0, 0, 2], [2, 1, 0, 1], (0, 1, 3)), ([0, 0, 0, 0], [0, 0, 0, 0], (2, 3))]
    ar, sub = ar_model(target), subs_model(wrong)
    flat = target.reshape(-1)
    for x, y, subset in pairs:
        x_, y_ = (jnp.asarray([[0] + v], jnp.int32) for v in (x, y))
        mask = jnp.asarray([[False] + [j in subset for j in range(L)]])
        lp = sub(jnp.where(mask, MASK, x_), None)
        fwd, rev = mh.masked_log_q(lp, x_, y_, mask, V, MASK)
        got = mh.log_acceptance(mh.sequence_log_prob(ar, y_, 1), mh.sequence_log_prob(ar, x_, 1),
                                fwd, rev)
        ix, iy = (int(oracles.sequence_index(jnp.asarray(v), V)) for v in (x, y))
        want = np.log(flat[iy]) - np.log(flat[ix]) + sum(
            np.log(_cond_marginal(wrong, x, subset, i)[x[i]])
            - np.log(_cond_marginal(wrong, x, subset, i)[y[i]]) for i in subset)
        np.testing.assert_allclose(float(got[0]), want, atol=1e-4)
        # the uniform proposal is symmetric: log α is the likelihood ratio alone
        zero = jnp.zeros((1,))
        np.testing.assert_allclose(float(mh.log_acceptance(
            mh.sequence_log_prob(ar, y_, 1), mh.sequence_log_prob(ar, x_, 1), zero, zero)[0]),
            np.log(flat[iy]) - np.log(flat[ix]), atol=1e-4)


def test_mh_exact_proposals_accept_every_move(target):
    """Gibbs: the exact denoiser of the target with m = 1 gives α = 1. Full masking (m = L) is
    an independence proposal on the product of marginals: α = 1 when the target factorises."""
    n, steps = 512, 40
    init = jnp.asarray(np.tile([0, 1, 1, 2, 0], (n, 1)), jnp.int32)
    safe = _joint(13)                                        # no zeros: every state reachable
    ar, sub = ar_model(safe), subs_model(safe)
    gibbs = jax.jit(lambda keys: mh.mh_sample(
        ar, keys, init, steps=steps, prompt_len=1, proposal="masked",
        denoiser=sub, mask_id=MASK, num_masked=1))(_keys(n, 6))
    assert float(gibbs["acceptance"]) == 1.0
    rng = np.random.default_rng(0)
    marg = rng.dirichlet(np.ones(V), size=L)
    product = np.einsum("a,b,c,d->abcd", *marg)
    ar_p, sub_p = ar_model(product), subs_model(product)
    full = jax.jit(lambda keys: mh.mh_sample(
        ar_p, keys, init, steps=steps, prompt_len=1, proposal="masked",
        denoiser=sub_p, mask_id=MASK, num_masked=L))(_keys(n, 7))
    assert float(full["acceptance"]) == 1.0
    # the same full-masking proposal on a correlated target is rejected at times
    corr = jax.jit(lambda keys: mh.mh_sample(
        ar, keys, init, steps=steps, prompt_len=1, proposal="masked",
        denoiser=sub, mask_id=MASK, num_masked=L))(_keys(n, 7))
    print(f"\nfull masking, correlated target: acceptance {float(corr['acceptance']):.3f}")
    assert float(corr["acceptance"]) < 0.99


def test_mh_prompt_batch_independence_and_errors(target, wrong):
    n = 16
    init = jnp.asarray(np.tile([0, 2, 0, 1, 1], (n, 1)), jnp.int32)
    keys = _keys(n, 8)
    ar, sub = ar_model(target), subs_model(wrong)
    run = jax.jit(lambda keys, init: mh.mh_sample(
        ar, keys, init, steps=30, prompt_len=2, proposal="masked",
        denoiser=sub, mask_id=MASK, num_masked=2))
    out = run(keys, init)
    tokens = np.asarray(out["tokens"])
    np.testing.assert_array_equal(tokens[:, :2], np.asarray(init)[:, :2])
    assert len({tuple(r) for r in tokens}) > 1
    for i in (0, 9):
        alone = run(keys[i:i + 1], init[i:i + 1])
        np.testing.assert_array_equal(np.asarray(alone["tokens"])[0], tokens[i])
        assert float(alone["accept_rate"][0]) == float(out["accept_rate"][i])
    uni = jax.jit(lambda keys: mh.mh_sample(ar, keys, init, steps=30, prompt_len=3))(keys)
    np.testing.assert_array_equal(np.asarray(uni["tokens"])[:, :3], np.asarray(init)[:, :3])

    with pytest.raises(ValueError, match="unknown proposal 'gibbs'"):
        mh.mh_sample(ar, keys, init, steps=2, prompt_len=1, proposal="gibbs")
    with pytest.raises(ValueError, match="prompt_len must be in"):
        mh.mh_sample(ar, keys, init, steps=2, prompt_len=0)
    with pytest.raises(ValueError, match="one key per chain"):
        mh.mh_sample(ar, _keys(3), init, steps=2, prompt_len=1)
    with pytest.raises(ValueError, match="needs a denoiser and its mask_id"):
        mh.mh_sample(ar, keys, init, steps=2, prompt_len=1, proposal="masked")
    with pytest.raises(ValueError, match="num_masked must be in"):
        mh.mh_sample(ar, keys, init, steps=2, prompt_len=1, proposal="masked",
                     denoiser=sub, mask_id=MASK, num_masked=5)
    with pytest.raises(ValueError, match="mask_id 2 is a token of the AR vocabulary"):
        mh.mh_sample(ar, keys, init, steps=2, prompt_len=1, proposal="masked",
                     denoiser=sub, mask_id=2)
    with pytest.raises(ValueError, match="init must be"):
        mh.mh_sample(ar, keys, init.astype(jnp.float32), steps=2, prompt_len=1)
