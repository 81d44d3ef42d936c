"""Jacobi (fixed-point) decoding of AR models equals sequential decoding with the same noise.

* whole-sequence Jacobi == `sequential_decode` == `generate_ar` (the uncached twin, same keys),
  greedy and sampled (with temperature / top-k / top-p), on a random causal DiT and on an exact
  oracle (the conditionals of a random joint table by marginalisation);
* iterations never exceed L − P; a capped run keeps its final prefix;
* windowed (KV-cached) Jacobi == whole-sequence Jacobi for several windows; the cached window
  scorer equals the full causal pass;
* sampled Jacobi follows the oracle's joint (it is ancestral sampling); rows do not depend on
  their batch; bad inputs raise one clear ValueError.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import oracles
from dlm_jax.methods.ar import Autoregressive
from dlm_jax.samplers.block import BlockDecoder, generate_ar
from dlm_jax.samplers.jacobi import (jacobi_decode, jacobi_decode_windows,
                                     sequential_decode)
from test_models import L as MODEL_LEN, V as MODEL_VOCAB, random_model
from test_samplers import _keys, _tv, _tv_floor

PROMPT = 5
SAMPLING = {"greedy": dict(greedy=True), "sampled": dict(),
            "truncated": dict(temperature=0.8, top_k=10, top_p=0.9)}


def _ar_kwargs(kw):
    """`generate_ar` spells greedy as temperature 0."""
    kw = dict(kw)
    return dict(kw, temperature=0.0) if kw.pop("greedy", False) else kw


# ---------------------------------------------------------------------------------------------
# the oracle: an AR model given by the conditionals of a known joint
# ---------------------------------------------------------------------------------------------

def oracle_next_log_probs(joint):
    """tokens (B, L) -> (B, L, V): log p(x_{i+1} | x_{≤i}) of `joint` (row L − 1: zeros)."""
    p = np.asarray(joint, np.float64)
    v, length = p.shape[0], p.ndim
    tables = []
    for i in range(length - 1):   # marginal of x_{≤i+1}, as (prefix index, next token)
        m = p.sum(axis=tuple(range(i + 2, length))).reshape(v ** (i + 1), v)
        tables.append(jnp.asarray(np.log(m / m.sum(-1, keepdims=True)), jnp.float32))

    def fn(tokens):
        rows = [t[oracles.sequence_index(tokens[:, :i + 1], v)] for i, t in enumerate(tables)]
        return jnp.stack(rows + [jnp.zeros_like(rows[0])], axis=1)
    return fn


def full_pass_decoder(fn, length):
    """A window BlockDecoder that rescores the whole sequence with `fn` (no cache)."""
    def scores(block, cache):
        tokens, start = cache
        x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
        return jax.lax.dynamic_slice_in_dim(fn(x), start, block.shape[1], axis=1), x

    def commit(block, cache):
        lp, x = scores(block, cache)
        return lp, (x, cache[1] + block.shape[1])

    return BlockDecoder(lambda b: (jnp.zeros((b, length), jnp.int32), jnp.int32(0)),
                        lambda block, sigma, cache: scores(block, cache)[0], commit,
                        max_tokens=length)


OV, OL = 3, 5


@pytest.fixture(scope="module")
def oracle():
    joint = oracles.random_joint(11, OV, OL)
    return joint, oracle_next_log_probs(joint)


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompt(batch, length, vocab, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


# Compiling dominates these tests on CPU: the jitted runs over the model are built once per
# configuration and shared between tests (the model, keys(k, p) -> outputs).
_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        m = random_model(4, causal=True)
        _MODEL = m, Autoregressive().denoiser(m).fn
    return _MODEL


@functools.lru_cache(maxsize=None)
def _runner(kind, mode, window=None):
    m, fn = _model()
    kw = dict(length=MODEL_LEN, **SAMPLING[mode])
    if kind == "jacobi":
        return jax.jit(lambda k, p: jacobi_decode(fn, k, prompt=p, **kw))
    if kind == "sequential":
        return jax.jit(lambda k, p: sequential_decode(fn, k, prompt=p, **kw))
    if kind == "ar":
        dec = Autoregressive().block_decoder(m, MODEL_LEN, cached=False)
        return jax.jit(lambda k, p: generate_ar(dec, k, length=MODEL_LEN, prompt=p,
                                                **_ar_kwargs(SAMPLING[mode]))["tokens"])
    dec = Autoregressive().block_decoder(m, MODEL_LEN)
    return jax.jit(lambda k, p: jacobi_decode_windows(dec, k, window=window, prompt=p, **kw))


# ---------------------------------------------------------------------------------------------
# whole-sequence Jacobi == sequential
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(SAMPLING))
def test_jacobi_equals_sequential_on_the_model(mode):
    jac, seq, ar = (_runner(kind, mode) for kind in ("jacobi", "sequential", "ar"))
    for seed in (0, 1):
        keys, prompt = _keys(3, seed), _prompt(3, PROMPT, MODEL_VOCAB, seed)
        out, ref = jac(keys, prompt), seq(keys, prompt)
        np.testing.assert_array_equal(out["tokens"], ref["tokens"])
        np.testing.assert_array_equal(out["tokens"], ar(keys, prompt))
        np.testing.assert_array_equal(np.asarray(out["tokens"])[:, :PROMPT], prompt)
        iters = np.asarray(out["iterations"])
        # Only the bound is guaranteed. Observed for this untrained model (32 rows, P = 5):
        # greedy 8.4 and sampled 4.9 iterations on average for 11 tokens — with the noise fixed,
        # a flat next-token distribution makes a position's pick insensitive to its context.
        assert np.all(iters <= MODEL_LEN - PROMPT) and np.all(iters >= 1)
        assert np.all(np.asarray(out["converged"])) and int(out["nfe"]) == iters.max()
        assert len(np.unique(np.asarray(out["tokens"]))) > 4


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_jacobi_equals_sequential_on_the_oracle(oracle, mode):
    _, fn = oracle
    kw, prompt_len, b = SAMPLING[mode], 2, 64
    keys, prompt = _keys(b, 3), _prompt(b, prompt_len, OV, 3)
    out = jax.jit(lambda k: jacobi_decode(fn, k, length=OL, prompt=prompt, **kw))(keys)
    ref = jax.jit(lambda k: sequential_decode(fn, k, length=OL, prompt=prompt, **kw))(keys)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    iters = np.asarray(out["iterations"])
    # Observed (4096 rows): 2.3 (greedy) / 2.1 (sampled) of at most 3 iterations: with V = 3 the
    # initial guess (the prompt's last token) or a stale token is often already right.
    assert np.all(iters <= OL - prompt_len) and np.all(np.asarray(out["converged"]))


def test_capped_jacobi_keeps_its_final_prefix(oracle):
    _, fn = oracle
    keys, prompt = _keys(32, 4), _prompt(32, 1, OV, 4)
    ref = np.asarray(sequential_decode(fn, keys, length=OL, prompt=prompt)["tokens"])
    out = jacobi_decode(fn, keys, length=OL, prompt=prompt, max_iters=2)
    tokens, conv = np.asarray(out["tokens"]), np.asarray(out["converged"])
    np.testing.assert_array_equal(tokens[:, :3], ref[:, :3])    # 2 iterations: ≥ 2 final tokens
    np.testing.assert_array_equal(tokens[conv], ref[conv])
    assert int(out["nfe"]) == 2 and not conv.all()


def test_jacobi_sampling_follows_the_joint(oracle):
    """x_0 from the joint's marginal, the rest by Jacobi: the whole joint, to sampling error."""
    joint, fn = oracle
    n = 40_000
    p0 = np.asarray(joint).sum(axis=tuple(range(1, OL)))
    prompt = jnp.asarray(np.random.default_rng(5).choice(OV, size=(n, 1), p=p0), jnp.int32)
    out = jax.jit(lambda k: jacobi_decode(fn, k, length=OL, prompt=prompt))(_keys(n, 5))
    tv, floor = _tv(out["tokens"], joint), _tv_floor(joint, n)
    assert tv < 1.5 * floor + 0.005, (tv, floor)


