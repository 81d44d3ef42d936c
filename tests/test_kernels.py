"""The accelerator attention backends (`models.kernels`) against the dense reference.

Splash runs in the Pallas interpreter on CPU (tiny sizes: the interpreter walks the grid in
Python); cuDNN needs a GPU, so on CPU only its plan and the fallbacks are tested.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from dlm_jax import registry
from dlm_jax.config import ConfigError
from dlm_jax.models import flash, kernels
from dlm_jax.models.attention import MaskPattern, attend, check_backend, dense_attention
from dlm_jax.sharding import mesh_axes_for

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
# The mesh tests need 4 devices: fake CPU devices in the suite (conftest), chips on a TPU host.
FOUR_DEVICES = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")


def _inputs(b, lq, lk, h=2, dh=64, dtype=jnp.float32, seed=0):
    """q (b, lq, h, dh), k/v (b, lk, h, dh) and an output cotangent (b, lq, h, dh)."""
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, (b, n, h, dh), dtype)
                 for key, n in ((kq, lq), (kk, lk), (kv, lk), (kw, lq)))


def _value_and_grads(fn, q, k, v, w, pattern):
    """The output and d⟨out, w⟩/d(q, k, v) of fn(q, k, v, pattern)."""
    def loss(q, k, v):
        o = fn(q, k, v, pattern)
        return (o.astype(jnp.float32) * w).sum(), o
    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def _assert_matches_dense(fn, q, k, v, w, pattern, tol=TOL):
    o, grads = _value_and_grads(fn, q, k, v, w, pattern)
    o_ref, grads_ref = _value_and_grads(dense_attention, q, k, v, w, pattern)
    assert o.shape == o_ref.shape and o.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), **tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   err_msg=f"d{name}", **tol)


# ---------------------------------------------------------------------------------------------
# splash: block masks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,block", [("full", 0), ("causal", 0), ("block_causal", 1),
                                        ("block_causal", 4), ("block_causal", 32),
                                        ("two_pass", 1), ("two_pass", 4), ("two_pass", 16)])
@pytest.mark.parametrize("lq,lk", [(32, 32), (96, 96), (16, 32), (48, 96)])
def test_splash_mask_equals_the_pattern(kind, block, lq, lk):
    pattern = MaskPattern(kind, block)
    if kind == "two_pass" and (lq not in (lk, lk // 2) or (lk // 2) % block):
        pytest.skip("not a two-pass shape")
    if kind == "block_causal" and lk % block:
        pytest.skip("length not a multiple of the block")
    mask = kernels.splash_mask(pattern, lq, lk)
    assert mask.shape == (lq, lk)
    np.testing.assert_array_equal(mask[0:lq, 0:lk], np.asarray(pattern.dense(lq, lk)))
    np.testing.assert_array_equal(mask[8:16, 16:32], np.asarray(pattern.dense(lq, lk))[8:16, 16:32])


def test_splash_mask_refuses_a_band():
    with pytest.raises(ValueError, match="band"):
        kernels.splash_mask(MaskPattern("block_causal", 4, band=2), 32, 32)


def test_splash_block_sizes():
    bs = kernels.splash_block_sizes(1536, 3072)
    assert (bs.block_q, bs.block_kv, bs.block_q_dkv, bs.block_kv_dkv, bs.block_q_dq,
            bs.block_kv_dq) == (512, 512, 512, 512, 512, 512)
    bs = kernels.splash_block_sizes(384, 256)
    assert (bs.block_q, bs.block_kv, bs.block_kv_compute) == (128, 256, 256)
    with pytest.raises(ValueError, match="Lq=100, Lk=256"):
        kernels.splash_block_sizes(100, 256)
    q, k, v, _ = _inputs(1, 192, 192, h=1, dh=8)
    with pytest.raises(ValueError, match="Lq=192, Lk=192"):
        kernels.splash_attention(q, k, v, MaskPattern("causal"))


# ---------------------------------------------------------------------------------------------
# splash: the kernel (interpret mode) against the dense reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,block,b,lq,lk", [
    ("full", 0, 2, 256, 256),
    ("causal", 0, 1, 256, 256),
    ("block_causal", 16, 1, 256, 256),
    ("two_pass", 16, 1, 256, 256),     # Lq = 2L: both halves
    ("two_pass", 32, 1, 128, 256),     # Lq = L: the last layer's noisy rows
])
def test_splash_matches_dense(kind, block, b, lq, lk):
    q, k, v, w = _inputs(b, lq, lk)
    _assert_matches_dense(kernels.splash_attention, q, k, v, w, MaskPattern(kind, block))


def test_splash_through_attend_and_jit():
    q, k, v, _ = _inputs(1, 128, 128, h=1)
    pattern = MaskPattern("block_causal", 8)
    got = jax.jit(lambda q, k, v: attend(q, k, v, pattern, backend="splash"))(q, k, v)
    np.testing.assert_allclose(got, dense_attention(q, k, v, pattern), **TOL)


def test_splash_bfloat16():
    q, k, v, w = _inputs(1, 128, 256, h=1, dtype=jnp.bfloat16)
    _assert_matches_dense(kernels.splash_attention, q, k, v, w, MaskPattern("two_pass", 16),
                          tol=dict(atol=3e-2, rtol=3e-2))


@pytest.mark.parametrize("kind,lq,lk", [("block_causal", 48, 48), ("two_pass", 24, 48)])
def test_splash_band_falls_back_to_flash(kind, lq, lk, monkeypatch):
    """A traced band has no static block mask: the kernel is never built, the flash backend
    computes it (any length, as the fallback needs no 128-multiples)."""
    calls = []

    def no_kernel(*args):
        raise AssertionError("the splash kernel was built for a banded pattern")

    def recording_flash(q, k, v, pattern):
        calls.append(pattern)
        return dense_attention(q, k, v, pattern)
    monkeypatch.setattr(kernels, "_splash_kernel", no_kernel)
    monkeypatch.setattr(flash, "flash_attention", recording_flash)
    q, k, v, _ = _inputs(1, lq, lk, dh=16)

    @jax.jit
    def run(q, k, v, band):
        return kernels.splash_attention(q, k, v, MaskPattern(kind, 8, band=band))
    got = run(q, k, v, jnp.int32(3))
    assert len(calls) == 1 and calls[0].band is not None
    want = dense_attention(q, k, v, MaskPattern(kind, 8, band=jnp.int32(3)))
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.allclose(got, dense_attention(q, k, v, MaskPattern(kind, 8)), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# splash: under a mesh
# ---------------------------------------------------------------------------------------------

def _abstract_mesh(shape):
    return AbstractMesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_mesh_spec():
    assert kernels._mesh_spec(jax.sharding.get_abstract_mesh(), 4, 4) is None  # no mesh
    assert kernels._mesh_spec(_abstract_mesh((1, 1, 1)), 4, 4) is None
    assert kernels._mesh_spec(_abstract_mesh((2, 2, 2)), 8, 4) == P(("data", "fsdp"), None,
                                                                   "tensor", None)
    assert kernels._mesh_spec(_abstract_mesh((2, 1, 2)), 4, 2) == P("data", None, "tensor", None)
    assert kernels._mesh_spec(_abstract_mesh((2, 1, 2)), 3, 2) == P(None, None, "tensor", None)
    assert kernels._mesh_spec(_abstract_mesh((4, 2, 1)), 4, 2) is None  # 8 ∤ 4: replicated
    # the run's rules, when the model passes them: batch over "data" only, heads replicated
    custom = (("data",), ())
    assert kernels._mesh_spec(_abstract_mesh((2, 2, 2)), 8, 4, custom) == P("data", None, None,
                                                                           None)
    assert kernels._mesh_spec(_abstract_mesh((1, 2, 2)), 8, 4, custom) is None
    assert kernels._mesh_spec(_abstract_mesh((2, 2, 2)), 8, 4, ((), ("fsdp", "tensor"))) == P(
        None, None, ("fsdp", "tensor"), None)


@FOUR_DEVICES
def test_splash_under_a_mesh_runs_in_shard_map():
    """Batch over "data", heads over "tensor" of a (2, 1, 2) mesh of fake CPU devices."""
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    pattern = MaskPattern("two_pass", 16)
    q, k, v, w = _inputs(2, 128, 256)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: _value_and_grads(kernels.splash_attention, q, k, v, w,
                                                      pattern))
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        o, grads = fn(q, k, v)
    assert "shard_map" in jaxpr and "tensor" in jaxpr
    o_ref, grads_ref = _value_and_grads(dense_attention, q, k, v, w, pattern)
    for got, want in zip((o, *grads), (o_ref, *grads_ref)):
        np.testing.assert_allclose(got, want, **TOL)


@FOUR_DEVICES
def test_splash_traces_under_one_mesh_after_another():
    """The cached kernel's mask-info constants take the type of the mesh they were built under:
    the same shapes traced under a second mesh (local shapes equal, other axis sizes) must not
    reuse the first mesh's kernel (a shard_map "context mesh … should match the aval mesh")."""
    pattern = MaskPattern("causal")
    q, k, v, w = _inputs(4, 128, 128)
    ref = _value_and_grads(dense_attention, q, k, v, w, pattern)
    for shape in ((2, 2, 1), (2, 1, 1)):  # batch over data × fsdp, then over data only
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                             devices=jax.devices()[:shape[0] * shape[1]])
        with jax.set_mesh(mesh):
            got = jax.jit(lambda q, k, v: _value_and_grads(
                kernels.splash_attention, q, k, v, w, pattern))(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, **TOL)


