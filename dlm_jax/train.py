"""Train a model: `python -m dlm_jax.train --config configs/quickstart.py --workdir runs/qs`.

Any config field can be overridden: `--config.optim.lr=3e-4 --config.train.steps=100`.
`--config configs/tiny.py:bd3lm,block=4` passes the text after ':' to `get_config`.
Restarting with the same --workdir resumes from the newest checkpoint.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, SLURM clusters).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    del argv
    import jax
    from dlm_jax.config import ConfigError
    from dlm_jax.trainer import NonFiniteLossError, Trainer

    if _MULTIHOST.value:
        env = os.environ
        if "JAX_COORDINATOR_ADDRESS" in env and "JAX_PROCESS_ID" in env:  # launch/local_multiprocess.sh
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                       int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
        else:  # TPU pods and SLURM: discovered from the environment
            jax.distributed.initialize()
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    try:
        trainer = Trainer(cfg, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        exp = trainer.exp
        print(f"dlm_jax: {cfg.name} | method {exp.method.name} | objective "
              f"{cfg.diffusion.objective} | process {cfg.diffusion.process} | "
              f"{exp.num_params / 1e6:.2f}M params | {jax.device_count()} device(s) | "
              f"workdir {trainer.workdir}", flush=True)
    try:
        summary = trainer.run()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if jax.process_index() == 0:
        print(f"done: step {summary['final_step']} | checkpoint {summary['checkpoint']} | "
              f"metrics {summary['metrics']}", flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
