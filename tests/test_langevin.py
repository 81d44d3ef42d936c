"""Langevin sampling of an AR model over an ordinal vocabulary on its Gaussian-smoothed likelihood
(PnF, `samplers.langevin`), the noisy-history AR objective and model input, and the `ordinal`
data source.

* the smoothed log-likelihood equals an independent float64 loop over a closed-form causal model,
  and integrates to 1 over R^2 (a grid); its gradient equals finite differences, for the closed
  form (float64) and through a random noisy-history DiT (float32);
* annealed Langevin on a fixed categorical (a Gaussian mixture per position) reaches the
  mixture's mean and variance, its tokens the categorical; rows do not depend on the batch; a
  prompt stays clamped;
* the DiT option: other parameters keep their names and values, float values at integers are the
  token lookup, σ = 0 is the plain model; the loss is the NLL of the clean tokens given x + σ·ε;
* end to end: a tiny AR trained on the ordinal source with history noise, sampled with
  `--sampler langevin`, moves the mean absolute first difference and the lag-1 autocorrelation
  of its samples from those of the initial noise to those of the data;
* the ordinal source (shape, range, determinism by seed, splits) and the config errors.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import registry
from dlm_jax.config import Config, ConfigError, DataConfig, validate
from dlm_jax.data import make_dataset, ordinal_sequences
from dlm_jax.data.pipeline import dataset_vocab_size
from dlm_jax.methods.ar import Autoregressive
from dlm_jax.objectives.ar import ar_nll, noisy_history
from dlm_jax.samplers import langevin

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import ordinal  # noqa: E402
import tiny  # noqa: E402

from test_models import V as MODEL_VOCAB, random_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# a closed-form causal model: p(x_{i+1} = k | x̃_≤i, σ) ∝ exp(−(k − m_i)² / (2 τ²))
# ---------------------------------------------------------------------------------------------

def _mean_tau(values, sigma, vocab):
    """m_i = 0.6 x̃_i + 0.3 x̃_{i−1} + 0.05 V (x̃_{−1} := x̃_0), τ = 0.8 + 0.5 σ."""
    prev = jnp.concatenate([values[:, :1], values[:, :-1]], axis=1)
    return 0.6 * values + 0.3 * prev + 0.05 * vocab, 0.8 + 0.5 * sigma[:, None, None]


def closed_form(vocab):
    def fn(values, sigma):
        m, tau = _mean_tau(values, sigma, vocab)
        k = jnp.arange(vocab, dtype=values.dtype)
        return jax.nn.log_softmax(-jnp.square(k - m[..., None]) / (2 * tau ** 2), axis=-1)
    return fn


def loop_log_likelihood(values, sigma, vocab):
    """The same smoothed log-likelihood, position by position in float64 numpy (eq. (1) of
    `samplers.langevin`, written out with explicit densities; uniform prior at position 0)."""
    values = np.asarray(values, np.float64)
    out = np.zeros(values.shape[0])
    k = np.arange(vocab, dtype=np.float64)
    for b in range(values.shape[0]):
        s = float(sigma[b])
        for i in range(values.shape[1]):
            if i == 0:
                weights = np.full(vocab, 1.0 / vocab)
            else:
                m = 0.6 * values[b, i - 1] + 0.3 * values[b, max(i - 2, 0)] + 0.05 * vocab
                tau = 0.8 + 0.5 * s
                w = np.exp(-(k - m) ** 2 / (2 * tau ** 2))
                weights = w / w.sum()
            dens = weights * np.exp(-(values[b, i] - k) ** 2 / (2 * s * s)) / math.sqrt(
                2 * math.pi * s * s)
            out[b] += math.log(dens.sum())
    return out


def test_smoothed_log_likelihood_equals_an_independent_loop():
    vocab, B, L = 7, 3, 6
    rng = np.random.default_rng(0)
    values = rng.uniform(-1.0, vocab, (B, L))
    sigma = np.array([0.3, 1.0, 2.5])
    ll = jax.jit(functools.partial(langevin.smoothed_log_likelihood, closed_form(vocab)),
                 static_argnames="prompt_len")
    with jax.enable_x64(True):
        got = np.asarray(ll(jnp.asarray(values), jnp.asarray(sigma)))
        # A clamped prefix of 2 drops exactly the first two positions' factors.
        tail = np.asarray(ll(jnp.asarray(values), jnp.asarray(sigma), prompt_len=2))
        two = np.asarray(ll(jnp.asarray(values[:, :2]), jnp.asarray(sigma)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, loop_log_likelihood(values, sigma, vocab), rtol=1e-10)
    np.testing.assert_allclose(tail + two, got, rtol=1e-10)


def test_smoothed_likelihood_is_a_density():
    """∫∫ p_σ(x̃_0, x̃_1) dx̃ = 1 on a grid (Riemann sum over ±7σ around the levels)."""
    vocab, sigma = 5, 0.6
    grid = np.linspace(-7 * sigma, vocab - 1 + 7 * sigma, 241)
    dx = grid[1] - grid[0]
    a, b = np.meshgrid(grid, grid, indexing="ij")
    values = np.stack([a.ravel(), b.ravel()], axis=1)
    with jax.enable_x64(True):
        ll = jax.jit(functools.partial(langevin.smoothed_log_likelihood, closed_form(vocab)))(
            jnp.asarray(values), jnp.asarray(sigma))
        total = float(np.exp(np.asarray(ll)).sum() * dx * dx)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_gradient_matches_finite_differences_closed_form():
    vocab, B, L = 6, 2, 5
    rng = np.random.default_rng(1)
    values = jnp.asarray(rng.uniform(0.0, vocab - 1, (B, L)))
    sigma = jnp.asarray([0.5, 1.5])
    fn = closed_form(vocab)
    h = 1e-5
    with jax.enable_x64(True):
        values = values.astype(jnp.float64)
        _, grad = jax.jit(functools.partial(langevin.smoothed_score, fn))(values, sigma)
        steps = h * jnp.eye(L)[:, None, :]                                    # (L, 1, L)
        f = jax.jit(jax.vmap(lambda v: langevin.smoothed_log_likelihood(fn, v, sigma)))
        fd = np.asarray((f(values + steps) - f(values - steps)) / (2 * h)).T  # (B, L)
        grad = np.asarray(grad)
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


def test_gradient_through_the_dit_matches_finite_differences():
    """The real input path: interpolated embedding, noise-level input, causal DiT, float32. The
    model's part of the gradient is checked separately (the Gaussian part alone is not it)."""
    model = random_model(3, causal=True, history_noise=True)
    fn = Autoregressive(history_noise=(1.0,)).noisy_log_probs(model)
    B, L = 2, 12
    rng = np.random.default_rng(2)
    # Away from integers, so that x ± h stays inside one linear piece of the embedding.
    values = jnp.asarray(rng.integers(0, MODEL_VOCAB - 1, (B, L)) + rng.uniform(0.3, 0.7, (B, L)),
                         jnp.float32)
    sigma = jnp.asarray([0.7, 1.3], jnp.float32)
    h = 5e-3
    dirs = jnp.asarray(np.stack([rng.uniform(-1, 1, (B, L)), np.eye(L)[0][None].repeat(B, 0)]),
                       jnp.float32)                                           # (2, B, L)

    @jax.jit
    def grad_and_fd(values):
        _, grad = langevin.smoothed_score(fn, values, sigma)
        f = jax.vmap(lambda v: langevin.smoothed_log_likelihood(fn, v, sigma))
        fd = (f(values + h * dirs) - f(values - h * dirs)) / (2 * h)          # (2, B)
        return grad, (grad * dirs).sum(-1), fd
    grad, directional, fd = grad_and_fd(values)
    np.testing.assert_allclose(np.asarray(directional), np.asarray(fd), rtol=2e-3, atol=2e-3)
    # Position 0's gradient: its own (uniform-prior) mixture plus every later conditional.
    own = jax.grad(lambda v: langevin.mixture_log_density(
        jnp.zeros((B, L, MODEL_VOCAB)), v, sigma)[:, 0].sum())(values)
    assert np.abs(np.asarray(grad - own)[:, 0]).min() > 1e-2