@FOUR_DEVICES
def test_models_split_splash_as_the_run_rules_do(monkeypatch):
    """The DiT passes its run's mesh rules (`config.mesh.rules` "batch" and "heads", through
    `registry`) to splash's shard_map: here batch over "data" only, heads replicated, on a
    (2, 2, 1) mesh, where the default rules would split the batch over data × fsdp. Values
    equal the dense model's (same parameters)."""
    from flax import nnx

    from dlm_jax.models.transformer import build_model
    cfg = tiny.get_config("bd3lm,block=16")
    cfg.mesh.rules = tuple((name, "data" if name == "batch" else None if name == "heads" else rule)
                           for name, rule in cfg.mesh.rules)
    rules = dict(cfg.mesh.rules)
    batch_axes, head_axes = mesh_axes_for("batch", rules), mesh_axes_for("heads", rules)
    assert (batch_axes, head_axes) == (("data",), ())
    # the registry builds the run's model with those rules (splash itself is refused off-TPU)
    assert registry.build(cfg).new_model(0).blocks[0].shard_axes == (("data",), ())
    specs = []
    mesh_spec = kernels._mesh_spec
    monkeypatch.setattr(kernels, "_mesh_spec",
                        lambda *args: specs.append(mesh_spec(*args)) or specs[-1])

    def model(attention):
        cfg.model.attention = attention
        return build_model(cfg.model, vocab_size=9, causal=False,
                           batch_axes=batch_axes, head_axes=head_axes, rngs=nnx.Rngs(0))
    splash, dense = model("splash"), model("dense")
    assert splash.blocks[0].shard_axes == (("data",), ())
    length = 128
    tokens = jax.random.randint(jax.random.key(1), (4, 2 * length), 0, 9)
    sigma = jnp.full((4,), 0.5)
    pattern = MaskPattern("two_pass", 16)
    mesh = jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        got = jax.jit(lambda t, s: splash(t, s, mask=pattern))(tokens, sigma)
    assert specs and all(spec == P("data", None, None, None) for spec in specs)
    want = dense(tokens, sigma, mask=pattern)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# cudnn
