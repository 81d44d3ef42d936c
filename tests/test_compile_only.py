"""`--compile_only` (dlm_jax.compile_check) and the XLA:CPU collective timeouts (dlm_jax.cli)."""
import os
import re
import subprocess
import sys

import jax
import pytest

from dlm_jax import registry
from dlm_jax.cli import CPU_COLLECTIVE_TIMEOUTS, FAKE_DEVICES_FLAG, cpu_xla_flags
from dlm_jax.compile_check import (abstract_batch, attention_notes, compile_report, human_bytes,
                                   largest_arrays, lower_for_platform, memory_figures)
from dlm_jax.config import ConfigError
from dlm_jax.models import kernels
from dlm_jax.models.transformer import model_dims
from dlm_jax.state import make_optimizer
from dlm_jax.steps import TrainProgram

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compiled step's FLOPs (XLA's count, all devices) and the method's analytic count
# (`flops_per_token` × tokens) differ by elementwise work, the optimizer and what each counts of
# the attention; on the tiny configs they agree within this factor.
FLOPS_FACTOR = 2.0


def _env(devices=None):
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": cpu_xla_flags(flags, devices=devices) if devices else flags}


def test_compile_only_prints_memory_flops_and_shardings_and_writes_nothing(tmp_path):
    """A 2×2 mesh of fake devices that the parent process does not have (--mesh_devices 4 in a
    1-device environment)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config",
         os.path.join(REPO, "configs", "tiny.py") + ":mdlm", "--compile_only",
         "--mesh_devices", "4", "--config.mesh.shape=(2,2,1)"],
        cwd=cwd, env={**_env(devices=1), "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dlm_jax compile_only: tiny-mdlm | method mdlm")
    assert "compiled train step for 4 cpu device(s), mesh data=2 fsdp=2 tensor=1" in lines[1]
    memory = next(ln for ln in lines if ln.startswith("memory per device:"))
    for part in ("arguments", "outputs", "temporaries", "aliased", "peak"):
        assert re.search(part + r" [\d.]+ (B|KiB|MiB)", memory), memory
    flops = next(ln for ln in lines if ln.startswith("FLOPs per step:"))
    on_all = float(re.search(r"\(([\d.e+]+) on all\)", flops).group(1))
    method = float(re.search(r"([\d.e+]+) from the method", flops).group(1))
    assert 1 / FLOPS_FACTOR < on_all / method < FLOPS_FACTOR, flops
    assert any("spec ('fsdp', None)" in ln for ln in lines), lines  # FSDP-sharded kernels
    assert "batch sharded (('data', 'fsdp'),)" in out.stdout
    assert list(cwd.iterdir()) == [], "compile_only wrote files"


def test_bad_platform_and_flags_without_compile_only_are_one_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config", "configs/tiny.py:mdlm",
         "--compile_only", "--platform", "ipu"], cwd=REPO, env=_env(), capture_output=True,
        text=True, timeout=300)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr
    assert "--platform" in errors[0] and "cpu" in errors[0] and "tpu" in errors[0], errors
    out = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config", "configs/tiny.py:mdlm",
         "--workdir", str(tmp_path / "run"), "--mesh_devices", "2"], cwd=REPO, env=_env(),
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "go with --compile_only" in out.stderr
    assert not (tmp_path / "run").exists()


def test_lowers_for_tpu_without_tpu_devices():
    """An AbstractMesh lowering for a platform this machine lacks; its FLOPs (before
    optimisation) equal the CPU lowering's."""
    cfg = tiny.get_config("bd3lm,block=4")
    cfg.mesh.shape = (2, 1, 1)
    exp = registry.build(cfg, jax.devices()[:2])
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    tpu = lower_for_platform(program, exp, cfg.train.batch_size, "tpu")
    assert "mhlo.num_partitions = 2" in tpu.as_text()
    with jax.set_mesh(exp.mesh):
        cpu = program.step.lower(program.abstract_state,
                                 abstract_batch(exp, cfg.train.batch_size))
    assert tpu.cost_analysis()["flops"] == pytest.approx(cpu.cost_analysis()["flops"], rel=0.01)
    largest, total = largest_arrays(program.abstract_state, k=3)
    assert len(largest) == 3 and largest[0].per_device_bytes <= total


