"""Sample from a trained run: `python -m dlm_jax.sample --workdir runs/quickstart`.

Restores the newest checkpoint (EMA parameters when the run kept them), generates
`--num_samples` samples with the family's sampler (`dlm_jax.generation`; BD3-LM and AR through
their KV cache), prints them decoded, and writes one JSONL row per sample — text, tokens, the
settings, NFE, seconds and tokens/s — to `--out` (default `<workdir>/samples_step<N>.jsonl`).

Settings are the run's `sampling` config section, overridden by the flags below or by any
`--config.sampling.KEY=VALUE`. Defaults per family: AR token by token from a document boundary;
MDLM / BD3-LM ancestral and SEDD Tweedie τ-leaping with as many steps as the block has tokens;
CTMC τ-leaping; D3PM ancestral over its T steps.
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text every sample starts with.")
_NUM = flags.DEFINE_integer("num_samples", None, "Samples to draw (sampling.num_samples).")
_LENGTH = flags.DEFINE_integer("length", None, "Tokens per sample (sampling.length).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler name (sampling.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps per block (sampling.steps).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (sampling.seed).")
_DRAFTER = flags.DEFINE_string("drafter", None, "AR speculative / mh samplers: the masked-"
                               "diffusion run that drafts (sampling.drafter).")
_OUT = flags.DEFINE_string("out", None, "JSONL output path.")
flags.mark_flag_as_required("workdir")

_FLAG_FIELDS = {"num_samples": _NUM, "length": _LENGTH, "sampler": _SAMPLER, "steps": _STEPS,
                "seed": _SEED, "drafter": _DRAFTER}
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


def main(argv) -> int:
    del argv
    from dlm_jax.cli import set_cpu_xla_flags
    set_cpu_xla_flags()  # generous collective timeouts for fake CPU devices, before jax starts
    from dlm_jax.config import ConfigError
    from dlm_jax.generation import sample_run
    logging.set_verbosity(logging.WARNING)
    try:
        summary = sample_run(_WORKDIR.value, prompt=_PROMPT.value, out=_OUT.value,
                             overrides=_apply_overrides, say=print)
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
