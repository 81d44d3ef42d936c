"""Train a model: `python -m dlm_jax.train --config configs/quickstart.py --workdir runs/qs`.

Any config field can be overridden: `--config.optim.lr=3e-4 --config.train.steps=100`.
`--config configs/tiny.py:bd3lm,block=4` passes the text after ':' to `get_config`.
Restarting with the same --workdir resumes from the newest checkpoint. `--config_help` lists
every config field with its default. Bad input (an unknown key, a missing file, a bad value)
prints one `error: …` line and exits with code 2, writing nothing.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dlm_jax.cli import fail, parse_flags, quiet_background_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, SLURM clusters).")
# Handled by `cli.parse_flags` before parsing; defined so that it shows in --help.
flags.DEFINE_bool("config_help", False, "List every config field with its default.")


def main(argv) -> int:
    del argv
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
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