# ---------------------------------------------------------------------------------------------
# Langevin on a known target
# ---------------------------------------------------------------------------------------------

P_FIXED = np.array([0.05, 0.1, 0.4, 0.05, 0.3, 0.1])


def _fixed(values, sigma):
    """A model whose next token ignores the history: p = P_FIXED at every position."""
    return jnp.broadcast_to(jnp.log(jnp.asarray(P_FIXED, jnp.float32)),
                            values.shape + (len(P_FIXED),))


@functools.lru_cache(maxsize=None)
def _fixed_run(sigmas, steps, step_size, batch=512, length=32):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(batch))
    run = jax.jit(lambda k: langevin.langevin_sample(_fixed, k, length=length, sigmas=sigmas,
                                                     steps=steps, step_size=step_size))
    return jax.device_get(run(keys))


def test_langevin_reaches_the_moments_of_a_gaussian_mixture():
    """Annealed (3 → 1): at σ = 1 every position i ≥ 1 is Σ_k p_k N(k, 1), mean Σ p_k k and
    variance Var_p(k) + 1; position 0 is the smoothed uniform prior. 512 × 31 independent draws
    (chains and positions): the standard error of the mean is 0.014 (measured over 10 seeds at
    256 × 23: 0.027, as predicted), the tolerance 0.06; of the variance 1.2% relative, plus the
    step's bias 1/(1 − η/2s²) − 1 ≤ 2.6%, the tolerance 6%. Run the levels the other way (final
    σ = 3) and the variance is 4× too large."""
    out = _fixed_run((1.0, 3.0), 400, 0.05)
    k = np.arange(len(P_FIXED))
    mean, var = (P_FIXED * k).sum(), (P_FIXED * k * k).sum() - (P_FIXED * k).sum() ** 2 + 1.0
    x = out["values"][:, 1:].ravel()
    assert x.mean() == pytest.approx(mean, abs=0.06)
    assert x.var() == pytest.approx(var, rel=0.06)
    x0 = out["values"][:, 0]
    V = len(P_FIXED)
    assert x0.mean() == pytest.approx((V - 1) / 2, abs=0.25)          # 512 draws: s.e. 0.08
    assert x0.var() == pytest.approx((V * V - 1) / 12 + 1.0, rel=0.2)
    assert int(out["nfe"]) == 2 * 400 + 1
    assert out["log_likelihood"].shape == (512, 2)


