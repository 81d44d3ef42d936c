"""GPT-2 (`dlm_jax.models.gpt2`): parity with HF `GPT2LMHeadModel`, the state-dict mapping, the
KV cache, sharding, and its use as the AR family's model (trainer, cached sampler, config).

The parity fixture (shared/fixtures/gpt2.npz, float32 CPU output of transformers'
GPT2LMHeadModel with tiny random weights) is skipped when absent; everything else runs on tiny
random models built abstractly and filled with numpy values (no random-initialiser compiles).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dlm_jax import sharding
from dlm_jax.config import ConfigError, MeshConfig, validate
from dlm_jax.data.pipeline import markov_chain
from dlm_jax.models import GPT2, KVCache, gpt2_from_state_dict, gpt2_to_state_dict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
V, D, N, H, NPOS, B, L = 40, 32, 2, 4, 32, 2, 16


def _fixture():
    path = FIXTURES / "gpt2.npz"
    if not path.exists():
        pytest.skip(f"fixture {path} not found (the reference fixtures live in ../shared/fixtures)")
    z = np.load(path)
    meta = json.loads((FIXTURES / "gpt2.json").read_text())
    sd = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    return z, meta["model_config"], sd


def random_gpt2(seed: int = 0, **kwargs) -> GPT2:
    """A tiny GPT2 with O(1) random parameters (LN weights 1 ± 0.1, matrices std 1/√fan_in)."""
    cfg = dict(n_positions=NPOS)
    cfg.update(kwargs)
    model = nnx.eval_shape(lambda: GPT2(V, D, N, H, rngs=nnx.Rngs(0), **cfg))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def fill(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "ln_" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif name.endswith("bias"):
            value = 0.05 * rng.standard_normal(x.shape)
        elif name in ("wte", "wpe"):
            value = 0.5 * rng.standard_normal(x.shape)
        else:
            fan_in = math.prod(x.shape[:2]) if name.endswith("attn/out") else x.shape[0]
            value = rng.standard_normal(x.shape) / math.sqrt(fan_in)
        return jnp.asarray(value, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def gpt2() -> GPT2:
    return random_gpt2(0)


def _tokens(seed, shape=(B, L)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


@nnx.jit
def _forward(model, tokens):
    return model(tokens, None)


@functools.partial(nnx.jit, static_argnames=("block_size", "window"))
def _decode(model, tokens, block_size, window):
    """Logits (B, L, V) of tokens fed to decode_block in blocks of `block_size`, committing each."""
    K = tokens.shape[1] // block_size
    blocks = tokens.reshape(tokens.shape[0], K, block_size).transpose(1, 0, 2)

    def step(cache, blk):
        logits, cache = model.decode_block(blk, None, cache, commit=True)
        return cache, logits

    _, logits = jax.lax.scan(step, model.init_cache(tokens.shape[0], window), blocks)
    return logits.transpose(1, 0, 2, 3).reshape(tokens.shape[0], -1, logits.shape[-1])


# ---------------------------------------------------------------------------------------------
# parity with transformers' GPT2LMHeadModel
# ---------------------------------------------------------------------------------------------

def test_logits_match_the_reference():
    z, cfg, sd = _fixture()
    settings, _ = gpt2_from_state_dict(sd, heads=cfg["n_head"])
    assert settings == dict(vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"],
                            width=cfg["n_embd"], depth=cfg["n_layer"], heads=cfg["n_head"],
                            mlp_hidden=cfg["n_inner_effective"], layer_norm_eps=1e-5)
    model = GPT2.from_state_dict(sd, heads=cfg["n_head"], layer_norm_eps=cfg["layer_norm_epsilon"])
    tokens = jnp.asarray(z["input/tokens"])
    logits, hidden = nnx.jit(lambda m, t: (m(t), m.features(t)))(model, tokens)
    err = float(np.abs(np.asarray(logits) - z["output/logits"]).max())
    assert logits.dtype == jnp.float32 and logits.shape == z["output/logits"].shape
    assert err < 1e-4, err                                     # observed ≈ 3e-6
    np.testing.assert_allclose(hidden, z["output/last_hidden_state"], atol=1e-4, rtol=0)


def test_hub_layout_imports_the_same_params():
    """No `transformer.` prefix, no lm_head, and the causal-mask buffers of older checkpoints."""
    _, cfg, sd = _fixture()
    hub = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(cfg["n_layer"]):
        hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), bool))
        hub[f"h.{i}.attn.masked_bias"] = np.float32(-1e4)
    _, want = gpt2_from_state_dict(sd, heads=cfg["n_head"])
    _, got = gpt2_from_state_dict(hub, heads=cfg["n_head"])
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ---------------------------------------------------------------------------------------------
# the state-dict mapping
# ---------------------------------------------------------------------------------------------

def test_round_trip_is_lossless(gpt2):
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(gpt2)[1]))
    sd = gpt2_to_state_dict(params)
    settings, back = gpt2_from_state_dict(sd, heads=H)
    assert settings["depth"] == N and settings["mlp_hidden"] == 4 * D
    jax.tree.map(np.testing.assert_array_equal, back, params)
    again = gpt2_to_state_dict(back)
    assert again.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k])


def test_export_equals_the_fixture_state_dict():
    _, cfg, sd = _fixture()
    _, params = gpt2_from_state_dict(sd, heads=cfg["n_head"])
    out = gpt2_to_state_dict(params)
    assert sorted(out) == sorted(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)
    _, again = gpt2_from_state_dict(out, heads=cfg["n_head"])
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"),
     r"missing keys \['h.1.mlp.c_fc.bias'\]"),
    (lambda sd: sd.update({"transformer.h.0.attn.c_attn.scale": np.ones(1),
                           "transformer.extra": np.ones(1)}),
     r"unknown keys \['extra', 'h.0.attn.c_attn.scale'\]"),
    (lambda sd: sd.update({"transformer.h.0.attn.c_proj.bias": np.ones(D + 1, np.float32)}),
     re.escape(f"h.0.attn.c_proj.bias: expected ({D},), got ({D + 1},)")),
    (lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"] + 1e-3}),
     "lm_head.weight is not tied to transformer.wte.weight"),
])
def test_bad_state_dicts_raise_one_clear_error(gpt2, edit, match):
    sd = gpt2_to_state_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(gpt2)[1])))
    edit(sd)
    with pytest.raises(ValueError, match=match):
        gpt2_from_state_dict(sd, heads=H)


# ---------------------------------------------------------------------------------------------
# forward, KV cache
# ---------------------------------------------------------------------------------------------

def test_causal_and_positions_are_checked(gpt2):
    x = _tokens(1, (1, L))
    base = np.asarray(_forward(gpt2, x))[0]
    out = np.asarray(_forward(gpt2, x.at[0, 5].set((x[0, 5] + 1) % V)))[0]
    np.testing.assert_allclose(out[:5], base[:5], atol=1e-6)
    assert np.abs(out[5:] - base[5:]).max() > 1e-3
    # σ is ignored, like the causal DiT's
    np.testing.assert_array_equal(gpt2(x, jnp.ones((1,))), gpt2(x, None))
    with pytest.raises(ValueError, match="n_positions=32 learned positions"):
        gpt2(_tokens(2, (1, NPOS + 1)))
    with pytest.raises(ValueError, match=r"positions must be in \[0, n_positions=32\)"):
        gpt2(x, positions=jnp.arange(L) + NPOS - 4)
    # traced positions index wpe as given; one past the table makes the sequence NaN (no clamp)
    shifted = nnx.jit(lambda m, t, p: m(t, positions=p))
    np.testing.assert_allclose(shifted(gpt2, x, jnp.arange(L))[0], base, atol=1e-6)
    assert np.isnan(np.asarray(shifted(gpt2, x, jnp.arange(L) + NPOS - 4))).all()


@pytest.mark.parametrize("block_size", [1, 4])
def test_kv_cache_equals_causal_forward(gpt2, block_size):
    x = _tokens(3)
    np.testing.assert_allclose(_decode(gpt2, x, block_size, L), _forward(gpt2, x), atol=1e-5,
                               rtol=0)


def test_cache_cannot_outgrow_the_position_table(gpt2):
    with pytest.raises(ValueError, match="exceeds n_positions=32"):
        gpt2.init_cache(B, NPOS + 1)
    big = KVCache.zeros(N, B, NPOS + 1, H, D // H)
    with pytest.raises(ValueError, match="exceeds n_positions=32"):
        gpt2.decode_block(_tokens(4, (B, 1)), None, big, commit=True)
    # A window within the table slides, but a traced position past it reads NaN, never a clamp.
    logits = np.asarray(_decode(gpt2, _tokens(5, (B, 48)), 8, 16))
    assert np.isfinite(logits[:, :NPOS]).all() and np.isnan(logits[:, NPOS:]).all()


def test_dropout_and_remat(gpt2):
    model = random_gpt2(0, dropout=0.3, remat="block")
    x = _tokens(6)

    @nnx.jit
    def fwd(model, key):  # a typed key, an nnx.Rngs with a `dropout` stream, and eval mode
        return (model(x, deterministic=False, rngs=key),
                model(x, deterministic=False, rngs=nnx.Rngs(dropout=key)), model(x))

    (a, a_rngs, det), (a2, _, _), (b, _, _) = (fwd(model, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_allclose(det, _forward(gpt2, x), atol=1e-5)  # remat and eval: unchanged
    np.testing.assert_array_equal(a, a2)                            # same key, same masks
    for other in (b, det, a_rngs):
        assert np.abs(np.asarray(a - other)).max() > 1e-3
    with pytest.raises(ValueError, match="needs rngs"):
        model(x, deterministic=False)


# ---------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_two_pass_last_layer_computes_the_noisy_queries_only(scan):
    """BD3-LM's two-pass forward of the bidirectional GPT-2 runs its last layer on the noisy
    half's rows only: the same logits as the full pass over [x_t ⊕ x_0] read at those rows."""
    from dlm_jax.models.attention import MaskPattern
    from dlm_jax.models.layout import stack_layers
    model = random_gpt2(3, causal=False)
    if scan:
        graphdef, state = nnx.split(random_gpt2(3, causal=False, scan_layers=True))
        nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.split(model)[1])))
        model = nnx.merge(graphdef, state)
    half = L // 2
    xt, x0 = _tokens(5, (B, half)), _tokens(6, (B, half))
    positions = jnp.concatenate([jnp.arange(half), jnp.arange(half)])[None]
    full = model.features(jnp.concatenate([xt, x0], axis=1), mask=MaskPattern("two_pass", 4),
                          positions=positions)
    np.testing.assert_allclose(model.two_pass(xt, x0, None, 4),
                               model.logits(full[:, :half]), rtol=1e-5, atol=1e-5)