# ---------------------------------------------------------------------------------------------

BF16 = jnp.bfloat16


@pytest.mark.parametrize("pattern,lq,lk,dtype,dh,want", [
    (MaskPattern("full"), 256, 256, BF16, 64, "cudnn"),
    (MaskPattern("full"), 128, 256, jnp.float16, 128, "cudnn"),
    (MaskPattern("causal"), 256, 256, BF16, 64, "cudnn"),
    (MaskPattern("causal"), 128, 256, BF16, 64, "xla"),
    (MaskPattern("block_causal", 16), 256, 256, BF16, 64, "xla"),
    (MaskPattern("two_pass", 16), 512, 512, BF16, 64, "xla"),
    (MaskPattern("two_pass", 16), 256, 512, BF16, 64, "xla"),
    (MaskPattern("full", band=jnp.int32(3)), 256, 256, BF16, 64, "xla"),
    (MaskPattern("causal", band=2), 256, 256, BF16, 64, "xla"),
    (MaskPattern("full"), 256, 256, jnp.float32, 64, "xla"),
    (MaskPattern("causal"), 256, 256, jnp.float64, 64, "xla"),
    (MaskPattern("full"), 256, 256, BF16, 60, "xla"),      # not a multiple of 8
    (MaskPattern("full"), 256, 256, BF16, 192, "xla"),     # > 128 before Hopper
])
def test_cudnn_plan(pattern, lq, lk, dtype, dh, want):
    plan, reason = kernels.cudnn_plan(pattern, lq, lk, dtype, dh)
    assert plan == want, reason
    assert reason


