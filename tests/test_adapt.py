"""AR → diffusion adaptation and joint training: the shift, attention-mask annealing, the
weight mapping (`models.adapt`), `train.init_from` from an AR run, and the joint AR + NELBO loss.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm_jax import registry
from dlm_jax.config import ConfigError, validate
from dlm_jax.evals import initial_params, restore_run, validation_batches
from dlm_jax.masks import band_mask, bd3lm_two_pass_mask, causal_mask
from dlm_jax.methods.base import shift_rows
from dlm_jax.models.adapt import ar_to_diffusion
from dlm_jax.models.layers import attend_dense as attend, attend_two_pass
from dlm_jax.models.transformer import DiT
from dlm_jax.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

V, L = 11, 16


def _randomised(model, seed):
    """The model with every parameter drawn at random (a fresh DiT outputs exactly 0)."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), params


def _adapted(ar_params, *, time_conditioning, vocab=V + 1):
    model = DiT(vocab, 32, 2, 4, cond_dim=8, causal=False, time_conditioning=time_conditioning,
                rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, ar_to_diffusion(ar_params, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def ar_model():
    return _randomised(DiT(V, 32, 2, 4, cond_dim=8, causal=True, rngs=nnx.Rngs(0)), 1)


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 4, 16])
def test_shift_rows_against_a_loop(block):
    raw = jax.random.normal(jax.random.key(0), (2, L, 5))
    got = np.asarray(shift_rows(raw, block))
    want = np.empty_like(got)
    for i in range(L):
        want[:, i] = raw[:, i] if i % block == 0 else raw[:, i - 1]
    np.testing.assert_array_equal(got, want)


def test_band_mask_spans_causal_to_bidirectional():
    np.testing.assert_array_equal(band_mask(L, 0), causal_mask(L))
    assert bool(band_mask(L, L - 1).all())
    m = np.asarray(jax.jit(lambda b: band_mask(L, b))(jnp.int32(3)))  # traced band
    i, j = np.indices((L, L))
    np.testing.assert_array_equal(m, j <= i + 3)


@pytest.mark.parametrize("band", [0, 2, 3])
@pytest.mark.parametrize("q_rows", [2 * L, L])
def test_banded_two_pass_attention_equals_the_dense_mask(band, q_rows):
    lb = 4
    kq, kk, kv = jax.random.split(jax.random.key(band), 3)
    q = jax.random.normal(kq, (2, q_rows, 2, 8))
    k, v = (jax.random.normal(x, (2, 2 * L, 2, 8)) for x in (kk, kv))
    i, j = np.indices((2 * L, 2 * L))
    dense = np.asarray(bd3lm_two_pass_mask(L, lb)) & ((j % L) <= (i % L) + band)
    want = attend(q, k, v, jnp.asarray(dense[None, :q_rows]))
    got = attend_two_pass(q, k, v, lb, band=jnp.int32(band))
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_band_schedule():
    cfg = tiny.get_config("bd3lm,block=8")
    cfg.diffusion.mask_anneal_steps = 70
    method = registry.build(cfg).method
    bands = [int(method.band(jnp.int32(s))) for s in (0, 10, 35, 69, 70, 500)]
    assert bands == [0, 1, 3, 6, 7, 7]  # ⌊min(s / 70, 1) · 7⌋
    assert method.band(None) is None
    cfg.diffusion.mask_anneal_steps = 0
    assert registry.build(cfg).method.band(jnp.int32(5)) is None


# ---------------------------------------------------------------------------------------------
# The weight mapping computes the AR function
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("time_conditioning", [False, True])
def test_adapted_model_equals_the_ar_model_under_the_causal_mask(ar_model, time_conditioning):
    ar, ar_params = ar_model
    model = _adapted(ar_params, time_conditioning=time_conditioning)
    x = jax.random.randint(jax.random.key(2), (3, L), 0, V)
    sigma = jnp.array([0.0, 1.0, 3.0])  # the adaLN layers output identity at any σ
    logits = model(x, sigma, mask=causal_mask(L))
    chex.assert_trees_all_close(logits[..., :V], ar(x, None), atol=1e-5)
    np.testing.assert_array_equal(logits[..., V], 0.0)  # the mask's output column
    # Two-pass with band 0 on a clean x_t: the noisy rows see the clean prefix and the block up
    # to themselves, i.e. causal attention over x.
    two = model.two_pass(x, x, sigma, 4, band=jnp.int32(0))
    chex.assert_trees_all_close(two[..., :V], ar(x, None), atol=1e-5)


