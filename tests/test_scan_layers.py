"""`model.scan_layers`: the blocks as one `lax.scan` over stacked parameters equal the unrolled
stack (initial values, outputs, gradients, dropout, KV-cache decoding), and every boundary that
holds parameters (checkpoints with their optimizer state and EMA, the converters, adaptation)
takes either layout."""
from __future__ import annotations

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlm_jax.config import Config
from dlm_jax.models.adapt import ar_to_diffusion
from dlm_jax.models.cache import KVCache
from dlm_jax.models.convert import dit_from_state_dict, dit_state_dict
from dlm_jax.models.gpt2 import GPT2, gpt2_from_state_dict, gpt2_to_state_dict
from dlm_jax.models.layout import (blocks_stacked, find_layout, stack_layers, stack_params,
                                   to_layout, unstack_layers)
from dlm_jax.models.transformer import DiT
from dlm_jax.sharding import make_mesh, param_shardings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

V, D, N, H, C, L = 11, 32, 3, 4, 16, 8


def _dit(scan, **kw):
    kw.setdefault("cond_dim", C)
    return DiT(V, D, N, H, scan_layers=scan, rngs=nnx.Rngs(0), **kw)


def _gpt2(scan, **kw):
    return GPT2(V, D, N, H, n_positions=2 * L, scan_layers=scan, rngs=nnx.Rngs(0), **kw)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _random_params(params, seed=7):
    """Random values for every leaf (a fresh DiT outputs exactly 0: adaLN-zero)."""
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [0.3 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])


def _with(model, params):
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _close(a, b, rtol=2e-5):
    """Trees equal up to float32 reassociation, relative to each leaf's scale."""
    def check(path, x, y):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.abs(x).max()), 1e-6)
        np.testing.assert_allclose(x, y, atol=rtol * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(check, a, b)


# ---------------------------------------------------------------------------------------------
# Layout functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [lambda s: _dit(s, time_conditioning=True),
                                   lambda s: _dit(s, causal=True), _gpt2],
                         ids=["dit", "dit-causal", "gpt2"])
def test_scanned_model_starts_from_the_unrolled_values(build):
    unrolled, scanned = _params(build(False)), _params(build(True))
    assert not blocks_stacked(unrolled) and blocks_stacked(scanned)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(unrolled), scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), unrolled)
    # Logical names: the depth axis is "layers", which the rules table replicates.
    state = nnx.state(build(True), nnx.Param)
    spec = nnx.to_pure_dict(nnx.get_partition_spec(state))
    assert tuple(spec["blocks"]["attn"]["qkv"])[:2] == ("layers", "embed")
    cfg = Config()
    cfg.mesh.shape = (1, 2, 1)
    shardings = param_shardings(state, make_mesh(cfg.mesh, jax.devices()[:2]), cfg.mesh.rules)
    assert shardings["blocks"]["attn"]["qkv"].spec == P(None, "fsdp", None, None, None)


