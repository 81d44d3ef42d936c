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

    from dlm_jax.evals import build_evaluators, restore_run, run_evaluators

    exp, program, step, state = restore_run(workdir)
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