# ---------------------------------------------------------------------------------------------
# windowed Jacobi over the KV cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,mode", [(4, "sampled"), (8, "greedy"), (2, "truncated")])
def test_windowed_equals_unwindowed_and_sequential(window, mode):
    """P = 5: with W = 4 (and 2) the first window(s) are all prompt (committed as they are) and
    the prompt ends inside the next one; with W = 8 inside the first."""
    keys, prompt = _keys(3, 0), _prompt(3, PROMPT, MODEL_VOCAB, 0)
    out = _runner("windows", mode, window)(keys, prompt)
    full = _runner("jacobi", mode)(keys, prompt)
    ref = _runner("sequential", mode)(keys, prompt)
    np.testing.assert_array_equal(out["tokens"], full["tokens"])
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    k = MODEL_LEN // window
    per_window = np.asarray(out["window_iterations"])
    assert per_window.shape == (3, k) and np.all(per_window <= window - 1)
    assert np.all(per_window[:, :PROMPT // window] == 0)         # all-prompt windows: no call
    np.testing.assert_array_equal(out["iterations"], per_window.sum(1))
    assert int(out["commits"]) == k - 1 and np.all(np.asarray(out["converged"]))
    assert int(out["nfe"]) == int(out["commits"]) + per_window.max(0).sum()
    assert np.all(np.asarray(out["iterations"]) <= MODEL_LEN - PROMPT)


def test_window_scorer_matches_the_full_causal_pass(model):
    m, fn = model
    tokens = _prompt(2, MODEL_LEN, MODEL_VOCAB, 7)
    dec = Autoregressive().block_decoder(m, MODEL_LEN)

    def scores(tokens):
        cache = dec.init(2)
        committed, cache = dec.commit(tokens[:, :4], cache)
        committed2, cache = dec.commit(tokens[:, 4:8], cache)
        window = dec.log_probs(tokens[:, 8:12], None, cache)
        again = dec.log_probs(tokens[:, 8:12], None, cache)      # the cache was only read
        return jnp.concatenate([committed, committed2, window], 1), again
    got, again = jax.jit(scores)(tokens)
    want = jax.jit(fn)(tokens)[:, :12]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(again, got[:, 8:12])


@pytest.mark.parametrize("window", [1, OL])
def test_windowed_on_the_oracle(oracle, window):
    """W = 1 is `generate_ar` (commits only); W = L is whole-sequence Jacobi plus nothing."""
    _, fn = oracle
    keys, prompt = _keys(16, 8), _prompt(16, 2, OV, 8)
    dec = full_pass_decoder(fn, OL)
    out = jax.jit(lambda k: jacobi_decode_windows(dec, k, length=OL, window=window,
                                                  prompt=prompt))(keys)
    full = jax.jit(lambda k: jacobi_decode(fn, k, length=OL, prompt=prompt))(keys)
    ar = jax.jit(lambda k: generate_ar(dec, k, length=OL, prompt=prompt)["tokens"])(keys)
    np.testing.assert_array_equal(out["tokens"], full["tokens"])
    np.testing.assert_array_equal(out["tokens"], ar)
    if window == 1:
        assert int(out["nfe"]) == int(out["commits"]) == OL - 1
        assert np.all(np.asarray(out["iterations"]) == 0)
    else:
        np.testing.assert_array_equal(out["iterations"], full["iterations"])
        assert int(out["commits"]) == 0


# ---------------------------------------------------------------------------------------------
# batch independence, errors
# ---------------------------------------------------------------------------------------------

def test_rows_do_not_depend_on_the_batch():
    keys, prompt = _keys(3, 1), _prompt(3, PROMPT, MODEL_VOCAB, 1)
    for run in (_runner("jacobi", "sampled"), _runner("windows", "sampled", 4)):
        batch = run(keys, prompt)
        for i in (0, 2):
            alone = run(keys[i:i + 1], prompt[i:i + 1])
            np.testing.assert_array_equal(np.asarray(alone["tokens"])[0],
                                          np.asarray(batch["tokens"])[i])
            assert int(alone["iterations"][0]) == int(batch["iterations"][i])


def test_bad_inputs(oracle):
    _, fn = oracle
    keys = _keys(2)
    dec = full_pass_decoder(fn, OL)
    ok = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="the window 2 must divide the length 5"):
        jacobi_decode_windows(dec, keys, length=OL, window=2, prompt=ok)
    with pytest.raises(ValueError, match="the prompt has 6 tokens, more than the length 5"):
        jacobi_decode(fn, keys, length=OL, prompt=jnp.zeros((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="the prompt has 6 tokens, more than the length 5"):
        jacobi_decode_windows(dec, keys, length=OL, window=1, prompt=jnp.zeros((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="prompt of at least one token"):
        sequential_decode(fn, keys, length=OL, prompt=None)
    with pytest.raises(ValueError, match="one key per row"):
        jacobi_decode(fn, _keys(3), length=OL, prompt=ok)