def test_stack_unstack_round_trip_on_states_and_abstract_trees():
    p = jax.tree.map(np.asarray, _params(_dit(False)))
    state = {"params": p, "opt": ({"mu": p, "nu": p}, None), "step": np.int32(3)}
    stacked = stack_layers(state)
    assert find_layout(stacked) is True and find_layout(state) is False
    assert stacked["opt"][0]["mu"]["blocks"]["attn"]["qkv"].shape == (N, D, 3, H, D // H)
    assert isinstance(stacked["params"]["blocks"]["norm1"]["weight"], np.ndarray)  # numpy kept
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), state)
    assert stack_layers(stacked) is not None and find_layout({"x": 1}) is None
    # Layer keys restored without a template are digit strings.
    as_str = {**p, "blocks": {str(i): b for i, b in p["blocks"].items()}}
    jax.tree.map(np.testing.assert_array_equal, stack_params(as_str), stack_params(p))
    # Abstract leaves: the new axis is replicated; unstacking drops it from the spec.
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    sds = jax.ShapeDtypeStruct((D, 4 * D), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    tree = {"blocks": {0: {"w": sds}, 1: {"w": sds}}}
    up = to_layout(tree, True)["blocks"]["w"]
    assert up.shape == (2, D, 4 * D) and up.sharding.spec == P(None, "fsdp")
    down = to_layout(to_layout(tree, True), False)["blocks"][1]["w"]
    assert down.shape == (D, 4 * D) and down.sharding.spec == P("fsdp")
    with pytest.raises(ValueError, match=r"layers \[0, 2\], not 0 … N−1"):
        stack_params({"blocks": {0: p["blocks"][0], 2: p["blocks"][1]}})


# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------

def _value_and_grad(model, fn):
    """jit((params, x, key) -> (Σ sin(fn(model, x, key)), gradient))."""
    return jax.jit(jax.value_and_grad(
        lambda p, x, key: jnp.sum(jnp.sin(fn(_with(model, p), x, key)))))


DIT_MODES = {
    # MDLM-style: full attention, time conditioning, σ per sequence.
    "full": (dict(time_conditioning=True),
             lambda m, x, k: m(x, jnp.array([0.3, 1.2]), deterministic=False, rngs=k)),
    # BD3-LM: the two-pass [x_t ⊕ x_0] forward with a per-token σ (last layer: L query rows).
    "two_pass": (dict(time_conditioning=True, token_conditioning=True),
                 lambda m, x, k: m.two_pass(x, x[:, ::-1], 0.1 + 0.2 * jnp.arange(L)[None] *
                                            jnp.ones((2, 1)), 4, deterministic=False, rngs=k)),
    "causal": (dict(causal=True), lambda m, x, k: m(x, deterministic=False, rngs=k)),
}


# Every mode and every remat policy; the two-pass forward (whose last layer is peeled off the
# scan) under all three. Each case compiles two programs, so not the full product.
DIT_CASES = [("two_pass", "none"), ("two_pass", "block"), ("two_pass", "dots"),
             ("full", "none"), ("causal", "none")]


def _check_equal(unrolled, scanned, fn, params):
    x = jax.random.randint(jax.random.key(1), (2, L), 0, V)
    key = jax.random.key(3)  # the same dropout key: the same masks in every layer
    f_unrolled, f_scanned = _value_and_grad(unrolled, fn), _value_and_grad(scanned, fn)
    la, ga = f_unrolled(params, x, key)
    lb, gb = f_scanned(stack_layers(params), x, key)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    _close(stack_layers(ga), gb)
    # Dropout is on: another key changes the value.
    assert abs(float(f_scanned(stack_layers(params), x, jax.random.key(4))[0]) - float(lb)) > 1e-4


@pytest.mark.parametrize("mode,remat", DIT_CASES)
def test_dit_scanned_equals_unrolled(mode, remat):
    kw, fn = DIT_MODES[mode]
    unrolled = _dit(False, dropout=0.2, remat=remat, **kw)
    scanned = _dit(True, dropout=0.2, remat=remat, **kw)
    _check_equal(unrolled, scanned, fn, _random_params(_params(unrolled)))


@pytest.mark.parametrize("causal,remat", [(True, "none"), (False, "dots")])
def test_gpt2_scanned_equals_unrolled(causal, remat):
    if causal:
        def fn(m, x, key):
            return m(x, deterministic=False, rngs=key)
    else:
        def fn(m, x, key):
            return m.two_pass(x, x[:, ::-1], None, 4, deterministic=False, rngs=key)
    unrolled = _gpt2(False, dropout=0.2, remat=remat, causal=causal)
    scanned = _gpt2(True, dropout=0.2, remat=remat, causal=causal)
    _check_equal(unrolled, scanned, fn, _random_params(_params(unrolled), seed=2))


# ---------------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["dit", "dit-causal", "gpt2"])
def test_cached_decoding_scanned_equals_unrolled(arch):
    if arch == "gpt2":
        build, sigma = _gpt2, None
    else:
        kw = dict(causal=True) if arch == "dit-causal" else dict(time_conditioning=True)
        build, sigma = (lambda s: _dit(s, **kw)), jnp.array([0.4, 0.9])
    unrolled, scanned = build(False), build(True)
    p = _random_params(_params(unrolled))
    unrolled, scanned = _with(unrolled, p), _with(scanned, stack_layers(p))
    x = jax.random.randint(jax.random.key(1), (2, 3 * 4), 0, V)
    window = 8  # the third commit slides the window
    caches = {"unrolled": unrolled.init_cache(2, window), "scanned": scanned.init_cache(2, window)}
    models = {"unrolled": unrolled, "scanned": scanned}
    assert caches["scanned"].stacked and not caches["unrolled"].stacked
    if arch == "dit":  # either model decodes with either form of the cache
        caches["scanned/tuple"] = KVCache.zeros(N, 2, window, H, D // H)
        caches["unrolled/stacked"] = KVCache.zeros(N, 2, window, H, D // H, stacked=True)
        models.update({"scanned/tuple": scanned, "unrolled/stacked": unrolled})
    commit = {name: jax.jit(lambda t, c, m=m: m.decode_block(t, sigma, c, commit=True))
              for name, m in models.items()}
    for b in range(3):
        block = x[:, 4 * b:4 * b + 4]
        ref = None
        for name in models:
            logits, caches[name] = commit[name](block, caches[name])
            ref = logits if ref is None else ref
            _close(ref, logits, rtol=2e-6)
        for name in models:
            _close(np.stack(caches["unrolled"].k), np.stack(caches[name].k), rtol=2e-6)
            _close(np.stack(caches["unrolled"].v), np.stack(caches[name].v), rtol=2e-6)
            assert int(caches[name].length) == 4 * (b + 1)
    # Not committing leaves the cache as it was.
    _, same = scanned.decode_block(x[:, :4], sigma, caches["scanned"], commit=False)
    assert same is caches["scanned"]


# ---------------------------------------------------------------------------------------------
# Converters and adaptation
# ---------------------------------------------------------------------------------------------

def test_converters_and_adaptation_take_either_layout(tmp_path):
    from safetensors.numpy import save_file

    from dlm_jax.evals import restore_run
    from dlm_jax.interop import export_run, import_checkpoint
    # DiT: state dict -> scanned model; export from stacked params is the same state dict.
    p = jax.tree.map(np.asarray, _random_params(_params(_dit(False))))
    sd = dit_state_dict(p)
    assert set(dit_state_dict(stack_layers(p))) == set(sd)
    jax.tree.map(np.testing.assert_array_equal, dit_state_dict(stack_layers(p)), sd)
    scanned = dit_from_state_dict(sd, scan_layers=True, cond_dim=C)
    assert scanned.scan_layers
    jax.tree.map(np.testing.assert_array_equal, _params(scanned), stack_layers(p))
    # GPT-2 likewise.
    g = jax.tree.map(np.asarray, _random_params(_params(_gpt2(False))))
    gsd = gpt2_to_state_dict(g)
    jax.tree.map(np.testing.assert_array_equal, gpt2_to_state_dict(stack_layers(g)), gsd)
    model = GPT2.from_state_dict(gsd, heads=H, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, _params(model), stack_layers(g))
    assert gpt2_from_state_dict(gsd, heads=H)[1]["blocks"].keys() == {0, 1, 2}

    # AR -> diffusion: any layout in, the diffusion model's layout out, the same values.
    ar = jax.tree.map(np.asarray, _random_params(_params(_dit(False, causal=True))))
    init = jax.tree.map(np.asarray, _params(DiT(V + 1, D, N, H, cond_dim=C, rngs=nnx.Rngs(1))))
    want = ar_to_diffusion(ar, init)
    for a, i in ((stack_layers(ar), init), (ar, stack_layers(init)),
                 (stack_layers(ar), stack_layers(init))):
        got = ar_to_diffusion(a, i)
        assert blocks_stacked(got) == blocks_stacked(i)
        jax.tree.map(np.testing.assert_array_equal, unstack_layers(got), want)

    # Import asked for scan_layers gives a stacked workdir; its export is the original.
    path = str(tmp_path / "mdlm.safetensors")
    big = dit_state_dict(jax.tree.map(
        np.asarray, _random_params(_params(DiT(48, D, 2, H, cond_dim=C, rngs=nnx.Rngs(0))))))
    save_file(big, path)
    import_checkpoint("mdlm", path, str(tmp_path / "run"), seq_len=16,
                      sets=("data.source=markov", "data.markov_vocab=47",
                            "model.scan_layers=true"))
    exp, _, _, state = restore_run(str(tmp_path / "run"))
    assert exp.cfg.model.scan_layers and blocks_stacked(state.params)
    # The parameters-only checkpoint restores unrolled too.

    def scan_off(cfg):
        cfg.model.scan_layers = False
    unrolled = restore_run(str(tmp_path / "run"), scan_off)[3].params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(unrolled),
                 unstack_layers(jax.device_get(state.params)))
    export_run(str(tmp_path / "run"), str(tmp_path / "back.safetensors"))
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back.safetensors"))
    for k, v in big.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=0, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Checkpoints: resume, evaluate and initialise across layouts
# ---------------------------------------------------------------------------------------------

def _run(workdir, scan, steps):
    from dlm_jax.trainer import Trainer
    cfg = tiny.get_config("mdlm")  # EMA on (optim.ema_decay 0.99): params, moments and EMA
    cfg.mesh.shape = (1, 1, 1)
    cfg.model.scan_layers = scan
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = steps, 1, 2
    cfg.train.eval_every, cfg.train.eval_batches, cfg.train.batch_size = 100, 1, 4
    trainer = Trainer(cfg, str(workdir), devices=jax.devices()[:1], measure_mfu=False)
    summary = trainer.run()
    trainer.close()
    return summary, jax.device_get(trainer.state)


def test_resume_evaluate_and_init_across_layouts(tmp_path):
    from dlm_jax.evals import initial_params, restore_run
    from dlm_jax.registry import build
    _run(tmp_path / "a", False, 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same, s_same = _run(tmp_path / "a", False, 3)      # unrolled -> unrolled
    other, s_other = _run(tmp_path / "b", True, 3)     # unrolled -> scanned
    assert other["start_step"] == 2 and blocks_stacked(s_other.params)
    np.testing.assert_allclose(other["train_loss"], same["train_loss"], rtol=1e-5)
    _close(stack_layers(s_same.params), s_other.params)
    _close(stack_layers(s_same.ema_params), s_other.ema_params)
    _close(stack_layers(s_same.opt_state), s_other.opt_state)

    # And back: the scanned checkpoint (step 3), restored unrolled as evaluation and sampling
    # do, is the whole train state of the unrolled run.
    def scan_off(cfg):
        cfg.model.scan_layers = False
    _, _, step, back = restore_run(str(tmp_path / "b"), scan_off)
    assert step == 3 and not blocks_stacked(back.params)
    _close(s_same.params, jax.device_get(back.params))
    _close(s_same.opt_state, jax.device_get(back.opt_state))
    # train.init_from of a run with the other layout: its EMA, stacked.
    cfg = Config.from_dict(restore_run(str(tmp_path / "a"))[0].cfg.to_dict())
    assert cfg.model.scan_layers is False
    cfg.model.scan_layers = True
    cfg.mesh.shape = (1, 1, 1)
    params = initial_params(str(tmp_path / "a"), build(cfg, jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 stack_layers(s_same.ema_params))
