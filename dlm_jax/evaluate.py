"""Evaluate a trained run: `python -m dlm_jax.evaluate --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them) with the run's own
config.json and prints the validation loss: NELBO (diffusion) or NLL (AR) in nats/token, its
perplexity, and bits per byte for byte-level runs. `--batches` sets how many validation batches.
"""
import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Validation batches (0: the run's eval_batches).")
flags.mark_flag_as_required("workdir")


def evaluate_run(workdir: str, batches: int = 0) -> dict:
    """Validation metrics of the newest checkpoint in `workdir` (see module docstring)."""
    from dlm_jax.config import Config
    from dlm_jax.trainer import Trainer

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a dlm_jax training run?")
    with open(path) as f:
        cfg = Config.from_dict(json.load(f))
    if batches:
        cfg.train.eval_batches = batches
    cfg.diffusion.var_min = False  # the clip search changes training, not the likelihood
    trainer = Trainer(cfg, workdir, measure_mfu=False)
    try:
        step, state = trainer.ckpt.restore_state_only(trainer.abstract_state)
        return {"step": step, **trainer.evaluate(state)}
    finally:
        trainer.close()


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        metrics = evaluate_run(_WORKDIR.value, _BATCHES.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
