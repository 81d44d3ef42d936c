"""The one place where config strings become processes, schedules, models and data.

Everything the trainer, the evaluator and the samplers build from a `Config` goes through here,
so a new combination of process × objective × block size is a config change.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from dlm_jax.config import Config, ConfigError
from dlm_jax.models.transformer import MODEL_SIZES, DiT
from dlm_jax.processes import schedules, transitions


def build_schedule(cfg: Config, *, clipped: bool = True) -> schedules.Schedule:
    """The noise schedule; wrapped in `Clipped` when `diffusion.clip` is not (sampling_eps, 1)."""
    df = cfg.diffusion
    if df.schedule == "loglinear":
        base = schedules.LogLinear(df.schedule_eps)
    elif df.schedule == "cosine":
        base = schedules.Cosine(df.schedule_eps)
    else:
        base = schedules.make_schedule(df.schedule, sigma_min=df.sigma_min, sigma_max=df.sigma_max)
    lo, hi = df.clip
    if clipped and (lo, hi) != (df.sampling_eps, 1.0):
        return schedules.Clipped(base, float(lo), float(hi))
    return base


def build_process(cfg: Config, token_vocab: int):
    """The continuous-time process over `token_vocab` real tokens (None for AR)."""
    if cfg.diffusion.objective == "ar":
        return None
    if cfg.diffusion.objective == "d3pm":
        from dlm_jax.processes.d3pm import D3PM
        schedule = None if cfg.diffusion.d3pm_schedule == "auto" else cfg.diffusion.d3pm_schedule
        return D3PM(kind=cfg.diffusion.process, vocab_size=token_vocab,
                    num_steps=cfg.diffusion.d3pm_steps, schedule=schedule)
    return transitions.make_process(cfg.diffusion.process, token_vocab)


def model_vocab_size(cfg: Config, token_vocab: int) -> int:
    """Rows of the embedding / columns of the head: the process's state count (mask included)."""
    process = build_process(cfg, token_vocab)
    return token_vocab if process is None else process.num_states


def model_dims(cfg: Config) -> dict:
    """Width/depth/heads/cond_dim: the size preset, overridden by any non-zero explicit field."""
    m = cfg.model
    if m.size not in MODEL_SIZES:
        raise ConfigError(f"config.model.size={m.size!r} is not allowed; choose one of "
                          f"{sorted(MODEL_SIZES)}")
    preset = dataclasses.asdict(MODEL_SIZES[m.size])
    dims = {k: (getattr(m, k) or preset[k]) for k in ("width", "depth", "heads", "cond_dim")}
    if dims["width"] % dims["heads"] or (dims["width"] // dims["heads"]) % 2:
        raise ConfigError(f"config.model.width={dims['width']} must split into "
                          f"config.model.heads={dims['heads']} heads of even width")
    return dims


def build_model(cfg: Config, token_vocab: int, rngs: nnx.Rngs) -> DiT:
    """The DiT backbone (diffusion families) or its causal variant (AR)."""
    dims = model_dims(cfg)
    dtype = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else jnp.float32
    return DiT(model_vocab_size(cfg, token_vocab), dims["width"], dims["depth"], dims["heads"],
               cond_dim=dims["cond_dim"], mlp_ratio=cfg.model.mlp_ratio,
               dropout=cfg.model.dropout, causal=cfg.diffusion.objective == "ar",
               time_conditioning=cfg.model.time_conditioning,
               token_conditioning=cfg.model.token_conditioning, remat=cfg.model.remat,
               dtype=dtype, rngs=rngs)


def build_tokenizer(cfg: Config):
    """The tokenizer named by `data.tokenizer` (None for the synthetic Markov source)."""
    from dlm_jax.data.tokenizers import make_tokenizer
    if cfg.data.source == "markov":
        return None
    return make_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


def token_vocab_size(cfg: Config, tokenizer) -> int:
    """Number of real token ids the data can contain."""
    return cfg.data.markov_vocab if tokenizer is None else tokenizer.vocab_size


def build_dataset(cfg: Config, tokenizer, split: str, *, global_batch: int, repeat: bool,
                  process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    """The grain pipeline for `split` with this config's data settings."""
    from dlm_jax.data.pipeline import make_dataset
    d = cfg.data
    return make_dataset(
        source=d.source, split=split, seq_len=d.seq_len, global_batch=global_batch,
        tokenizer=tokenizer, mode=d.mode, seed=d.seed, shuffle=shuffle, repeat=repeat,
        process_index=process_index, process_count=process_count, paths=tuple(d.paths),
        tfds_name=d.tfds_name, tfds_data_dir=d.tfds_data_dir, text_key=d.text_key,
        max_bytes=d.max_bytes or None, markov_order=d.markov_order, markov_vocab=d.markov_vocab,
        markov_seed=d.markov_seed, markov_num_tokens=d.markov_num_tokens,
        num_threads=d.num_threads, prefetch=d.prefetch)