def test_cudnn_plan_head_dim_on_hopper():
    assert kernels.cudnn_plan(MaskPattern("full"), 64, 64, BF16, 192, max_head_dim=256)[0] == "cudnn"
    assert kernels.cudnn_plan(MaskPattern("full"), 64, 64, BF16, 264, max_head_dim=256)[0] == "xla"


def test_cudnn_falls_back_for_float32(monkeypatch):
    calls = []

    def recording_flash(q, k, v, pattern):
        calls.append(pattern)
        return dense_attention(q, k, v, pattern)
    monkeypatch.setattr(flash, "flash_attention", recording_flash)
    q, k, v, _ = _inputs(2, 16, 16, dh=8)
    got = attend(q, k, v, MaskPattern("causal"), backend="cudnn")
    assert len(calls) == 1
    np.testing.assert_allclose(got, dense_attention(q, k, v, MaskPattern("causal")), **TOL)


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_accelerator_backends_refuse_the_cpu(backend):
    with pytest.raises(ValueError, match=f"model.attention='{backend}'"):
        check_backend(backend, "cpu")
    assert check_backend(backend) == backend


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the check refuses CPU/GPU only")
def test_building_a_splash_experiment_off_tpu_fails():
    cfg = tiny.get_config("bd3lm,block=8")
    cfg.model.attention = "splash"
    with pytest.raises(ConfigError, match="model.attention='splash'"):
        registry.build(cfg)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a GPU")
@pytest.mark.parametrize("kind,lq,lk", [("full", 256, 256), ("full", 128, 256),
                                        ("causal", 256, 256)])
def test_cudnn_matches_dense_on_gpu(kind, lq, lk, monkeypatch):
    def no_flash(*args):
        raise AssertionError("cuDNN fell back to flash")
    monkeypatch.setattr(flash, "flash_attention", no_flash)
    q, k, v, w = _inputs(2, lq, lk, h=4, dh=64, dtype=BF16)
    _assert_matches_dense(jax.jit(kernels.cudnn_attention, static_argnums=3), q, k, v, w,
                          MaskPattern(kind), tol=dict(atol=3e-2, rtol=3e-2))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_model_matches_dense_on_gpu(causal, monkeypatch):
    """A bf16 DiT (bench size: head dim 64) with `model.attention="cudnn"`: logits and parameter
    gradients equal the same model's with dense attention; cuDNN ran (flash is never called)."""
    from flax import nnx

    from dlm_jax.models.transformer import build_model
    def no_flash(*args):
        raise AssertionError("cuDNN fell back to flash")
    monkeypatch.setattr(flash, "flash_attention", no_flash)
    cfg = tiny.get_config("ar" if causal else "mdlm")
    cfg.model.size, cfg.model.compute_dtype = "bench", "bfloat16"
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 50)
    sigma = None if causal else jnp.full((2,), 0.5)

    def logits_and_grads(attention):
        cfg.model.attention = attention
        model = build_model(cfg.model, vocab_size=50, causal=causal, rngs=nnx.Rngs(0))
        graph, params = nnx.split(model, nnx.Param)

        def loss(params):
            out = nnx.merge(graph, params)(tokens, sigma)
            return (out.astype(jnp.float32) ** 2).mean(), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grads
    got, got_grads = logits_and_grads("cudnn")
    want, want_grads = logits_and_grads("dense")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=5e-2, rtol=5e-2)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        scale = float(jnp.abs(w).max()) + 1e-6
        assert float(jnp.abs(g - w).max()) <= 5e-2 * scale
