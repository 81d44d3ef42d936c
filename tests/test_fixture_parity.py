"""Logit parity with the reference PyTorch implementations (shared/fixtures, tiny random weights).

Every fixture is float32 CPU output of bd3lms `DIT` or SEDD `SEDD`. Each test converts the
fixture's state dict the way `python -m dlm_jax.convert` does (written as a .safetensors file
with the released checkpoints' `backbone.` prefix, imported into a workdir, restored with
`evals.restore_run`) and reproduces the outputs to 1e-4 (observed error is ~2e-6).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm_jax.masks import bd3lm_two_pass_mask, block_causal_mask
from dlm_jax.methods.sedd import sedd_log_score
from dlm_jax.models import DiT
from dlm_jax.models.layers import apply_rotary, rotary_cos_sin
from dlm_jax.models.convert import (dit_settings, dit_from_state_dict,
                                    load_dit_state_dict, state_dict_from_npz, strip_prefixes)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
ATOL = 1e-4


def _load(name: str):
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"fixture {path} not found (the reference fixtures live in ../shared/fixtures)")
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return np.load(path), meta


def _close(got, want, atol=ATOL):
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def _model(z, meta, family: str, tmp_path, *, sets=()):
    """(model, experiment) of the fixture, converted through `dlm_jax.convert.import_checkpoint` from a
    .safetensors file, restored from the workdir it wrote."""
    from safetensors.numpy import save_file

    from dlm_jax.interop import import_checkpoint
    from dlm_jax.evals import restore_run
    cfg = meta["model_config"]
    path = tmp_path / f"{family}.safetensors"
    prefix = "" if family == "sedd" else "backbone."   # as released (SEDD: none)
    save_file({prefix + k: v for k, v in state_dict_from_npz(z).items()}, str(path))
    absorbing_vocab = cfg["vocab_size"] - 1
    out = tmp_path / f"run-{family}-{len(sets)}"
    import_checkpoint(family, str(path), str(out), seq_len=16,
                      block_size=cfg["block_size"] if family == "bd3lm" else None,
                      sets=("data.source=markov", f"data.markov_vocab={absorbing_vocab}",
                            *sets))
    exp, _, step, state = restore_run(str(out))
    model = exp.model(state.eval_params)
    assert step == 0 and model.vocab_size == cfg["vocab_size"]
    assert (model.width, model.heads, model.depth) == (
        cfg["hidden_size"], cfg["n_heads"], cfg["n_blocks"])
    assert model.cond_dim == cfg["cond_dim"]
    return model, exp


# Jitted entry points (compiling once is much faster than eager op-by-op dispatch on CPU).
@nnx.jit
def _forward(model, tokens, sigma, mask=None):
    return model(tokens, sigma, mask=mask)


@functools.partial(nnx.jit, static_argnames=("block_size",))
def _two_pass(model, xt, x0, sigma, block_size):
    return model.two_pass(xt, x0, sigma, block_size)


@functools.partial(nnx.jit, static_argnames=("commit",))
def _decode(model, tokens, sigma, cache, commit):
    return model.decode_block(tokens, sigma, cache, commit=commit)


def test_bd3lm_dit_mdlm(tmp_path):
    z, meta = _load("bd3lm_dit_mdlm")
    tokens, sigma = jnp.asarray(z["input/tokens"]), jnp.asarray(z["input/sigma"])
    assert meta["model_config"]["time_conditioning"] is False
    model, _ = _model(z, meta, "mdlm", tmp_path)            # as released: σ → 0
    _close(_forward(model, tokens, sigma), z["output/logits_sigma0"])
    _close(model.cond_embedding(jnp.zeros_like(sigma)), z["output/t_cond_sigma0"])
    _close(model.cond_embedding(sigma), z["output/t_cond"])
    timed, _ = _model(z, meta, "mdlm", tmp_path,            # the σ run
                      sets=("model.time_conditioning=true",))
    _close(_forward(timed, tokens, sigma), z["output/logits"])


def test_bd3lm_dit_twopass(tmp_path):
    z, meta = _load("bd3lm_dit_twopass")
    xt, x0 = jnp.asarray(z["input/xt"]), jnp.asarray(z["input/x0"])
    sigma, bs = jnp.asarray(z["input/sigma"]), meta["model_config"]["block_size"]
    model, _ = _model(z, meta, "bd3lm", tmp_path)
    _close(_two_pass(model, xt, x0, sigma, bs), z["output/logits_sigma0"])
    timed, _ = _model(z, meta, "bd3lm", tmp_path, sets=("model.time_conditioning=true",))
    _close(_two_pass(timed, xt, x0, sigma, bs), z["output/logits"])
    # The two-pass mask the model uses is theirs.
    np.testing.assert_array_equal(bd3lm_two_pass_mask(xt.shape[1], bs),
                                  z["input/attn_mask"].astype(bool))


def test_bd3lm_dit_kvcache(tmp_path):
    z, meta = _load("bd3lm_dit_kvcache")
    model, _ = _model(z, meta, "bd3lm", tmp_path)
    bs = meta["model_config"]["block_size"]
    sigma, x_clean = jnp.asarray(z["input/sigma"]), jnp.asarray(z["input/x_clean"])
    noisy = z["input/kv/noisy_blocks"]                      # (K, steps, B, bs)
    n_blocks, n_steps, B, _ = noisy.shape
    L = x_clean.shape[1]

    # Uncached block-causal passes.
    for b in range(n_blocks):
        for s in range(n_steps):
            prefix = jnp.asarray(z[f"input/full/prefix_b{b}_s{s}"])
            n = prefix.shape[1]
            _close(_forward(model, prefix, sigma, block_causal_mask(n, bs)),
                   z[f"output/full/prefix_b{b}_s{s}"])
    _close(_forward(model, x_clean, sigma, block_causal_mask(L, bs)), z["output/full/clean_logits"])

    # Cached: noisy calls leave the cache alone, store calls commit the clean block.
    cache = model.init_cache(B, 32)
    for b in range(n_blocks):
        for s in range(n_steps):
            logits, same = _decode(model, jnp.asarray(noisy[b, s]), sigma, cache, False)
            _close(logits, z["output/kv/logits"][b, s])
            assert int(same.length) == b * bs
        logits, cache = _decode(model, x_clean[:, b * bs:(b + 1) * bs], sigma, cache, True)
        _close(logits, z["output/kv/store_logits"][b])
        assert int(cache.length) == (b + 1) * bs
    # Our cache holds their k (rotated once at its position, where they rotate at every read)
    # and v (their packed pre-rotary qkv, columns [q | k | v]).
    D, H = model.width, model.heads
    cos, sin = rotary_cos_sin(jnp.arange(L)[None], model.head_dim)
    for layer in range(model.depth):
        packed = jnp.asarray(z[f"output/debug/kv_cache_layer{layer}"])
        their_k = apply_rotary(packed[:, :L, D:2 * D].reshape(B, L, H, D // H), cos, sin)
        _close(jnp.swapaxes(cache.k[layer][:, :, :L], 1, 2), np.asarray(their_k))
        _close(jnp.swapaxes(cache.v[layer][:, :, :L], 1, 2).reshape(B, L, D),
               np.asarray(packed[:, :L, 2 * D:]))


def test_sedd_ddit(tmp_path):
    z, meta = _load("sedd_ddit")
    tokens, sigma = jnp.asarray(z["input/tokens"]), jnp.asarray(z["input/sigma"])
    model, exp = _model(z, meta, "sedd", tmp_path)          # --from sedd: time-conditioned
    assert model.time_conditioning and exp.method.scale_by_sigma
    raw = _forward(model, tokens, sigma)
    # The converted run's own head (what its samplers and evaluation use).
    _close(exp.method.block_output(raw, tokens, sigma), z["output/log_score"])
    _close(raw, z["output/raw"])
    _close(model.cond_embedding(sigma), z["output/t_cond"])
    _close(sedd_log_score(raw, tokens, sigma, scale_by_sigma=True), z["output/log_score"])
    _close(sedd_log_score(raw, tokens, sigma, scale_by_sigma=False),
           z["output/log_score_no_scale"])
    # The head alone, fed the reference raw output, is exact up to float32 rounding.
    _close(sedd_log_score(jnp.asarray(z["output/raw"]), tokens, sigma, scale_by_sigma=True),
           z["output/log_score"], atol=1e-5)


def test_convert_prefixes_and_errors():
    z, meta = _load("bd3lm_dit_mdlm")
    sd = state_dict_from_npz(z)
    prefixed = {f"backbone._orig_mod.{k}": v for k, v in sd.items()}
    prefixed["sampling_eps_min"] = np.float32(0.3)      # HF BD3LM extras are ignored by default
    prefixed["sampling_eps_max"] = np.float32(0.8)
    assert set(strip_prefixes(prefixed)) == set(sd) | {"sampling_eps_min", "sampling_eps_max"}
    cfg = dit_settings(prefixed)
    assert cfg == dict(vocab_size=48, width=64, depth=2, heads=4, mlp_ratio=4, causal=False,
                       cond_dim=32, sigma_features=256)
    model = dit_from_state_dict(prefixed)
    tokens, sigma = jnp.asarray(z["input/tokens"]), jnp.asarray(z["input/sigma"])
    _close(_forward(model, tokens, sigma), z["output/logits_sigma0"])

    extra = dict(sd, **{"blocks.0.attn_qkv.bias": np.zeros(192, np.float32)})
    with pytest.raises(ValueError, match=r"unmapped keys.*blocks\.0\.attn_qkv\.bias"):
        load_dit_state_dict(model, extra)
    missing = {k: v for k, v in sd.items() if k != "output_layer.linear.bias"}
    with pytest.raises(ValueError, match=r"missing.*output_layer\.linear\.bias"):
        load_dit_state_dict(model, missing)
    wrong_heads = nnx.eval_shape(lambda: DiT(48, 64, 2, 2, cond_dim=32, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="inv_freq"):
        load_dit_state_dict(wrong_heads, sd)
