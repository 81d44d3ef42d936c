"""Know before you run: compile the train step for a mesh and report its memory, FLOPs and layout.

`python -m dlm_jax.train --config … --compile_only [--mesh_devices N] [--platform cpu|gpu|tpu]`
uses this module. Nothing is allocated or written: the step is lowered from ShapeDtypeStructs
(the abstract train state and batch, with their shardings) and compiled ahead of time.

Where the target platform's devices are present, the figures are that compiler's. Where they are
not (a TPU/GPU target on a CPU machine), two things are done instead: the step is lowered for the
target platform over an `AbstractMesh` of the same shape (that it lowers, its unoptimised FLOPs and
the shardings are the target's), and it is compiled for the same mesh of fake CPU devices, whose
memory figures are XLA:CPU's buffer assignment — an estimate, not the accelerator's (its fusion,
layouts and bf16 handling differ). The attention backend is the target's (`registry.build`'s
`platform`): splash lowers to its Mosaic kernels for a TPU (and runs in the Pallas interpreter in
the CPU compile); cuDNN attention, which JAX lowers only where it finds cuDNN, becomes the flash
attention without a GPU (`attention_notes`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One array of the train state: `path` (e.g. "params/blocks/0/attn/qkv"), global `shape`,
    `dtype` name, `spec` (the PartitionSpec as text) and `per_device_bytes` (one shard)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    per_device_bytes: int


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `--compile_only` prints. Byte counts are per device; FLOPs per train step.

    memory: `arguments`, `outputs`, `temporaries`, `aliased` (donated state buffers reused for
    outputs), `code` (generated code) and `peak` = arguments + outputs − aliased + temporaries,
    from the compiled program's memory analysis (None where only lowered). `memory_compiler` names
    the compiler whose buffer assignment they are. `flops_per_device`: from the compiled
    (partitioned) program's cost analysis; `flops_lowered`: the whole step's FLOPs before
    optimisation and partitioning (the target lowering's, if any); `flops_method`: the method's
    `flops_per_token` × tokens per step. `notes`: what the figures leave out
    (`attention_notes`).
    """

    target: str
    compiled_for: str
    num_devices: int
    mesh: dict
    memory: dict | None
    flops_per_device: float | None
    flops_lowered: float | None
    flops_method: float
    largest: tuple[ArrayInfo, ...]
    batch_spec: str
    state_bytes_per_device: int
    seconds: float
    notes: tuple[str, ...] = ()


def abstract_batch(exp, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch: int32 (global_batch, seq_len) `tokens`, plus
    `segment_ids` and `positions` in pack mode, sharded like the trainer's batches."""
    shape = (global_batch, exp.cfg.data.seq_len)
    keys = ("tokens", "segment_ids", "positions") if exp.cfg.data.mode == "pack" else ("tokens",)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=exp.batch_sharding) for k in keys}