def test_mapping_keeps_the_sigma_embedder_and_fills_the_mask_row(ar_model):
    _, ar_params = ar_model
    init = nnx.to_pure_dict(nnx.state(DiT(V + 1, 32, 2, 4, cond_dim=8, rngs=nnx.Rngs(3))))
    out = ar_to_diffusion(ar_params, init)
    chex.assert_trees_all_equal(out["sigma_map"], jax.tree.map(np.asarray, init["sigma_map"]))
    np.testing.assert_array_equal(out["embed"]["embedding"][V], 0.0)
    np.testing.assert_array_equal(out["embed"]["embedding"][:V], ar_params["embed"]["embedding"])
    bias = out["blocks"][0]["adaln"]["bias"]
    np.testing.assert_array_equal(bias[[2, 5]], 1.0)
    np.testing.assert_array_equal(bias[[0, 1, 3, 4]], 0.0)


def test_mapping_names_what_does_not_fit(ar_model):
    _, ar_params = ar_model
    wide = nnx.to_pure_dict(nnx.state(DiT(V + 1, 64, 2, 4, cond_dim=8, rngs=nnx.Rngs(3))))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv"):
        ar_to_diffusion(ar_params, wide)
    diffusion = nnx.to_pure_dict(nnx.state(DiT(V + 1, 32, 2, 4, cond_dim=8, rngs=nnx.Rngs(3))))
    with pytest.raises(ValueError, match="not a causal"):
        ar_to_diffusion(diffusion, diffusion)


# ---------------------------------------------------------------------------------------------
# From a trained AR run
# ---------------------------------------------------------------------------------------------

def _train(cfg, workdir):
    cfg.mesh.shape = (1, 1, 1)
    trainer = Trainer(cfg, str(workdir), measure_mfu=False)
    trainer.run()
    trainer.close()
    return str(workdir)


def _tiny(family):
    """Tiny configs on bytes of the embedded corpus (text, whose long contexts an AR model
    uses, unlike the order-1 Markov source where a hidden predecessor leaves it blind)."""
    cfg = tiny.get_config(family + ",source=stdlib")
    cfg.data.max_bytes = 200_000
    return cfg


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    cfg = _tiny("ar")
    cfg.train.steps, cfg.train.eval_every, cfg.train.ckpt_every = 100, 100, 100
    return _train(cfg, tmp_path_factory.mktemp("ar"))


def _nelbo(exp, params, *, band, batches=4):
    """Mean validation NELBO of `params` with the attention band (None: the target mask)."""
    method, data = exp.method, validation_batches(exp)

    @jax.jit
    def one(params, x0, i):
        per_token, _ = method.per_token(exp.model(params), x0, jax.random.key(i), train=False,
                                        bounds=(method.sampling_eps, 1.0), resample=False,
                                        band=band)
        return per_token.mean()
    return float(np.mean([one(params, next(data)["tokens"], i) for i in range(batches)]))


@pytest.mark.parametrize("family", ["mdlm", "bd3lm,block=8"])
def test_adapted_initial_nelbo_is_far_below_a_random_initialisation(ar_run, family):
    cfg = _tiny(family)
    registry.apply_adaptation(cfg, ar_run, anneal_steps=50)
    cfg.mesh.shape = (1, 1, 1)
    exp = registry.build(cfg)
    adapted = initial_params(ar_run, exp)
    fresh = nnx.to_pure_dict(nnx.state(exp.new_model(0)))
    _, _, _, ar_state = restore_run(ar_run)
    ar_exp = restore_run(ar_run)[0]
    ar_nll = _nelbo_ar(ar_exp, ar_state.eval_params)
    at_start = _nelbo(exp, adapted, band=jnp.int32(0))   # the mask of training step 0
    random = _nelbo(exp, fresh, band=jnp.int32(0))
    # A fresh DiT outputs 0: uniform predictions, whose NELBO is log V in expectation.
    assert random == pytest.approx(np.log(exp.token_vocab), rel=0.1)
    assert at_start < random - 0.5, (at_start, random, ar_nll)