def test_langevin_tokens_follow_the_categorical():
    """Down to σ = 0.2 the components are 5σ apart: the posterior-mode tokens have the
    categorical's frequencies (TV < 0.04 over 512 × 31 draws, measured 0.017; the uniform is at
    TV 0.37). The annealing must be fine: once the modes separate the chain no longer moves mass
    between them, so the weights freeze where that happens (4 levels 2, 1, 0.5, 0.2 × 150 steps
    of 0.05σ² freeze them at σ ≈ 0.5, TV 0.064; here 8 geometric levels)."""
    out = _fixed_run(tuple(np.geomspace(2.0, 0.2, 8).tolist()), 100, 0.1)
    freq = np.bincount(out["tokens"][:, 1:].ravel(), minlength=len(P_FIXED)) / out["tokens"][
        :, 1:].size
    assert 0.5 * np.abs(freq - P_FIXED).sum() < 0.04
    assert out["tokens"].min() >= 0 and out["tokens"].max() < len(P_FIXED)


def test_posterior_tokens():
    """Eq. (3): a flat prior rounds (and clips); near a midpoint a strong prior decides."""
    V = 5
    values = jnp.asarray([[0.2, 1.45, 2.6, 4.9, -0.7, 7.0]])
    flat = jnp.zeros((1, 6, V))
    np.testing.assert_array_equal(langevin.posterior_tokens(flat, values, 0.5),
                                  [[0, 1, 3, 4, 0, 4]])
    prior = jnp.log(jnp.asarray([0.01, 0.01, 0.96, 0.01, 0.01]))
    strong = jnp.broadcast_to(prior, (1, 6, V))                       # row i predicts i + 1
    np.testing.assert_array_equal(langevin.posterior_tokens(strong, values, 0.5),
                                  [[0, 2, 2, 4, 0, 4]])