def _program(cfg, devices, platform):
    exp = registry.build(cfg, devices, platform=platform)
    return exp, TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))


def test_compile_only_for_tpu_lowers_splash_to_mosaic_kernels():
    """`--compile_only --platform tpu` with splash attention and no TPU: the TPU lowering holds
    the Mosaic kernels (forward, dq and dkv per layer, not the Pallas interpreter), the CPU
    compile runs the interpreter, and the report says what its figures leave out."""
    cfg = tiny.get_config("bd3lm,block=16")
    cfg.model.attention, cfg.data.seq_len, cfg.mesh.shape = "splash", 128, (2, 1, 1)
    with pytest.raises(ConfigError, match="needs a TPU"):  # a run on these devices: refused
        registry.build(cfg, jax.devices()[:2])
    exp, program = _program(cfg, jax.devices()[:2], "tpu")
    text = lower_for_platform(program, exp, cfg.train.batch_size, "tpu").as_text()
    depth = model_dims(cfg.model)["depth"]
    assert text.count("tpu_custom_call") == 3 * depth, "not the Mosaic kernels"
    report = compile_report(exp, program, target="tpu")
    assert report.compiled_for == "cpu" and report.memory["temporaries"] > 0
    assert any("Pallas interpreter" in n for n in report.notes)
    assert any("tpu-lowered FLOPs leave attention out" in n for n in report.notes)


def test_compile_only_for_gpu_without_a_gpu():
    """The GPU lowering needs no GPU (JAX lowers for "cuda"); cuDNN attention, which JAX lowers
    only where it finds cuDNN, becomes the xla flash attention there, and the report says so."""
    cfg = tiny.get_config("mdlm")
    cfg.model.attention, cfg.model.compute_dtype, cfg.mesh.shape = "cudnn", "bfloat16", (2, 1, 1)
    exp, program = _program(cfg, jax.devices()[:2], "gpu")
    text = lower_for_platform(program, exp, cfg.train.batch_size, "gpu").as_text()
    assert "cudnn" not in text and "mhlo.num_partitions = 2" in text
    report = compile_report(exp, program, target="gpu")
    assert report.flops_lowered > 0 and report.target == "gpu"
    assert report.notes == attention_notes("cudnn", "gpu", "cpu") and "flash" in report.notes[0]
    assert attention_notes("xla", "tpu", "cpu") == ()


def test_splash_needs_a_length_its_tiles_divide():
    cfg = tiny.get_config("mdlm")
    cfg.model.attention = "splash"
    with pytest.raises(ConfigError, match=r"data.seq_len to be a multiple of 128 \(got 32\)"):
        registry.build(cfg, jax.devices()[:1], platform="tpu")


def test_lowering_platform_is_the_meshs():
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    assert kernels.lowering_platform() == jax.default_backend()
    for platform in ("tpu", "gpu"):
        mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                            abstract_device=AbstractDevice(device_kind=platform, num_cores=None,
                                                           platform=platform))
        with jax.sharding.use_abstract_mesh(mesh):
            assert kernels.lowering_platform() == platform


def test_memory_figures_and_human_bytes():
    class Stats:
        argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 100, 100, 90
        temp_size_in_bytes, generated_code_size_in_bytes = 50, 7

    m = memory_figures(Stats())
    assert m["peak"] == 100 + 100 - 90 + 50 and m["code"] == 7
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.50 KiB"
    assert human_bytes(3 * 2 ** 30) == "3.00 GiB"


