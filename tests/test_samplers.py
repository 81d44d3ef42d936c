"""Samplers: exact float32 categorical draws, and block-by-block generation (BD3-LM, AR).

* the categorical sampler against its target by a χ² test, with a token of probability 1e-7;
* the block generator driven by an exact oracle (posterior marginals of a known joint by
  enumeration) reproduces the joint: first-hitting exactly, ancestral up to its step error;
* KV-cached generation equals the uncached twin (the prefix recomputed under the block-causal
  mask at every step) token for token, for BD3-LM and AR; samples do not depend on the batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dlm_jax import oracles
from dlm_jax.methods.ar import Autoregressive
from dlm_jax.methods.masked import Masked
from dlm_jax.processes.schedules import LogLinear
from dlm_jax.processes.transitions import Absorbing
from dlm_jax.samplers import categorical
from dlm_jax.samplers.block import (BlockDecoder, generate_ar, generate_blocks,
                                    generate_score_blocks)
from test_models import L as MODEL_LEN, V as MODEL_VOCAB, random_model


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


# ---------------------------------------------------------------------------------------------
# categorical
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("n", "k", "top_p", "temperature"))
def _counts(key, log_probs, n, k=0, top_p=1.0, temperature=1.0):
    draws = categorical.sample(key, jnp.broadcast_to(log_probs, (n,) + log_probs.shape),
                               top_k=k, top_p=top_p, temperature=temperature)
    return jnp.bincount(draws, length=log_probs.shape[-1])


def test_categorical_chi_square_with_a_rare_token(optimized):
    """2^27 draws: the 1e-7 token appears ≈ 13 times (a float32 Gumbel of −log(−log U) with U on
    the 2^-23 grid cannot produce it: its largest value is ≈ 16.6 < −log 1e-7 + the top's)."""
    p = np.array([1e-7, 0.25, 0.75 - 1e-7])
    lp = jnp.log(jnp.asarray(p, jnp.float32))
    n, chunks = 1 << 24, 8
    counts = sum(np.asarray(_counts(jax.random.key(i), lp, n)) for i in range(chunks))
    total = n * chunks
    _, pval = stats.chisquare(counts, p * total)
    assert pval > 1e-3, (counts, p * total)
    assert 3 <= counts[0] <= 30, counts   # Poisson(13.4): outside [3, 30] has prob < 1e-4


def test_categorical_temperature_top_k_top_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    lp = jnp.log(jnp.asarray(p, jnp.float32))
    n = 200_000
    # nucleus 0.8 keeps {0.5, 0.3} (cumulative 0.8 ≤ 0.8; the token crossing p is dropped).
    c = np.asarray(_counts(jax.random.key(1), lp, n, top_p=0.85))
    assert c[2:].sum() == 0 and stats.chisquare(c[:2], np.array([5, 3]) / 8 * n).pvalue > 1e-3
    c = np.asarray(_counts(jax.random.key(2), lp, n, top_p=0.3))        # always the top one
    assert c[0] == n
    c = np.asarray(_counts(jax.random.key(3), lp, n, k=3))
    assert c[3] == 0 and stats.chisquare(c[:3], p[:3] / p[:3].sum() * n).pvalue > 1e-3
    t = 0.5
    pt = p ** (1 / t) / (p ** (1 / t)).sum()
    c = np.asarray(_counts(jax.random.key(4), lp, n, temperature=t))
    assert stats.chisquare(c, pt * n).pvalue > 1e-3
    assert int(categorical.sample(jax.random.key(0), lp, temperature=0.0)) == 0   # greedy
    w = jnp.asarray([0.0, 2.0, 6.0])                                     # unnormalised weights
    draws = categorical.sample_probs(jax.random.key(5), jnp.broadcast_to(w, (n, 3)))
    c = np.bincount(np.asarray(draws), minlength=3)
    assert c[0] == 0 and stats.chisquare(c[1:], [n / 4, 3 * n / 4]).pvalue > 1e-3


def test_target_log_probs_is_what_sample_draws_from():
    """The closed form of `sample`'s distribution, against the draws of the test above."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    lp = jnp.log(jnp.asarray(p, jnp.float32))
    for kw in ({"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.85},
               {"temperature": 2.0, "top_k": 2}):
        q = np.exp(np.asarray(categorical.target_log_probs(lp, **kw), np.float64))
        n = 200_000
        c = np.asarray(_counts(jax.random.key(7), lp, n, k=kw.get("top_k", 0),
                               top_p=kw.get("top_p", 1.0),
                               temperature=kw.get("temperature", 1.0)))
        np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)
        assert np.all(c[q == 0] == 0)
        expected = q[q > 0] / q[q > 0].sum() * n  # float32 rounding of q's sum
        assert stats.chisquare(c[q > 0], expected).pvalue > 1e-3, (kw, c, q)
    with pytest.raises(ValueError, match="temperature > 0"):
        categorical.target_log_probs(lp, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# block generation driven by an exact oracle
# ---------------------------------------------------------------------------------------------

def oracle_decoder(joint, process, length):
    """A BlockDecoder over a known joint: p(x_0^i | x_t, committed prefix) by enumeration. The
    future blocks are masked, which carries no information under the absorbing process."""
    mask_id = process.mask_id

    def posterior(block, cache):
        tokens, start = cache
        x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
        post = oracles.exact_x0_posterior(joint, process, x, 1.0)
        rows = jax.lax.dynamic_slice_in_dim(post, start, block.shape[1], axis=1)
        return jnp.log(rows), x

    def commit(block, cache):
        lp, x = posterior(block, cache)
        return lp, (x, cache[1] + block.shape[1])

    return BlockDecoder(lambda b: (jnp.full((b, length), mask_id, jnp.int32), jnp.int32(0)),
                        lambda block, sigma, cache: posterior(block, cache)[0], commit)


def _tv(samples, joint):
    v, length = joint.shape[0], joint.ndim
    idx = np.asarray(oracles.sequence_index(jnp.asarray(samples), v))
    emp = np.bincount(idx, minlength=v ** length) / len(idx)
    return 0.5 * np.abs(emp - np.asarray(joint).reshape(-1)).sum()


def _tv_floor(joint, n):
    """E[TV] of n exact samples ≈ Σ sqrt(p(1−p)/(2πn)) (half-normal means)."""
    p = np.asarray(joint).reshape(-1)
    return float(np.sum(np.sqrt(p * (1 - p) / (2 * np.pi * n))))


VOCAB, LENGTH, N = 3, 4, 40_000


@pytest.fixture(scope="module")
def joint():
    return jnp.asarray(oracles.random_joint(7, VOCAB, LENGTH), jnp.float32)


@pytest.mark.parametrize("sampler,block,steps,slack", [
    ("first_hitting", 2, 1, 1.5), ("first_hitting", 4, 1, 1.5), ("first_hitting", 1, 1, 1.5),
    ("ancestral", 1, 1, 1.5)])  # ancestral with Lb > 1: test_ancestral_error_shrinks_with_steps
def test_block_generation_follows_the_joint(joint, sampler, block, steps, slack):
    process = Absorbing(VOCAB)
    run = jax.jit(lambda keys: generate_blocks(
        oracle_decoder(joint, process, LENGTH), keys, length=LENGTH, block_len=block,
        steps=steps, mask_id=VOCAB, schedule=LogLinear(eps=0.0), sampler=sampler))
    out = run(_keys(N))
    floor = _tv_floor(joint, N)
    tv = _tv(out["tokens"], joint)
    assert tv < slack * floor + 0.005, (tv, floor)
    assert np.all(np.asarray(out["lengths"]) == LENGTH) and int(out["blocks"]) == LENGTH // block


def test_ancestral_error_shrinks_with_steps(joint):
    """Revealing two positions of a block in one step draws them independently: the error of
    the ancestral sampler with one block of 4 falls as the steps grow."""
    process = Absorbing(VOCAB)
    tvs = []
    for steps in (1, 4, 64):
        out = jax.jit(lambda keys, steps=steps: generate_blocks(
            oracle_decoder(joint, process, LENGTH), keys, length=LENGTH, block_len=LENGTH,
            steps=steps, mask_id=VOCAB, schedule=LogLinear(eps=0.0)))(_keys(N, 1))
        tvs.append(_tv(out["tokens"], joint))
    floor = _tv_floor(joint, N)
    assert tvs[0] > tvs[1] > tvs[2] and tvs[0] > 5 * floor and tvs[2] < 2 * floor + 0.01, tvs


def test_prompt_and_oracle_conditional(joint):
    """A prompt of 1 token: the rest follows p(x_1: | x_0 = prompt)."""
    process = Absorbing(VOCAB)
    prompt = jnp.ones((N, 1), jnp.int32)
    out = jax.jit(lambda keys: generate_blocks(
        oracle_decoder(joint, process, LENGTH), keys, length=LENGTH, block_len=2, steps=1,
        mask_id=VOCAB, schedule=LogLinear(eps=0.0), sampler="first_hitting",
        prompt=prompt))(_keys(N, 2))
    tokens = np.asarray(out["tokens"])
    assert np.all(tokens[:, 0] == 1)
    cond = np.asarray(joint)[1] / np.asarray(joint)[1].sum()
    tv = _tv(tokens[:, 1:], jnp.asarray(cond))
    assert tv < 1.5 * _tv_floor(cond, N) + 0.005


# ---------------------------------------------------------------------------------------------
# the model: cached equals uncached, batch independence, variable length, errors
# ---------------------------------------------------------------------------------------------

BLOCK = 4


@pytest.fixture(scope="module")
def bd3lm():
    method = Masked(process=Absorbing(MODEL_VOCAB - 1), schedule=LogLinear(eps=0.0),
                    seq_len=MODEL_LEN, block_size=BLOCK)
    return method, random_model(3)


def _bd3lm_run(method, model, keys, *, cached, sampler="ancestral", steps=6, **kw):
    dec = method.block_decoder(model, MODEL_LEN, cached=cached)
    return generate_blocks(dec, keys, length=MODEL_LEN, block_len=BLOCK, steps=steps,
                           mask_id=method.process.mask_id, schedule=method.schedule,
                           sampler=sampler, **kw)


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
def test_bd3lm_cached_equals_uncached(bd3lm, sampler):
    method, model = bd3lm
    keys = _keys(4, 3)
    cached = jax.jit(lambda k: _bd3lm_run(method, model, k, cached=True, sampler=sampler))(keys)
    plain = jax.jit(lambda k: _bd3lm_run(method, model, k, cached=False, sampler=sampler))(keys)
    np.testing.assert_array_equal(cached["tokens"], plain["tokens"])
    assert int(cached["nfe"]) == int(plain["nfe"]) > 0
    tokens = np.asarray(cached["tokens"])
    assert np.all(tokens < method.process.mask_id)              # every mask revealed
    assert len(np.unique(tokens)) > 5                            # not a constant


def test_bd3lm_skip_unchanged_is_exact_and_saves_calls(bd3lm):
    method, model = bd3lm
    untimed = random_model(3, time_conditioning=False)          # p_θ independent of σ
    keys = _keys(3, 4)
    full = jax.jit(lambda k: _bd3lm_run(method, untimed, k, cached=True, steps=32))(keys)
    skip = jax.jit(lambda k: _bd3lm_run(method, untimed, k, cached=True, steps=32,
                                        skip_unchanged=True))(keys)
    np.testing.assert_array_equal(full["tokens"], skip["tokens"])
    assert int(skip["nfe"]) < int(full["nfe"]) <= 32 * MODEL_LEN // BLOCK


def test_samples_do_not_depend_on_the_batch(bd3lm):
    method, model = bd3lm
    keys = _keys(8, 5)
    run = jax.jit(lambda k: _bd3lm_run(method, model, k, cached=True)["tokens"])
    batch = np.asarray(run(keys))
    for i in (0, 5):
        np.testing.assert_array_equal(np.asarray(run(keys[i:i + 1]))[0], batch[i])


def test_variable_length_stops_at_eos_and_low_entropy(bd3lm):
    method, model = bd3lm
    keys = _keys(4, 6)
    eos = 7
    out = jax.jit(lambda k: _bd3lm_run(method, model, k, cached=True, eos_id=eos))(keys)
    tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    for row, n in zip(tokens, lengths):
        hits = np.flatnonzero(row == eos)
        assert n == (hits[0] + 1 if len(hits) else MODEL_LEN)
    # A prompt of one repeated token and a threshold above log(4) on a 4-token window: every
    # row is low-entropy after its first block, and generation stops there.
    prompt = jnp.zeros((4, BLOCK), jnp.int32)
    out = jax.jit(lambda k: _bd3lm_run(method, model, k, cached=True, prompt=prompt,
                                       stop_entropy=1.0, entropy_window=BLOCK))(keys)
    assert int(out["blocks"]) == 1 and np.all(np.asarray(out["lengths"]) == BLOCK)


def test_generation_errors(bd3lm):
    method, model = bd3lm
    dec = method.block_decoder(model, MODEL_LEN, cached=False)
    common = dict(mask_id=method.process.mask_id, schedule=method.schedule, steps=2)
    with pytest.raises(ValueError, match="block size 5 must divide the length 16"):
        generate_blocks(dec, _keys(1), length=MODEL_LEN, block_len=5, **common)
    with pytest.raises(ValueError, match="prompt has 20 tokens, more than the length 16"):
        generate_blocks(dec, _keys(1), length=MODEL_LEN, block_len=4,
                        prompt=jnp.zeros((1, 20), jnp.int32), **common)
    with pytest.raises(ValueError, match="unknown block sampler 'gibbs'"):
        generate_blocks(dec, _keys(1), length=MODEL_LEN, block_len=4, sampler="gibbs", **common)
    with pytest.raises(ValueError, match="length 32 exceeds what this decoder can hold"):
        generate_blocks(dec, _keys(1), length=32, block_len=4, **common)


def check_ar_cached_equals_uncached(model, model_len):
    """AR generation through the KV cache equals the recomputed twin token for token, and a
    sliding 8-token cache agrees while the whole prefix fits (also run for GPT-2)."""
    method = Autoregressive()
    keys, prompt = _keys(3, 7), jnp.asarray([[1, 2, 3]] * 3, jnp.int32)

    def run(cached, length=model_len, window=None):
        dec = method.block_decoder(model, length, cached=cached, window=window)
        return generate_ar(dec, keys, length=length, prompt=prompt, temperature=0.8)

    cached, plain = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
    np.testing.assert_array_equal(cached["tokens"], plain["tokens"])
    np.testing.assert_array_equal(np.asarray(cached["tokens"])[:, :3], prompt)
    # beyond the window: a sliding 8-token cache produces 24 tokens; the first 9 (while the
    # whole prefix fits) equal the full-cache run's.
    long = jax.jit(lambda: run(True, length=24, window=8))()
    np.testing.assert_array_equal(np.asarray(long["tokens"])[:, :9],
                                  np.asarray(cached["tokens"])[:, :9])
    return method, keys


def test_ar_cached_equals_uncached_and_slides():
    model = random_model(4, causal=True)
    method, keys = check_ar_cached_equals_uncached(model, MODEL_LEN)
    with pytest.raises(ValueError, match="needs a prompt of at least one token"):
        generate_ar(method.block_decoder(model, 8), keys, length=8, prompt=None)


def test_bd3lm_beyond_the_training_length_slides_the_cache(bd3lm):
    """48 tokens from a model of length 16: the KV window slides (one commit per block, never an
    overflow); the first 16 tokens equal the 16-token generation's (same per-block keys)."""
    method, model = bd3lm
    keys = _keys(2, 8)

    def run(length):
        dec = method.block_decoder(model, length, cached=True)
        return generate_blocks(dec, keys, length=length, block_len=BLOCK, steps=4,
                               mask_id=method.process.mask_id, schedule=method.schedule)
    short, long = jax.jit(lambda: run(MODEL_LEN))(), jax.jit(lambda: run(3 * MODEL_LEN))()
    np.testing.assert_array_equal(np.asarray(long["tokens"])[:, :MODEL_LEN], short["tokens"])
    assert int(long["blocks"]) == 12 and np.all(np.asarray(long["tokens"]) < 36)


# ---------------------------------------------------------------------------------------------
# block diffusion with score entropy (SEDD inside a block)
# ---------------------------------------------------------------------------------------------

def oracle_score_decoder(joint, process, length):
    """Exact log-ratios of the block's positions given the committed prefix (absorbing: the
    masked future carries no information)."""
    def log_score(block, sigma, cache):
        tokens, start = cache
        x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
        # sedd_sample steps every row on one time grid: one exact marginal serves the batch.
        ratios = oracles.exact_log_ratios(joint, process, x, sigma[0])
        return jax.lax.dynamic_slice_in_dim(ratios, start, block.shape[1], axis=1)

    def commit(block, cache):
        tokens, start = cache
        return None, (jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1),
                      start + block.shape[1])

    return BlockDecoder(lambda b: (jnp.full((b, length), process.mask_id, jnp.int32),
                                   jnp.int32(0)), log_score, commit)