def test_rows_do_not_depend_on_the_batch_and_the_prompt_is_clamped():
    fn = closed_form(8)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(5))
    prompt = jnp.asarray([[1, 6, 2]] * 3, jnp.int32)
    run = jax.jit(lambda k, p: langevin.langevin_sample(fn, k, length=10, sigmas=(2.0, 0.5),
                                                        steps=20, step_size=0.1, prompt=p))
    three = run(keys[:3], prompt)
    other = run(keys[jnp.asarray([3, 1, 4])], prompt)    # row 1 in another batch, another place
    np.testing.assert_array_equal(np.asarray(three["tokens"][1]), np.asarray(other["tokens"][1]))
    np.testing.assert_allclose(np.asarray(three["values"][1]), np.asarray(other["values"][1]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(three["tokens"][:, :3]), np.asarray(prompt))
    np.testing.assert_array_equal(np.asarray(three["values"][:, :3]), np.asarray(prompt, float))
    assert not np.array_equal(np.asarray(three["tokens"][0]), np.asarray(three["tokens"][1]))
    with pytest.raises(ValueError, match="steps"):
        langevin.langevin_sample(fn, keys, length=10, sigmas=(1.0,), steps=0, step_size=0.1)
    with pytest.raises(ValueError, match="sigmas"):
        langevin.langevin_sample(fn, keys, length=10, sigmas=(), steps=3, step_size=0.1)


# ---------------------------------------------------------------------------------------------
# the model option and the objective
# ---------------------------------------------------------------------------------------------

def test_history_noise_model_option():
    from flax import nnx
    plain = random_model(4, causal=True)
    noisy = random_model(4, causal=True, history_noise=True)
    # The option adds one parameter (D,) and leaves every other name and shape as it was.
    shapes = [jax.tree.map(lambda x: x.shape, _abstract_params(h)) for h in (False, True)]
    assert set(shapes[1]) - set(shapes[0]) == {"noise_embed"} and "noise_embed" not in shapes[0]
    assert shapes[1]["noise_embed"] == (32,)
    assert shapes[0] == {k: v for k, v in shapes[1].items() if k != "noise_embed"}
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, MODEL_VOCAB)
    gd_plain, st_plain = nnx.split(plain)
    gd_noisy, st_noisy = nnx.split(noisy)

    @jax.jit
    def outputs(tokens):
        p, n = nnx.merge(gd_plain, st_plain), nnx.merge(gd_noisy, st_noisy)
        values = tokens.astype(jnp.float32)
        return (p(tokens, None), p(values, None), n(values, jnp.zeros(2)), n(tokens, None),
                n(tokens, jnp.ones(2)))
    ref, plain_values, noisy_zero, noisy_none, noisy_one = outputs(tokens)
    # Integer-valued floats are the lookup; σ = 0 (or None) is the plain model.
    np.testing.assert_allclose(plain_values, ref, atol=1e-5)
    np.testing.assert_allclose(noisy_zero, ref, atol=1e-5)
    np.testing.assert_allclose(noisy_none, ref, atol=1e-5)
    assert float(jnp.abs(noisy_one - ref).max()) > 1e-2
    # Between integers the embedding is the linear interpolation of the two rows.
    table = plain.embed.embedding[...]
    from dlm_jax.models.transformer import interpolated_embedding
    e = interpolated_embedding(table, jnp.asarray([[2.25, -3.0, MODEL_VOCAB + 1.0]]))
    np.testing.assert_allclose(e[0, 0], 0.75 * table[2] + 0.25 * table[3], rtol=1e-6)
    np.testing.assert_allclose(e[0, 1], table[0])
    np.testing.assert_allclose(e[0, 2], table[-1])
    with pytest.raises(ValueError, match="causal"):
        random_model(0, history_noise=True)


