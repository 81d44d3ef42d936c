"""Sample from a trained run: `python -m dlm_jax.sample --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them), generates
`--num_samples` samples with the family's sampler (`dlm_jax.generation`; BD3-LM and AR through
their KV cache), prints them decoded, and writes one JSONL row per sample — text, tokens, the
settings, NFE, seconds and tokens/s — to `--out` (default `<workdir>/samples_step<N>.jsonl`).

Settings are the run's `sampling` config section, overridden by the flags below or by any
`--config.sampling.KEY=VALUE`. Defaults per family: AR token by token from a document boundary;
MDLM/BD3-LM ancestral with as many steps as the block has tokens.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text every sample starts with.")
_NUM = flags.DEFINE_integer("num_samples", None, "Samples to draw (sampling.num_samples).")
_LENGTH = flags.DEFINE_integer("length", None, "Tokens per sample (sampling.length).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler name (sampling.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps per block (sampling.steps).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (sampling.seed).")
_OUT = flags.DEFINE_string("out", None, "JSONL output path.")
flags.mark_flag_as_required("workdir")

_FLAG_FIELDS = {"num_samples": _NUM, "length": _LENGTH, "sampler": _SAMPLER, "steps": _STEPS,
                "seed": _SEED}
_PREFIX = "--config.sampling."
_overrides: dict[str, str] = {}


def _parse(argv: list[str]) -> list[str]:
    """absl flags, with `--config.sampling.KEY=VALUE` taken out first (checked in main)."""
    rest = []
    for arg in argv:
        if arg.startswith(_PREFIX):
            key, eq, value = arg[len(_PREFIX):].partition("=")
            if not eq:
                print(f"error: {arg}: expected {_PREFIX}KEY=VALUE", file=sys.stderr)
                raise SystemExit(2)
            _overrides[key] = value
        else:
            rest.append(arg)
    return flags.FLAGS(rest)


def _apply_overrides(cfg) -> None:
    from dlm_jax.config import ConfigError, SamplingConfig
    fields = {f.name: f for f in dataclasses.fields(SamplingConfig)}
    for key, raw in _overrides.items():
        if key not in fields:
            import difflib
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"config.sampling.{key} is not a known key"
                              + (f"; did you mean config.sampling.{close[0]}?" if close else ""))
        kind = type(getattr(SamplingConfig(), key))
        try:
            value = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"config.sampling.{key}={raw!r} is not a {kind.__name__}") from None
        setattr(cfg.sampling, key, value)
    for key, flag in _FLAG_FIELDS.items():
        if flag.value is not None:
            setattr(cfg.sampling, key, flag.value)


def sample_run(workdir: str, prompt: str | None = None, out: str | None = None,
               overrides=_apply_overrides, say=print) -> dict:
    """Generate from the newest checkpoint of `workdir`; returns a summary and writes the JSONL."""
    import jax
    import numpy as np

    from dlm_jax.evals import restore_run
    from dlm_jax.generation import encode_prompt, make_generator, sample_keys

    exp, _, step, state = restore_run(workdir, overrides)
    sm = exp.cfg.sampling
    gen = make_generator(exp, sm)
    params = state.ema_params if state.ema_params is not None else state.params
    batch = min(sm.batch_size, sm.num_samples)
    prompt_ids = encode_prompt(exp, prompt, batch, gen.sampler)
    p_len = 0 if prompt_ids is None else prompt_ids.shape[1]
    if p_len > gen.length:
        from dlm_jax.config import ConfigError
        raise ConfigError(f"the prompt has {p_len} tokens, more than the sample length "
                          f"{gen.length} (sampling.length)")
    t0 = time.perf_counter()
    compiled = gen.run.lower(params, sample_keys(sm.seed, 0, batch), prompt_ids).compile()
    compile_s = time.perf_counter() - t0
    rows, seconds, new_tokens, nfe = [], 0.0, 0, 0
    for start in range(0, sm.num_samples, batch):
        t0 = time.perf_counter()
        res = jax.device_get(compiled(params, sample_keys(sm.seed, start, batch), prompt_ids))
        dt = time.perf_counter() - t0
        seconds += dt
        count = min(batch, sm.num_samples - start)
        nfe = int(res["nfe"])
        for i in range(count):
            n = int(res["lengths"][i])
            ids = np.asarray(res["tokens"][i, :n])
            new_tokens += n - p_len
            rows.append({"sample": start + i, "step": step, "text": (
                exp.tokenizer.decode(ids) if exp.tokenizer is not None else None),
                "tokens": ids.tolist(), "length": n})
        say(f"batch {start // batch + 1}/{-(-sm.num_samples // batch)}: {count} samples in "
            f"{dt:.2f}s")
    summary = {"workdir": os.path.abspath(workdir), "step": step, "method": exp.method.name,
               "sampler": gen.sampler, "steps": gen.steps, "block": gen.block_len,
               "length": gen.length, "prompt_tokens": p_len, "num_samples": len(rows),
               "nfe_per_batch": nfe, "seconds": seconds, "compile_seconds": compile_s,
               "tokens_per_s": new_tokens / max(seconds, 1e-9),
               "settings": dataclasses.asdict(sm)}
    out = out or os.path.join(workdir, f"samples_step{step}.jsonl")
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, **{k: summary[k] for k in (
                "method", "sampler", "steps", "block", "nfe_per_batch", "tokens_per_s")},
                "settings": summary["settings"]}) + "\n")
    summary["out"] = out
    summary["samples"] = rows
    return summary


def main(argv) -> int:
    del argv
    from dlm_jax.config import ConfigError
    logging.set_verbosity(logging.WARNING)
    try:
        summary = sample_run(_WORKDIR.value, _PROMPT.value, _OUT.value)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in summary["samples"]:
        print(f"--- sample {row['sample']} ({row['length']} tokens) ---")
        print(row["text"] if row["text"] is not None else " ".join(map(str, row["tokens"])))
    print(f"{summary['method']} | sampler {summary['sampler']} | steps {summary['steps']} | "
          f"{summary['num_samples']} samples x {summary['length']} tokens | NFE "
          f"{summary['nfe_per_batch']} per batch | {summary['seconds']:.2f}s "
          f"(+{summary['compile_seconds']:.1f}s compile) | {summary['tokens_per_s']:,.0f} tok/s | "
          f"{summary['out']}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse)