def test_sharded_forward_equals_unsharded(gpt2):
    mc = MeshConfig(shape=(2, 2, 2))
    mesh = sharding.make_mesh(mc, jax.devices()[:8])
    graphdef, state = nnx.split(gpt2)
    shardings = sharding.param_shardings(nnx.eval_shape(lambda: state), mesh, mc.rules)
    specs = jax.tree.map(lambda s: s.spec, shardings)
    assert specs["wte"] == P("tensor", "fsdp") and specs["wpe"] == P(None, "fsdp")
    assert specs["blocks"][0]["attn"]["qkv"] == P("fsdp", None, "tensor", None)
    assert specs["blocks"][0]["attn"]["out"] == P("tensor", None, "fsdp")
    assert specs["blocks"][0]["mlp"]["fc"]["kernel"] == P("fsdp", "tensor")
    assert specs["ln_f"]["bias"] == P("fsdp")
    params = jax.device_put(nnx.to_pure_dict(state), shardings)
    x = _tokens(7, (8, L))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, sharding.batch_sharding(mesh, mc.rules))
        out = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, xs)
    np.testing.assert_allclose(out, _forward(gpt2, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the AR family: config, trainer, sampler
# ---------------------------------------------------------------------------------------------

def _cfg(**model):
    cfg = tiny.get_config("ar")
    cfg.mesh.shape = (1, 1, 1)
    cfg.model.arch = "gpt2"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.mark.parametrize("arg, field, value, match", [
    ("sedd", "model.arch", "gpt2", r"config.model.arch='gpt2': GPT-2 is the AR model, or"),
    ("mdlm", "model.time_conditioning", True, r"config.model.time_conditioning=True: GPT-2"),
    ("ar", "model.arch", "gpt3", r"config.model.arch='gpt3' is not allowed"),
    ("ar", "model.n_positions", 16, r"config.model.n_positions=16: .* data.seq_len=32"),
    ("ar", "sampling.length", 64, r"config.sampling.length=64: GPT-2 cannot generate past"),
    ("ar", "model.layer_norm_eps", 0.0, r"config.model.layer_norm_eps=0.0"),
])
def test_config_checks(arg, field, value, match):
    cfg = tiny.get_config(arg)
    cfg.model.arch = "gpt2"
    section, key = field.split(".")
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_trainer_learns_a_fixed_batch(tmp_path):
    from dlm_jax.trainer import Trainer
    cfg = _cfg()
    cfg.optim.warmup_steps = 1
    trainer = Trainer(cfg, str(tmp_path), devices=jax.devices()[:1], measure_mfu=False)
    assert cfg.model.n_positions == cfg.data.seq_len          # 0 resolved by validate
    state = trainer.init_state()
    model = trainer.exp.model(state.params)
    assert isinstance(model, GPT2) and model.wpe.shape == (cfg.data.seq_len, 64)
    assert trainer.exp.flops_per_token() > 6 * trainer.exp.num_params
    chain = markov_chain(cfg.data.markov_vocab, cfg.data.markov_order, cfg.data.markov_seed)
    batch = {"tokens": chain.sample(cfg.train.batch_size, cfg.data.seq_len, 0).astype(np.int32)}

    def fixed_loss(params):
        with jax.set_mesh(trainer.exp.mesh):
            b = {k: jax.device_put(v, trainer.exp.batch_sharding) for k, v in batch.items()}
            return float(trainer.program.eval_step(params, b, 0)["loss"])

    before = fixed_loss(state.params)
    for _ in range(10):
        state, _ = trainer.train_step(state, batch)
    after = fixed_loss(state.params)
    assert math.isfinite(after) and after < 0.9 * before, (before, after)
    trainer.close()


def test_ar_cached_sampler_equals_uncached():
    from test_samplers import check_ar_cached_equals_uncached
    check_ar_cached_equals_uncached(random_gpt2(4), L)