def _abstract_params(history_noise: bool):
    from flax import nnx
    from dlm_jax.models.transformer import DiT
    model = nnx.eval_shape(lambda: DiT(MODEL_VOCAB, 32, 2, 4, causal=True, dropout=0.0,
                                       history_noise=history_noise, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_noisy_history_loss_targets_the_clean_tokens():
    model = random_model(5, causal=True, history_noise=True)
    levels = (0.5, 2.0, 4.0)
    method = Autoregressive(history_noise=levels)
    tokens = jax.random.randint(jax.random.key(1), (64, 16), 0, MODEL_VOCAB)
    key = jax.random.key(2)
    from flax import nnx
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(tokens, key):
        model = nnx.merge(graphdef, state)
        loss, _ = method.loss(model, {"tokens": tokens}, key, train=False)
        x_t, sigma = noisy_history(jax.random.split(key)[1], tokens, levels)
        return loss, ar_nll(model(x_t, sigma), tokens)[1]["nll_mean"], x_t, sigma
    loss, ref, x_t, sigma = both(tokens, key)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    # σ per sequence from the levels; the noise has that scale.
    assert set(np.unique(np.asarray(sigma)).tolist()) <= set(levels)
    assert len(set(np.asarray(sigma).tolist())) == 3
    resid = np.asarray(x_t - tokens) / np.asarray(sigma)[:, None]
    assert resid.std() == pytest.approx(1.0, abs=0.05)
    assert not method.likelihood_bound and Autoregressive().likelihood_bound


# ---------------------------------------------------------------------------------------------
# the ordinal source
# ---------------------------------------------------------------------------------------------

def _mad(x):
    """Mean absolute first difference."""
    return float(np.abs(np.diff(np.asarray(x, np.float64), axis=1)).mean())


def _lag1(x):
    """Lag-1 autocorrelation around each row's mean, pooled."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(1, keepdims=True)
    return float((x[:, 1:] * x[:, :-1]).sum() / (x * x).sum())


def test_ordinal_source():
    a = ordinal_sequences(50, 40, levels=16, seed=3)
    assert a.shape == (50, 40) and a.dtype == np.int32 and a.min() >= 0 and a.max() <= 15
    np.testing.assert_array_equal(a, ordinal_sequences(50, 40, levels=16, seed=3))
    assert not np.array_equal(a, ordinal_sequences(50, 40, levels=16, seed=4))
    assert len(np.unique(a)) > 10                                       # uses the range
    assert _mad(a) < 1.5 and _lag1(a) > 0.8                              # smooth waveforms
    data = DataConfig(source="ordinal", seq_len=32, ordinal_levels=16, ordinal_num_tokens=32 * 40)
    train = next(iter(make_dataset(data, split="train", global_batch=8, shuffle=False)))
    val = next(iter(make_dataset(data, split="validation", global_batch=8, shuffle=False)))
    assert train["tokens"].shape == (8, 32) and train["tokens"].max() < 16
    assert not np.array_equal(train["tokens"], val["tokens"])
    again = next(iter(make_dataset(data, split="train", global_batch=8, shuffle=False)))
    np.testing.assert_array_equal(train["tokens"], again["tokens"])
    other = next(iter(make_dataset(dataclasses.replace(data, seed=1), split="train",
                                   global_batch=8, shuffle=False)))
    assert not np.array_equal(train["tokens"], other["tokens"])
    assert dataset_vocab_size("ordinal", ordinal_levels=16) == 16
    exp = registry.build(_cfg(seq_len=32, levels=16))
    assert exp.tokenizer is None and exp.token_vocab == 16


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

def _cfg(**opts):
    arg = ",".join(f"{k}={v}" for k, v in opts.items())
    cfg = ordinal.get_config(arg)
    cfg.mesh.shape = (1, 1, 1)
    cfg.train.final_samples = 0
    return cfg


@pytest.fixture(scope="module")
def ordinal_run(tmp_path_factory):
    from dlm_jax.trainer import Trainer
    cfg = _cfg(steps=300, seq_len=32)
    cfg.train.eval_every = cfg.train.ckpt_every = 300
    cfg.train.eval_batches = 1
    workdir = str(tmp_path_factory.mktemp("ordinal"))
    trainer = Trainer(cfg, workdir, measure_mfu=False)
    trainer.run()
    trainer.close()
    return workdir


def test_langevin_samples_move_from_noise_to_the_data(ordinal_run, tmp_path):
    """The mean absolute first difference (MAD) and lag-1 autocorrelation of 32 samples: the
    initial noise (U[0, 31] per position) has MAD ≈ 10.6 and autocorrelation ≈ 0, the data
    ≈ 1.4 and ≈ 0.9. After 5 levels × 20 updates the samples must have covered at least 75% of
    the way on both (measured: MAD 10.63 → 2.22 against the data's 1.44, 92% of the way;
    autocorrelation −0.04 → 0.79 against 0.88, 90%)."""
    from dlm_jax.generation import sample_keys, sample_run

    def edit(cfg):
        cfg.sampling = dataclasses.replace(cfg.sampling, sampler="langevin", num_samples=32,
                                           batch_size=32, steps=20, step_size=0.3)
    out = str(tmp_path / "samples.jsonl")
    summary = sample_run(ordinal_run, out=out, overrides=edit)
    samples = np.asarray([r["tokens"] for r in summary["samples"]])
    cfg = Config.from_dict(json.load(open(os.path.join(ordinal_run, "config.json"))))
    L, V = cfg.data.seq_len, cfg.data.ordinal_levels
    assert samples.shape == (32, L) and samples.min() >= 0 and samples.max() < V
    data = next(iter(make_dataset(cfg.data, split="validation", global_batch=64)))["tokens"]
    keys = sample_keys(0, 0, 32)
    init = np.rint(np.asarray(jax.vmap(lambda k: jax.random.uniform(
        jax.random.fold_in(k, 0), (L,), maxval=V - 1.0))(keys)))
    for stat in (_mad, _lag1):
        s0, s_data, s = stat(init), stat(data), stat(samples)
        print(f"{stat.__name__}: noise {s0:.3f} data {s_data:.3f} samples {s:.3f}")
        assert abs(s - s_data) < 0.25 * abs(s0 - s_data), stat.__name__
    assert summary["sampler"] == "langevin" and summary["steps"] == 20
    assert summary["nfe_per_batch"] == len(cfg.diffusion.history_noise) * 20 + 1
    rows = [json.loads(line) for line in open(out)]
    assert [r["sample"] for r in rows] == list(range(32)) and rows[0]["sampler"] == "langevin"
    assert rows[0]["settings"]["step_size"] == 0.3 and rows[0]["tokens"] == samples[0].tolist()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def _with(cfg, **fields):
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.mark.parametrize("fields,message", [
    (dict(data__source="markov"), r"diffusion.history_noise=.*needs an ordinal vocabulary"),
    (dict(diffusion__objective="nelbo"), r"diffusion.history_noise=.*AR objective"),
    (dict(diffusion__history_noise=(1.0, 0.0)), r"diffusion.history_noise=.*σ > 0"),
    (dict(diffusion__history_noise=(1.0, -2.0)), r"diffusion.history_noise=.*σ > 0"),
    (dict(model__arch="gpt2"), r"diffusion.history_noise=.*arch='gpt2'"),
    (dict(data__ordinal_levels=1), r"data.ordinal_levels=1"),
    (dict(data__ordinal_noise=-0.5), r"data.ordinal_noise=-0.5"),
    (dict(data__ordinal_components=0), r"data.ordinal_components=0"),
    (dict(sampling__step_size=0.0), r"sampling.step_size=0.0"),
])
def test_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate(_with(_cfg(), **fields))


def test_sampler_errors():
    from dlm_jax.generation import make_generator
    plain = tiny.get_config("ar")
    plain.mesh.shape = (1, 1, 1)
    exp = registry.build(plain)
    with pytest.raises(ConfigError, match="sampler='langevin' needs an AR run trained on noisy"):
        make_generator(exp, dataclasses.replace(plain.sampling, sampler="langevin"))
    mdlm = tiny.get_config("mdlm")
    mdlm.mesh.shape = (1, 1, 1)
    with pytest.raises(ConfigError, match="sampler='langevin' does not fit"):
        make_generator(registry.build(mdlm), dataclasses.replace(mdlm.sampling,
                                                                 sampler="langevin"))
    cfg = _cfg(seq_len=32)
    exp = registry.build(cfg)
    with pytest.raises(ConfigError, match="length=64 is longer"):
        make_generator(exp, dataclasses.replace(cfg.sampling, sampler="langevin", length=64))
    assert make_generator(exp, dataclasses.replace(cfg.sampling, sampler="auto")).sampler == \
        "langevin"
    with pytest.raises(ConfigError, match="unknown option 'level'"):
        ordinal.get_config("level=4")
    assert isinstance(ordinal.get_config(), Config)