def _nelbo_ar(exp, params):
    data = validation_batches(exp)
    return float(np.mean([exp.method.loss(exp.model(params), next(data), jax.random.key(0),
                                          train=False)[0] for _ in range(2)]))


def test_adaptation_preset_trains_and_anneals(ar_run, tmp_path):
    cfg = _tiny("bd3lm,block=8")
    registry.apply_adaptation(cfg, ar_run, anneal_steps=10)
    cfg.train.steps = cfg.train.ckpt_every = cfg.train.eval_every = 20
    workdir = _train(cfg, tmp_path / "adapted")
    exp, _, step, state = restore_run(workdir)
    assert step == 20 and exp.method.shift and exp.method.anneal_steps == 10
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # The start really was the AR run: the adapted init differs from a fresh one, and training
    # moved it.
    init = initial_params(ar_run, exp)
    fresh = nnx.to_pure_dict(nnx.state(exp.new_model(cfg.train.seed)))
    emb = lambda p: np.asarray(p["embed"]["embedding"])  # noqa: E731
    assert not np.allclose(emb(init), emb(fresh))
    assert np.abs(emb(state.params) - emb(init)).max() > 0


def test_init_from_errors(ar_run, tmp_path):
    cfg = tiny.get_config("mdlm")  # the Markov source: another vocabulary
    registry.apply_adaptation(cfg, ar_run)
    with pytest.raises(ConfigError, match="same tokenizer"):
        initial_params(ar_run, registry.build(cfg))
    bad = tiny.get_config("d3pm")
    bad.diffusion.shift = True
    with pytest.raises(ConfigError, match="diffusion.shift"):
        validate(bad)
    bad = tiny.get_config("ar")
    bad.diffusion.ar_weight = 1.0
    with pytest.raises(ConfigError, match="diffusion.ar_weight"):
        validate(bad)


# ---------------------------------------------------------------------------------------------
# Joint training
# ---------------------------------------------------------------------------------------------

def test_joint_loss_adds_the_ar_nll_of_a_causal_pass(ar_run):
    cfg = _tiny("mdlm")
    registry.apply_adaptation(cfg, ar_weight=0.5)
    cfg.mesh.shape = (1, 1, 1)
    exp = registry.build(cfg)
    assert exp.method.shift and exp.method.ar_weight == 0.5
    ar_exp, _, _, ar_state = restore_run(ar_run)
    params = ar_to_diffusion(jax.device_get(ar_state.eval_params),
                             nnx.to_pure_dict(nnx.state(exp.new_model(0))))
    batch = next(validation_batches(exp))
    key = jax.random.key(4)
    total, m = exp.method.loss(exp.model(params), batch, key, train=True)
    # Independent: the AR run's own NLL (the adapted network computes the AR function causally).
    ar_loss = ar_exp.method.loss(ar_exp.model(ar_state.eval_params), batch, key, train=False)[0]
    chex.assert_trees_all_close(m["ar_nll"], ar_loss, atol=1e-5)
    chex.assert_trees_all_close(total, m["nelbo"] + 0.5 * m["ar_nll"], atol=1e-6)
    # The NELBO part is the plain method's loss with the split key.
    plain = dataclasses.replace(exp.method, ar_weight=0.0)
    k_nelbo, _ = jax.random.split(key)
    chex.assert_trees_all_close(m["nelbo"], plain.loss(exp.model(params), batch, k_nelbo,
                                                       train=True)[0], atol=1e-6)
    ev, em = exp.method.loss(exp.model(params), batch, key, train=False)
    assert float(ev) == float(em["nelbo"]) and "ar_nll" in em  # evaluation reports the bound


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    cfg = _tiny("bd3lm,block=8")
    registry.apply_adaptation(cfg, ar_weight=1.0)
    cfg.train.steps = cfg.train.ckpt_every = cfg.train.eval_every = 10
    return _train(cfg, tmp_path_factory.mktemp("joint"))


