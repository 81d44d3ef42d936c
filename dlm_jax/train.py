"""Train a model: `python -m dlm_jax.train --config configs/quickstart.py --workdir runs/qs`.

Any config field can be overridden: `--config.optim.lr=3e-4 --config.train.steps=100`.
`--config configs/tiny.py:bd3lm,block=4` passes the text after ':' to `get_config`.
Restarting with the same --workdir resumes from the newest checkpoint. `--config_help` lists
every config field with its default. Bad input (an unknown key, a missing file, a bad value)
prints one `error: …` line and exits with code 2, writing nothing.

`--compile_only` (no --workdir needed) compiles the train step for the configured mesh and
prints per-device memory, FLOPs per step and the sharding of the largest arrays, then exits
writing nothing; `--mesh_devices N` compiles for N devices (fake CPU devices where there are
fewer), `--platform cpu|gpu|tpu` for that platform (without its devices: lowered for it and
compiled for fake CPU devices, see `dlm_jax.compile_check`).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dlm_jax.cli import fail, parse_flags, quiet_background_errors, set_cpu_xla_flags
from dlm_jax.hostmem import retain_freed_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, SLURM clusters).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step for the mesh, print its per-device memory, "
    "FLOPs and shardings, and exit writing nothing (no --workdir needed).")
_MESH_DEVICES = flags.DEFINE_integer(
    "mesh_devices", 0, "With --compile_only: compile for this many devices (fake CPU devices "
    "where there are fewer); 0: the devices present.", lower_bound=0)
_PLATFORM = flags.DEFINE_enum(
    "platform", None, ["cpu", "gpu", "tpu"], "With --compile_only: the platform to compile "
    "for (default: jax's default backend).")
# Handled by `cli.parse_flags` before parsing; defined so that it shows in --help.
flags.DEFINE_bool("config_help", False, "List every config field with its default.")


def main(argv) -> int:
    del argv
    if _COMPILE_ONLY.value:
        return _compile_only()
    if _MESH_DEVICES.value or _PLATFORM.value:
        fail("--mesh_devices and --platform go with --compile_only")
    set_cpu_xla_flags()  # generous collective timeouts for fake CPU devices, before jax starts
    import jax
    from dlm_jax.checkpoint import CheckpointError
    from dlm_jax.config import ConfigError
    from dlm_jax.trainer import NonFiniteLossError, Trainer, say

    if _MULTIHOST.value:
        env = os.environ
        if "JAX_COORDINATOR_ADDRESS" in env and "JAX_PROCESS_ID" in env:  # launch/local_multiprocess.sh
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                       int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
        else:  # TPU pods and SLURM: discovered from the environment
            jax.distributed.initialize()
    logging.set_verbosity(logging.WARNING)
    quiet_background_errors()
    cfg = _CONFIG.value
    if cfg is None or _WORKDIR.value is None:
        fail("--config and --workdir are required (--config_help lists the config fields)")
    try:
        trainer = Trainer(cfg, _WORKDIR.value)
        data_iter = trainer.train_iterator()  # bad data settings fail here, before any output
    except (ConfigError, FileNotFoundError, KeyError, ValueError, OSError) as e:
        fail(_message(e))
    exp = trainer.exp
    say(f"dlm_jax: {cfg.name} | method {exp.method.name} | objective "
         f"{cfg.diffusion.objective} | process {cfg.diffusion.process} | "
         f"{exp.num_params / 1e6:.2f}M params | {jax.device_count()} device(s) | "
         f"workdir {trainer.workdir}")
    try:
        summary = trainer.run(data_iter)
    except ConfigError as e:  # the resume check; anything else is a bug and keeps its trace
        fail(_message(e))
    except (NonFiniteLossError, CheckpointError) as e:
        fail(_message(e), code=3)
    finally:
        try:
            trainer.close()
        except CheckpointError as e:
            fail(_message(e), code=3)
    say(f"done: step {summary['final_step']} | checkpoint {summary['checkpoint']} | "
         f"metrics {summary['metrics']}")
    if cfg.train.final_samples:
        _print_samples(trainer, cfg)
    return 0


def _compile_only() -> int:
    """--compile_only: build the experiment and its program, compile the step, print the report.
    Writes nothing: no workdir, no checkpoint, and the persistent compilation cache is off."""
    if _MULTIHOST.value:
        fail("--compile_only runs on one host (use --mesh_devices for the pod's device count)")
    wanted, platform = _MESH_DEVICES.value, _PLATFORM.value
    set_cpu_xla_flags(devices=wanted or None)  # before jax starts its CPU backend
    import jax
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    logging.set_verbosity(logging.ERROR)
    from dlm_jax import registry
    from dlm_jax.compile_check import compile_report, format_report
    from dlm_jax.config import ConfigError
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram
    from dlm_jax.trainer import say
    cfg = _CONFIG.value
    if cfg is None:
        fail("--config is required (--config_help lists the config fields)")
    target = platform or jax.default_backend()
    try:
        present = jax.devices(target)
    except RuntimeError:
        present = []
    count = wanted or len(present)
    if len(present) >= count > 0:
        devices = present[:count]
    elif target == "cpu":
        fail(f"--mesh_devices {count}: only {len(present)} CPU device(s) were created")
    elif not wanted:
        fail(f"no {target} devices here: give --mesh_devices N to lower for {target} and compile "
             f"for N fake CPU devices")
    else:  # an accelerator target without (enough of) its devices: fake CPU devices
        devices = jax.devices("cpu")[:count]
        if len(devices) < count:
            fail(f"--mesh_devices {count}: only {len(devices)} CPU device(s) were created")
    try:
        exp = registry.build(cfg, devices, platform=target)
        program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    except (ConfigError, FileNotFoundError, KeyError, ValueError, OSError) as e:
        fail(_message(e))
    say(f"dlm_jax compile_only: {cfg.name} | method {exp.method.name} | "
        f"{exp.num_params / 1e6:.2f}M params | batch {cfg.train.batch_size} x L "
        f"{cfg.data.seq_len} | remat {cfg.model.remat} | {cfg.model.compute_dtype} | "
        f"target {target}")
    for line in format_report(compile_report(exp, program, target=target)):
        say(line)
    return 0


def _print_samples(trainer, cfg) -> None:
    """`train.final_samples` samples from the final (EMA) parameters, with the run's sampling
    settings (`python -m dlm_jax.sample` draws more)."""
    import dataclasses

    from dlm_jax.generation import generate_samples
    from dlm_jax.trainer import say
    params = trainer.state.eval_params
    sampling = dataclasses.replace(cfg.sampling, num_samples=cfg.train.final_samples)
    rows, summary = generate_samples(trainer.exp, params, sampling)
    for row in rows:
        say(f"sample {row['sample']}: {row['text']!r}" if row["text"] is not None
            else f"sample {row['sample']}: {row['tokens']}")
    say(f"  ({summary['sampler']}, {summary['steps']} steps per block of {summary['block']}, "
        f"{summary['tokens_per_s']:,.0f} tok/s; more: python -m dlm_jax.sample --workdir "
        f"{trainer.workdir})")


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return str(text)


if __name__ == "__main__":
    if not any(a.startswith("--compile_only") for a in sys.argv[1:]):  # it only compiles
        retain_freed_memory()  # before jax starts (config files import it): dlm_jax.hostmem
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