def test_cpu_xla_flags_add_timeouts_only_with_fake_devices_and_keep_the_users():
    assert cpu_xla_flags("") == ""
    flags = cpu_xla_flags("--xla_cpu_use_xnnpack=false", devices=4)
    assert f"{FAKE_DEVICES_FLAG}=4" in flags and "--xla_cpu_use_xnnpack=false" in flags
    for name, seconds in CPU_COLLECTIVE_TIMEOUTS:
        assert f"{name}={seconds}" in flags
    mine = cpu_xla_flags(f"{FAKE_DEVICES_FLAG}=8 {CPU_COLLECTIVE_TIMEOUTS[0][0]}=5", devices=2)
    assert f"{FAKE_DEVICES_FLAG}=2" in mine and f"{FAKE_DEVICES_FLAG}=8" not in mine
    assert f"{CPU_COLLECTIVE_TIMEOUTS[0][0]}=5" in mine.split()
    assert f"{CPU_COLLECTIVE_TIMEOUTS[0][0]}={CPU_COLLECTIVE_TIMEOUTS[0][1]}" not in mine


def test_this_jaxlib_knows_the_timeout_flags():
    """XLA aborts on an unknown flag in XLA_FLAGS: starting the CPU backend with them proves
    they exist in the installed jaxlib (this test process already uses them, via conftest)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                         env=_env(devices=2), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]


_LATE = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P

def host(i):  # device 0 reaches the all-reduce `delay` seconds after device 1
    if int(i) == 0:
        time.sleep(float(sys.argv[1]))
    return np.float32(1.0)

def f(x):
    y = jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.axis_index("d"))
    return jax.lax.psum(x * y, "d")

mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,))
print(float(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P()))(jnp.ones(2))[0]))
"""


def test_the_terminate_timeout_governs_the_collective_abort():
    """A thread that waits at a rendezvous for the stuck-warning timeout and then the terminate
    timeout (1 s + 1 s here; 20 s + 40 s by default) aborts the process with XLA's message; the
    same delay passes under the CLIs' limits."""
    short = " ".join(f"{name}=1" for name, _ in CPU_COLLECTIVE_TIMEOUTS)
    env = {**_env(), "XLA_FLAGS": f"{FAKE_DEVICES_FLAG}=2 {short}"}
    out = subprocess.run([sys.executable, "-c", _LATE, "5"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "Termination timeout for `all reduce" in out.stderr
    out = subprocess.run([sys.executable, "-c", _LATE, "5"], env=_env(devices=2),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "2.0", out.stderr[-2000:]


def _compiled_step(cfg, devices):
    exp = registry.build(cfg, devices)
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    with jax.set_mesh(exp.mesh):
        return program.step.lower(program.abstract_state,
                                  abstract_batch(exp, cfg.train.batch_size)).compile()


@pytest.mark.parametrize("family,arch,width", [("bd3lm,block=8", "dit", 128), ("ar", "gpt2", 64)])
def test_fsdp_splits_the_work_evenly(family, arch, width):
    """Parameters over "fsdp" and the batch over ("data", "fsdp"): each device computes its
    share of the step — compiled FLOPs per device as with plain data parallelism — with half the
    state and no more temporaries than the gathered weights add. Without the residual stream's
    layout constraint (`layers.constrain_batch`) GSPMD split activations along the fsdp-sharded
    width: 1.19× (DiT) and 1.20× (GPT-2) the temporaries here, 1.06× the FLOPs at width 256."""
    got = {}
    for shape in [(2, 1, 1), (1, 2, 1)]:
        cfg = tiny.get_config(family)
        cfg.model.arch, cfg.model.width, cfg.data.seq_len, cfg.mesh.shape = arch, width, 64, shape
        compiled = _compiled_step(cfg, jax.devices()[:2])
        got[shape] = (compiled.cost_analysis()["flops"],
                      compiled.memory_analysis().temp_size_in_bytes,
                      compiled.memory_analysis().argument_size_in_bytes)
    (dp_flops, dp_temp, dp_args), (fsdp_flops, fsdp_temp, fsdp_args) = got.values()
    assert fsdp_flops < 1.02 * dp_flops, got
    assert fsdp_temp < 1.1 * dp_temp and fsdp_args < 0.6 * dp_args, got