def test_score_entropy_blocks_follow_the_joint(joint):
    process, n = Absorbing(VOCAB), 20_000
    out = jax.jit(lambda keys: generate_score_blocks(
        oracle_score_decoder(joint, process, LENGTH), keys, length=LENGTH, block_len=2,
        steps=64, process=process, schedule=LogLinear(eps=1e-3)))(_keys(n, 9))
    tv = _tv(out["tokens"], joint)
    assert tv < 1.5 * _tv_floor(joint, n) + 0.02, (tv, _tv_floor(joint, n))
    assert int(out["nfe"]) == 2 * 65


def test_score_entropy_blocks_cached_equals_uncached_uniform_with_prompt():
    """Block SEDD over a uniform process (no paper ran it): the KV-cached generator equals the
    uncached twin token for token, with a prompt that ends inside a block."""
    from dlm_jax.methods.sedd import ScoreEntropy
    from dlm_jax.processes.schedules import Geometric
    from dlm_jax.processes.transitions import Uniform
    method = ScoreEntropy(process=Uniform(MODEL_VOCAB), schedule=Geometric(1e-3, 8.0),
                          seq_len=MODEL_LEN, block_size=BLOCK)
    model = random_model(5)
    keys, prompt = _keys(3, 10), jnp.asarray([[1, 2, 3, 4, 5, 6]] * 3, jnp.int32)

    def run(cached):
        dec = method.block_decoder(model, MODEL_LEN, cached=cached)
        return generate_score_blocks(dec, keys, length=MODEL_LEN, block_len=BLOCK, steps=5,
                                     process=method.process, schedule=method.schedule,
                                     prompt=prompt)
    cached, plain = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
    np.testing.assert_array_equal(cached["tokens"], plain["tokens"])
    tokens = np.asarray(cached["tokens"])
    np.testing.assert_array_equal(tokens[:, :6], prompt)
    assert tokens.min() >= 0 and tokens.max() < MODEL_VOCAB and len(np.unique(tokens)) > 5