def memory_figures(stats) -> dict[str, int]:
    """Per-device bytes from a `CompiledMemoryStats` (see `CompileReport.memory`)."""
    out = {"arguments": int(stats.argument_size_in_bytes),
           "outputs": int(stats.output_size_in_bytes),
           "temporaries": int(stats.temp_size_in_bytes),
           "aliased": int(stats.alias_size_in_bytes),
           "code": int(stats.generated_code_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _flops(analysis) -> float | None:
    if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in keys)


def largest_arrays(abstract_state, k: int = 6) -> tuple[tuple[ArrayInfo, ...], int]:
    """The `k` largest arrays of a state of ShapeDtypeStructs with shardings (by global bytes),
    and the state's total bytes per device."""
    infos, total = [], 0
    for keys, x in jax.tree_util.tree_leaves_with_path(abstract_state):
        itemsize = np.dtype(x.dtype).itemsize
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        per_device = math.prod(shard) * itemsize
        total += per_device
        infos.append((math.prod(x.shape) * itemsize,
                      ArrayInfo(_path(keys), tuple(x.shape), np.dtype(x.dtype).name,
                                str(tuple(x.sharding.spec)) if x.sharding is not None else "()",
                                per_device)))
    infos.sort(key=lambda t: -t[0])
    return tuple(info for _, info in infos[:k]), total


def compile_train_step(program, exp, global_batch: int):
    """(lowered, compiled) train step of a `TrainProgram` for its mesh, from abstract inputs."""
    batch = abstract_batch(exp, global_batch)
    with jax.set_mesh(exp.mesh):
        lowered = program.step.lower(program.abstract_state, batch)
        return lowered, lowered.compile()


def lower_for_platform(program, exp, global_batch: int, platform: str):
    """The train step lowered (not compiled) for `platform` over an `AbstractMesh` shaped like
    `exp.mesh`: possible without any device of that platform."""
    from dlm_jax.steps import make_train_step
    mesh = exp.mesh
    abstract = AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names),
                            axis_types=(AxisType.Auto,) * len(mesh.axis_names),
                            abstract_device=AbstractDevice(device_kind=platform, num_cores=None,
                                                           platform=platform))

    def retarget(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=NamedSharding(abstract, x.sharding.spec))

    state = jax.tree.map(retarget, program.abstract_state)
    batch = jax.tree.map(retarget, abstract_batch(exp, global_batch))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    cfg = exp.cfg
    step = jax.jit(make_train_step(exp.method, exp.graphdef, program.tx, cfg.optim,
                                   total_steps=cfg.train.steps, seed=cfg.train.seed),
                   in_shardings=(state_sh, NamedSharding(abstract, exp.batch_sharding.spec)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    with jax.sharding.use_abstract_mesh(abstract):
        # JAX names the lowering platforms of GPUs by their runtime (no GPU plugin is needed)
        return step.trace(state, batch).lower(
            lowering_platforms=("cuda",) if platform == "gpu" else (platform,))


def attention_notes(backend: str, target: str, compiled_for: str) -> tuple[str, ...]:
    """What the report's figures say about an accelerator attention backend (`model.attention`)
    for a `target` platform, compiled on `compiled_for` devices."""
    if backend == "splash":
        which = "compiled and lowered" if compiled_for == "tpu" else f"{target}-lowered"
        notes = [f"attention: splash's Mosaic kernels are custom calls whose FLOPs XLA does not "
                 f"count: the {which} FLOPs leave attention out (the method's count has it)"]
        if compiled_for != "tpu":
            notes.append(f"attention: the {compiled_for} compile ran splash in the Pallas "
                         f"interpreter (its memory figures are the interpreter's); the {target} "
                         f"lowering holds the Mosaic kernels")
        return tuple(notes)
    if backend == "cudnn" and compiled_for != "gpu":
        return ("attention: JAX lowers cuDNN attention only where it finds cuDNN, absent here: "
                f"the {target} lowering and the {compiled_for} compile use the xla flash "
                "attention in its place",)
    if backend == "cudnn":
        return ("attention: where cuDNN's fused attention runs (`kernels.cudnn_plan`) it is a "
                "custom call whose FLOPs XLA does not count (the method's count has them)",)
    return ()


def compile_report(exp, program, *, target: str | None = None) -> CompileReport:
    """Compile `program`'s train step on `exp.mesh`'s devices and report (see `CompileReport`).

    target: the platform the figures are for (default: the mesh's). When it differs from the
    mesh's devices' platform (a TPU/GPU target compiled on fake CPU devices), the step is also
    lowered for `target` (`lower_for_platform`) and its FLOPs are the target lowering's.
    """
    t0 = time.perf_counter()
    cfg = exp.cfg
    platform = exp.mesh.devices.flat[0].platform
    target = target or platform
    lowered, compiled = compile_train_step(program, exp, cfg.train.batch_size)
    flops_lowered = _flops(lowered.cost_analysis())
    if target != platform:
        flops_lowered = _flops(lower_for_platform(program, exp, cfg.train.batch_size,
                                                  target).cost_analysis())
    try:
        memory = memory_figures(compiled.memory_analysis())
    except (NotImplementedError, AttributeError):
        memory = None
    largest, state_bytes = largest_arrays(program.abstract_state)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return CompileReport(
        target=target, compiled_for=platform, num_devices=exp.mesh.size,
        mesh=dict(zip(exp.mesh.axis_names, (int(s) for s in exp.mesh.axis_sizes))),
        memory=memory, flops_per_device=_flops(compiled.cost_analysis()),
        flops_lowered=flops_lowered, flops_method=exp.flops_per_token() * tokens,
        largest=largest, batch_spec=str(tuple(exp.batch_sharding.spec)),
        state_bytes_per_device=state_bytes, seconds=time.perf_counter() - t0,
        notes=attention_notes(cfg.model.attention, target, platform))


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(r: CompileReport) -> list[str]:
    """The lines `--compile_only` prints."""
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"compiled train step for {r.num_devices} {r.compiled_for} device(s), mesh {mesh}, "
             f"in {r.seconds:.1f}s"]
    if r.target != r.compiled_for:
        lines.append(f"note: no {r.target} devices here: lowered for {r.target} (FLOPs, "
                     f"shardings) and compiled for {r.num_devices} fake {r.compiled_for} "
                     f"devices; the memory figures are XLA:{r.compiled_for.upper()}'s buffer "
                     f"assignment, an estimate of what {r.target} needs")
    lines += [f"note: {n}" for n in r.notes]
    if r.memory is not None:
        m = r.memory
        lines.append(f"memory per device: arguments {human_bytes(m['arguments'])} | outputs "
                     f"{human_bytes(m['outputs'])} | temporaries {human_bytes(m['temporaries'])}"
                     f" | aliased {human_bytes(m['aliased'])} | peak {human_bytes(m['peak'])} "
                     f"(XLA:{r.compiled_for.upper()})")
    else:
        lines.append("memory per device: not reported by this compiler")
    flops = []
    if r.flops_per_device is not None:
        flops.append(f"{r.flops_per_device:.3e} per device compiled "
                     f"({r.flops_per_device * r.num_devices:.3e} on all)")
    if r.flops_lowered is not None:
        flops.append(f"{r.flops_lowered:.3e} lowered for {r.target}")
    flops.append(f"{r.flops_method:.3e} from the method's flops_per_token")
    lines.append("FLOPs per step: " + " | ".join(flops))
    lines.append(f"train state {human_bytes(r.state_bytes_per_device)} per device; batch "
                 f"sharded {r.batch_spec}; largest arrays:")
    for a in r.largest:
        lines.append(f"  {a.path} {a.dtype}{list(a.shape)} spec {a.spec} "
                     f"{human_bytes(a.per_device_bytes)}/device")
    return lines


def report_dict(r: CompileReport) -> dict[str, Any]:
    """The report as plain data (e.g. for a JSON line)."""
    return dataclasses.asdict(r)
