"""Evaluate a trained run: `python -m dlm_jax.evaluate --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them) with the run's own
config.json and prints the validation loss: NELBO (diffusion) or NLL (AR) in nats/token with
its standard error and the number of sequences and time draws behind it (`evals.validation`),
its perplexity, bits per byte for byte-level runs, the Markov source's exact entropy per token
when that is the data, and for BD3-LM the clipping interval the run trains with (the clip
search's choice, from the checkpoint).

How much: by default enough validation sequences for a standard error of `--target_se`
(0.003 nats/token): a pilot of the run's `train.eval_batches` batches, then the number of
batches its spread calls for, at most `--max_sequences` (16384) and at most one pass over the
validation split (no sequence counts twice). `--batches N` instead evaluates exactly N batches
as the trainer does (cycling the split), reproducing its periodic numbers. `--t_samples` time
draws per sequence and the `--times` scheme (iid | stratified | quadrature; default: the run's
`train.eval_t_samples` / `train.eval_times`) reduce the variance of diffusion bounds without
bias. The JSON's "protocol" records split, sequences, batch size, times, seeds and dtype.
With `--samples N --evaluator AR_RUN`, also the generative perplexity of N samples under that AR
run, their unigram entropy, NFE and tokens/s (`evals.generative`). Prints one JSON object;
nothing is written to the workdir.
"""
import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Exactly this many validation batches (0: sized "
                                "to --target_se).")
_TARGET_SE = flags.DEFINE_float("target_se", 0.003, "Standard error (nats/token) the default "
                                "evaluation size aims at.")
_MAX_SEQUENCES = flags.DEFINE_integer("max_sequences", 16384, "Cap on the sequences of a "
                                      "target-sized evaluation.")
_T_SAMPLES = flags.DEFINE_integer("t_samples", 0, "Time draws per sequence (0: the run's "
                                  "train.eval_t_samples).")
_TIMES = flags.DEFINE_string("times", None, "Time scheme: iid | stratified | quadrature "
                             "(default: the run's train.eval_times).")
_SAMPLES = flags.DEFINE_integer("samples", 0, "Also draw this many samples (the run's sampling "
                                "settings) and report their generative perplexity.")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "An AR run of dlm_jax that judges the samples "
                                 "(needed with --samples).")
flags.mark_flag_as_required("workdir")


def evaluate_run(workdir: str, batches: int = 0, samples: int = 0,
                 evaluator: str | None = None, *, t_samples: int = 0, times: str | None = None,
                 target_se: float = 0.003, max_sequences: int = 16384) -> dict:
    """Validation metrics of the newest checkpoint in `workdir` (see module docstring), and with
    `samples` the generative metrics of that many samples under the AR run `evaluator`.
    `batches` > 0: exactly that many batches; otherwise sized to `target_se`, at most
    `max_sequences`. `t_samples`/`times` override the run's train.eval_t_samples / eval_times.
    Bad values are a ConfigError naming the argument or the config key."""
    import jax

    from dlm_jax.config import ConfigError
    from dlm_jax.evals import build_evaluators, restore_run, run_evaluators

    if batches < 0:
        raise ConfigError(f"--batches={batches} must be >= 0")
    if not batches and not target_se > 0:
        raise ConfigError(f"--target_se={target_se} must be > 0")
    if t_samples < 0:
        raise ConfigError(f"--t_samples={t_samples} must be >= 0 (0: the run's)")

    def overrides(cfg):
        if t_samples:
            cfg.train.eval_t_samples = t_samples
        if times is not None:
            cfg.train.eval_times = times

    exp, program, step, state = restore_run(workdir, overrides)
    cfg = exp.cfg
    batch = cfg.train.batch_size
    if batches:
        evaluators = build_evaluators(exp, program, batches=batches, clip_search=False)
    else:
        if max_sequences < batch:
            raise ConfigError(f"--max_sequences={max_sequences} must be at least one batch "
                              f"({batch} sequences)")
        evaluators = build_evaluators(exp, program, clip_search=False, target_se=target_se,
                                      max_batches=max_sequences // batch)
    # The clip search changes training, not the likelihood: validation only.
    metrics = run_evaluators(evaluators, exp, state, repeat=bool(batches))[0]
    validation = evaluators[0]
    out = {"step": step, **metrics}
    out["protocol"] = {
        "split": "validation", "sequences": metrics["val/sequences"], "batch_size": batch,
        "seq_len": cfg.data.seq_len, "batches": batches or "sized to target_se",
        "target_se": None if batches else target_se,
        "max_sequences": None if batches else max_sequences,
        "split_exhausted": validation.exhausted, "order": "the split in order, unshuffled",
        "t_samples": metrics["val/t_samples"],
        "times": cfg.train.eval_times if exp.method.time_schemes else "none",
        "sampling_eps": cfg.diffusion.sampling_eps if exp.method.time_schemes else None,
        "seed": cfg.train.seed, "keys": "fold_in(key(train.seed + 1), batch index)",
        "params": "EMA" if state.ema_params is not None else "raw",
        "compute_dtype": cfg.model.compute_dtype, "loss_dtype": "float32",
        "standard_error": "ratio estimator over sequences (evals.validation)"}
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
                               _EVALUATOR.value, t_samples=_T_SAMPLES.value, times=_TIMES.value,
                               target_se=_TARGET_SE.value, max_sequences=_MAX_SEQUENCES.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
