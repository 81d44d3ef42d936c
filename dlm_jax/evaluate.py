"""Evaluate a trained run: `python -m dlm_jax.evaluate --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them) with the run's own
config.json and prints the validation loss: NELBO (diffusion) or NLL (AR) in nats/token, its
perplexity, bits per byte for byte-level runs, and for BD3-LM the clipping interval the run
trains with (the clip search's choice, from the checkpoint). `--batches` sets how many
validation batches. With `--samples N --evaluator AR_RUN`, also the generative perplexity of N
samples under that AR run, their unigram entropy, NFE and tokens/s (`evals.generative`).
Prints one JSON object; nothing is written to the workdir.
"""
import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Validation batches (0: the run's eval_batches).")
_SAMPLES = flags.DEFINE_integer("samples", 0, "Also draw this many samples (the run's sampling "
                                "settings) and report their generative perplexity.")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "An AR run of dlm_jax that judges the samples "
                                 "(needed with --samples).")
flags.mark_flag_as_required("workdir")


def evaluate_run(workdir: str, batches: int = 0, samples: int = 0,
                 evaluator: str | None = None) -> dict:
    """Validation metrics of the newest checkpoint in `workdir` (see module docstring), and with
    `samples` the generative metrics of that many samples under the AR run `evaluator`."""
    import jax

    from dlm_jax.evals import build_evaluators, restore_run, run_evaluators

    exp, program, step, state = restore_run(workdir)
    # The clip search changes training, not the likelihood: validation only.
    evaluators = build_evaluators(exp, program, batches=batches or None, clip_search=False)
    out = {"step": step, **run_evaluators(evaluators, exp, state)[0]}
    if exp.method.clip_search:
        lo, hi = (float(c) for c in jax.device_get(state.clip))
        out.update({"clip/beta_l": lo, "clip/beta_u": hi})
    if samples:
        out.update(_generative(exp, state, samples, evaluator))
    return out


def _generative(exp, state, samples: int, evaluator: str) -> dict:
    """Generative perplexity under the AR run `evaluator`, unigram entropy, NFE and tokens/s of
    `samples` samples from `state` (the run's sampling settings). Writes nothing."""
    import dataclasses

    from dlm_jax.evals import restore_run
    from dlm_jax.evals.generative import generative_perplexity
    from dlm_jax.generation import generate_samples

    sampling = dataclasses.replace(exp.cfg.sampling, num_samples=samples)
    rows, summary = generate_samples(exp, state.eval_params, sampling)
    judge, _, judge_step, judge_state = restore_run(evaluator)
    same = ((judge.cfg.data.tokenizer, judge.cfg.data.tokenizer_path)
            == (exp.cfg.data.tokenizer, exp.cfg.data.tokenizer_path))
    gen = generative_perplexity(judge, judge_state.eval_params, rows, same_tokenizer=same)
    return {**{f"gen/{k}": v for k, v in gen.items()}, "gen/samples": len(rows),
            "gen/sampler": summary["sampler"], "gen/steps": summary["steps"],
            "gen/nfe_per_batch": summary["nfe_per_batch"],
            "gen/tokens_per_s": summary["tokens_per_s"], "gen/judge_step": judge_step}


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    if _SAMPLES.value and not _EVALUATOR.value:
        print("error: --samples needs --evaluator DIR (an AR run that judges the samples)",
              file=sys.stderr)
        return 2
    try:
        metrics = evaluate_run(_WORKDIR.value, _BATCHES.value, _SAMPLES.value,
                               _EVALUATOR.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
