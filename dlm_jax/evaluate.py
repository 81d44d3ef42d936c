"""Evaluate a trained run: `python -m dlm_jax.evaluate --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them) with the run's own
config.json and prints the validation loss: NELBO (diffusion) or NLL (AR) in nats/token, its
perplexity, bits per byte for byte-level runs, and for BD3-LM the clipping interval the run
trains with (the clip search's choice, from the checkpoint). `--batches` sets how many
validation batches. Nothing is written to the workdir.
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
    import jax

    from dlm_jax import registry
    from dlm_jax.checkpoint import Checkpointer
    from dlm_jax.config import Config
    from dlm_jax.evals import build_evaluators, run_evaluators
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a dlm_jax training run?")
    with open(path) as f:
        cfg = Config.from_dict(json.load(f))
    exp = registry.build(cfg)
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} not found: the run has no checkpoint yet")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep, async_save=False, create=False)
    try:
        step, state = ckpt.restore_state_only(program.abstract_state)
    finally:
        ckpt.close()
    # The clip search changes training, not the likelihood: validation only.
    evaluators = build_evaluators(exp, program, batches=batches or None, clip_search=False)
    out = {"step": step, **run_evaluators(evaluators, exp, state)[0]}
    if exp.method.clip_search:
        lo, hi = (float(c) for c in jax.device_get(state.clip))
        out.update({"clip/beta_l": lo, "clip/beta_u": hi})
    return out


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
