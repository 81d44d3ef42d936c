"""`python -m dlm_jax.convert`: import a reference checkpoint into a workdir that evaluates,
samples and fine-tunes like a trained run; export it back; every bad input is one clear error.

Checkpoints are the reference fixtures' state dicts (../shared/fixtures, skipped when absent)
written by the tests as .safetensors files (or directories, or hand-made bf16 files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dlm_jax.config import ConfigError
from dlm_jax.interop import export_run, import_checkpoint
from dlm_jax.evals import restore_run
from dlm_jax.models.convert import open_checkpoint, state_dict_from_npz

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
MARKOV_47 = ("data.source=markov", "data.markov_vocab=47")   # the fixtures' 47 tokens + mask


def _state_dict(name: str) -> dict[str, np.ndarray]:
    path = FIXTURES / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"fixture {path} not found (the reference fixtures live in ../shared/fixtures)")
    return state_dict_from_npz(np.load(path))


def _write(tmp_path, sd, name="ckpt.safetensors", prefix="backbone.") -> str:
    path = str(tmp_path / name)
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return path


def _import(tmp_path, path, family="mdlm", out="run", **kw):
    kw.setdefault("sets", MARKOV_47)
    kw.setdefault("seq_len", 16)
    return import_checkpoint(family, path, str(tmp_path / out), **kw)


def test_cli_imports_and_the_workdir_evaluates_and_samples(tmp_path):
    """The CLI writes config.json + checkpoints/0; evaluate and sample use it as a trained run."""
    sd = _state_dict("bd3lm_dit_mdlm")
    path = _write(tmp_path, sd)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_jax.convert", "--from", "mdlm", "--checkpoint", path,
         "--out", str(out), "--seq_len", "16", *[f"--set={s}" for s in MARKOV_47]],
        capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["params"] == sum(v.size for k, v in sd.items() if k != "rotary_emb.inv_freq")
    assert (out / "config.json").exists() and (out / "checkpoints" / "0").is_dir()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"]["width"], cfg["model"]["depth"], cfg["model"]["heads"]) == (64, 2, 4)
    assert cfg["diffusion"]["objective"] == "nelbo" and not cfg["model"]["time_conditioning"]

    from dlm_jax.evaluate import evaluate_run
    from dlm_jax.generation import generate_samples
    metrics = evaluate_run(str(out), batches=1)
    assert metrics["step"] == 0 and np.isfinite(metrics["val/loss"])
    exp, _, _, state = restore_run(str(out))
    rows, summary = generate_samples(exp, state.eval_params, dataclasses.replace(
        exp.cfg.sampling, num_samples=2, batch_size=2, length=16, steps=4))
    tokens = np.asarray([r["tokens"] for r in rows])
    assert tokens.shape == (2, 16) and tokens.min() >= 0 and tokens.max() < 47


def test_round_trip_is_lossless_and_exports_the_reference_names(tmp_path):
    for name, family, extra in (("bd3lm_dit_twopass", "bd3lm", {"block_size": 4}),
                                ("sedd_ddit", "sedd", {"sets": ("data.source=markov",
                                                                "data.markov_vocab=50")})):
        sd = _state_dict(name)
        first = tmp_path / f"{family}-1"
        import_checkpoint(family, _write(tmp_path, sd, f"{family}.safetensors"), str(first),
                          seq_len=16, **{"sets": MARKOV_47, **extra})
        exported = str(tmp_path / f"{family}-export.safetensors")
        export_run(str(first), exported)
        back = load_file(exported)
        assert set(back) == set(sd)                 # the reference's keys, every one
        for k, v in sd.items():
            if k == "rotary_emb.inv_freq":          # recomputed: equal to float32 rounding
                np.testing.assert_allclose(back[k], v, rtol=1e-6)
            else:
                np.testing.assert_array_equal(back[k], v, err_msg=k)
        second = tmp_path / f"{family}-2"
        import_checkpoint(family, exported, str(second), seq_len=16,
                          **{"sets": MARKOV_47, **extra})
        p1, p2 = (jax.device_get(restore_run(str(d))[3].eval_params) for d in (first, second))
        jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_directory_and_bf16_checkpoints(tmp_path):
    """A Hugging Face-style directory (config.json + model.safetensors) whose config gives the
    block size and heads, with HF BD3LM's learned clip range (the run's clipped schedule);
    bfloat16 tensors are widened exactly."""
    sd = dict(_state_dict("bd3lm_dit_kvcache"))
    sd.pop("rotary_emb.inv_freq")                   # heads then come from the config
    sd["sampling_eps_min"], sd["sampling_eps_max"] = (np.array(v, np.float32) for v in (.3, .8))
    hf = tmp_path / "hf"
    hf.mkdir()
    _write(hf, sd, "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "bd3lm", "block_size": 4,
                                                "n_heads": 4, "model_length": 16}))
    summary = _import(tmp_path, str(hf), "bd3lm", seq_len=None)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["diffusion"]["block_size"] == 4 and cfg["data"]["seq_len"] == 16
    np.testing.assert_allclose(cfg["diffusion"]["clip"], [0.3, 0.8], rtol=1e-6)
    assert summary["settings"]["heads"] == 4
    np.testing.assert_allclose(np.asarray(restore_run(str(tmp_path / "run"))[3].clip),
                               [0.3, 0.8], rtol=1e-6)
    assert summary["settings"]["sigma_features"] == 256

    # A hand-written BF16 file: the top 16 bits of float32 values, read back as float32.
    values = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    src, _ = open_checkpoint(str(path))
    np.testing.assert_array_equal(src["w"], (bf16.astype(np.uint32) << 16).view(np.float32))
    assert src["w"].dtype == np.float32


def test_fine_tuning_starts_from_the_imported_parameters(tmp_path):
    """`train.init_from` starts a run from the import (its initial state holds the imported
    parameters exactly) and it trains; a run whose model does not fit the import is one
    ConfigError naming the parameters."""
    from dlm_jax.config import Config
    from dlm_jax.registry import apply_family
    from dlm_jax.trainer import Trainer
    sd = _state_dict("bd3lm_dit_mdlm")
    _import(tmp_path, _write(tmp_path, sd))
    imported = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg = Config.from_dict(imported)
    cfg.train.init_from = str(tmp_path / "run")
    cfg.train.steps, cfg.train.batch_size, cfg.optim.lr = 2, 8, 1e-4
    cfg.train.log_every = cfg.train.eval_every = cfg.train.ckpt_every = 2
    cfg.train.eval_batches = 1
    trainer = Trainer(cfg, str(tmp_path / "tuned"), measure_mfu=False)
    want = jax.device_get(restore_run(str(tmp_path / "run"))[3].eval_params)
    start = jax.device_get(trainer.init_state())
    jax.tree.map(np.testing.assert_array_equal, start.params, want)
    jax.tree.map(np.testing.assert_array_equal, start.ema_params, want)
    trainer.run()
    step, tuned = (lambda r: (r[2], r[3]))(restore_run(str(tmp_path / "tuned")))
    assert step == 2
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(tuned.params),
                         want)
    assert 0 < max(jax.tree.leaves(moved)) < 1e-2  # trained a little, from the import

    other = Config(name="other")
    apply_family(other, "mdlm")
    other.data.source, other.data.markov_vocab, other.data.seq_len = "markov", 47, 16
    other.model.width, other.model.depth, other.model.heads, other.model.cond_dim = 32, 2, 4, 32
    other.train.init_from = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"init_from.*do not fit this model: .*\(6, 64\), "
                                          r"expected \(6, 32\)"):
        Trainer(other, str(tmp_path / "bad"), measure_mfu=False).run()


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("output_layer.linear.bias"), r"missing.*output_layer\.linear\.bias"),
    (lambda sd: sd.update({"blocks.0.attn_qkv.bias": np.zeros(192, np.float32)}),
     r"unmapped keys.*blocks\.0\.attn_qkv\.bias"),
    (lambda sd: sd.update({"blocks.1.mlp.0.bias": np.zeros(100, np.float32)}),
     r"blocks\.1\.mlp\.0\.bias: shape \(100,\)"),
])
def test_bad_state_dicts(tmp_path, edit, message):
    sd = dict(_state_dict("bd3lm_dit_mdlm"))
    edit(sd)
    with pytest.raises(ValueError, match=message):
        _import(tmp_path, _write(tmp_path, sd))
    assert not (tmp_path / "run").exists()          # nothing written


def test_wrong_family_and_missing_settings(tmp_path):
    dit = _write(tmp_path, _state_dict("bd3lm_dit_mdlm"))
    gpt2 = _write(tmp_path, _state_dict("gpt2"), "gpt2.safetensors", prefix="")
    with pytest.raises(ValueError, match="--from gpt2, but the checkpoint has no wte.weight.*DiT"):
        _import(tmp_path, dit, "gpt2")
    with pytest.raises(ValueError, match="--from mdlm.*GPT-2 keys: try --from gpt2"):
        _import(tmp_path, gpt2, "mdlm")
    hf = tmp_path / "hf"
    hf.mkdir()
    _write(hf, _state_dict("bd3lm_dit_mdlm"), "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "bd3lm", "block_size": 4}))
    with pytest.raises(ValueError, match="declares a bd3lm model .model_type='bd3lm'., but "
                                         "--from sedd"):
        _import(tmp_path, str(hf), "sedd")
    with pytest.raises(ValueError, match="pass --block_size"):
        _import(tmp_path, dit, "bd3lm")
    with pytest.raises(ValueError, match="47 token ids .plus the mask.: pass --tokenizer"):
        _import(tmp_path, dit, sets=())
    with pytest.raises(ValueError, match="vocabulary is 48, but data.tokenizer='byte'"):
        _import(tmp_path, dit, sets=(), tokenizer="byte")
    _import(tmp_path, dit)
    with pytest.raises(ValueError, match="already has checkpoints"):
        _import(tmp_path, dit)
    with pytest.raises(FileNotFoundError, match="not found"):
        _import(tmp_path, str(tmp_path / "nope.safetensors"), out="other")


def test_torch_formats_need_torch_or_say_so(tmp_path):
    path = tmp_path / "model.bin"
    try:
        import torch
    except ImportError:
        path.write_bytes(b"not read")
        with pytest.raises(ValueError, match=r"needs PyTorch: pip install 'dlm_jax\[torch\]'"):
            open_checkpoint(str(path))
        return
    sd = _state_dict("bd3lm_dit_mdlm")
    torch.save({"backbone." + k: torch.from_numpy(v) for k, v in sd.items()}, str(path))
    src, _ = open_checkpoint(str(path))
    np.testing.assert_array_equal(src["backbone.vocab_embed.embedding"],
                                  sd["vocab_embed.embedding"])


def test_gpt2_hub_directory_matches_the_reference_and_round_trips(tmp_path):
    """A hub-style GPT-2 directory (config.json; no `transformer.` prefix, no lm_head.weight,
    the causal-mask buffers): the imported run's logits equal transformers' to 1e-4, the KV-cached
    sampler runs, and the export is the reference state dict exactly."""
    import jax.numpy as jnp
    z = np.load(FIXTURES / "gpt2.npz") if (FIXTURES / "gpt2.npz").exists() else None
    if z is None:
        pytest.skip("fixture gpt2.npz not found (../shared/fixtures)")
    meta = json.loads((FIXTURES / "gpt2.json").read_text())["model_config"]
    sd = state_dict_from_npz(z)
    hub = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    for i in range(meta["n_layer"]):
        hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, meta["n_positions"],
                                                   meta["n_positions"]), np.float32))
    d = tmp_path / "gpt2"
    d.mkdir()
    save_file(hub, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(meta))
    import_checkpoint("gpt2", str(d), str(tmp_path / "run"),
                      sets=("data.source=markov", f"data.markov_vocab={meta['vocab_size']}"))
    exp, _, _, state = restore_run(str(tmp_path / "run"))
    assert exp.cfg.model.arch == "gpt2" and exp.cfg.data.seq_len == meta["n_positions"]
    logits = jax.jit(lambda p, t: exp.model(p)(t))(state.eval_params,
                                                  jnp.asarray(z["input/tokens"]))
    np.testing.assert_allclose(np.asarray(logits), z["output/logits"], atol=1e-4, rtol=0)

    from dlm_jax.generation import generate_samples
    rows, _ = generate_samples(exp, state.eval_params, dataclasses.replace(
        exp.cfg.sampling, num_samples=2, batch_size=2, length=12))
    assert np.asarray([r["tokens"] for r in rows]).shape == (2, 12)

    export_run(str(tmp_path / "run"), str(tmp_path / "back.safetensors"))
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