def test_joint_run_decodes_either_way(joint_run):
    from dlm_jax.generation import generate_samples
    from dlm_jax.objectives.ar import ar_nll
    exp, _, _, state = restore_run(joint_run)
    params = state.eval_params
    # The AR reading scores a batch exactly as the joint loss's AR term does.
    batch = next(validation_batches(exp))
    _, m = exp.method.loss(exp.model(params), batch, jax.random.key(0), train=False)
    from dlm_jax.methods.joint import CausalView
    view = CausalView(vocab=exp.token_vocab)
    log_p = view.denoiser(exp.model(params)).fn(batch["tokens"])
    assert log_p.shape[-1] == exp.token_vocab
    nll = ar_nll(log_p, batch["tokens"])[1]["nll_mean"]
    chex.assert_trees_all_close(nll, m["ar_nll"], atol=1e-5)
    # AR decoding through the KV cache equals its uncached twin token for token; the diffusion
    # sampler still runs on the same parameters.
    base = dataclasses.replace(exp.cfg.sampling, sampler="ar", num_samples=2, batch_size=2,
                               length=24)
    cached, summary = generate_samples(exp, params, base)
    uncached, _ = generate_samples(exp, params, dataclasses.replace(base, kv_cache=False))
    assert summary["sampler"] == "ar"
    assert [r["tokens"] for r in cached] == [r["tokens"] for r in uncached]
    diffusion, summary = generate_samples(exp, params, dataclasses.replace(
        base, sampler="auto", length=16))
    assert summary["sampler"] != "ar" and len(diffusion[0]["tokens"]) == 16


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------

def test_adapted_gpt2_equals_the_language_model_under_the_causal_mask():
    from dlm_jax.models.gpt2 import GPT2
    kw = dict(n_positions=L, rngs=nnx.Rngs(0))
    lm, params = _randomised(GPT2(V, 32, 2, 4, **kw), 5)
    bidir = GPT2(V + 1, 32, 2, 4, causal=False, **kw)
    graphdef, state = nnx.split(bidir)
    nnx.replace_by_pure_dict(state, ar_to_diffusion(params, nnx.to_pure_dict(state)))
    bidir = nnx.merge(graphdef, state)
    x = jax.random.randint(jax.random.key(2), (3, L), 0, V)
    want = lm(x)
    chex.assert_trees_all_close(bidir(x, None, mask=causal_mask(L))[..., :V], want, atol=1e-5)
    chex.assert_trees_all_close(bidir.two_pass(x, x, None, 4, band=jnp.int32(0))[..., :V], want,
                                atol=1e-5)
    full = bidir(x)  # no mask: bidirectional, so it differs
    assert not np.allclose(full[..., :V], want, atol=1e-3)
    # The cache decodes blocks bidirectionally inside, or causally when asked.
    cache = bidir.init_cache(3, L)
    logits, _ = bidir.decode_block(x[:, :4], None, cache, commit=False, causal=True)
    chex.assert_trees_all_close(logits[..., :V], want[:, :4], atol=1e-5)
    logits, _ = bidir.decode_block(x[:, :4], None, cache, commit=False)
    chex.assert_trees_all_close(logits, bidir(x[:, :4]), atol=1e-5)


def test_gpt2_run_adapts_to_bd3lm(tmp_path):
    ar = _tiny("ar")
    ar.model.arch, ar.model.width, ar.model.depth, ar.model.heads = "gpt2", 32, 2, 4
    ar.train.steps = ar.train.ckpt_every = ar.train.eval_every = 10
    ar_dir = _train(ar, tmp_path / "gpt2")
    cfg = _tiny("bd3lm,block=8")
    registry.apply_adaptation(cfg, ar_dir, anneal_steps=5)
    assert (cfg.model.arch, cfg.model.width, cfg.model.n_positions) == ("gpt2", 32, 32)
    cfg.train.steps = cfg.train.ckpt_every = cfg.train.eval_every = 6
    exp, _, step, state = restore_run(_train(cfg, tmp_path / "adapted"))
    assert step == 6 and exp.method.shift
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    emb = np.asarray(initial_params(ar_dir, exp)["wte"])
    assert emb.shape[0] == exp.token_vocab + 1 and not emb[-1].any()
