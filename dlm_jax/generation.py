"""From a trained `Experiment` and the `sampling` config section to one jitted generator.

`make_generator(exp, sampling)` picks the family's sampler (`samplers.block` for AR, MDLM and
BD3-LM) and returns a `Generator` whose `run(params, keys, prompt)` is a single compiled program:
the whole generation of a batch, `lax.scan`/`lax.while_loop` inside. Row i of a batch depends on
`keys[i]` only (`sample_keys(seed, start, n)` gives sample i the key `fold_in(seed, i)`), so a
sample does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlm_jax.config import ConfigError, SamplingConfig
from dlm_jax.methods.ar import Autoregressive
from dlm_jax.methods.masked import Masked
from dlm_jax.samplers.block import BLOCK_SAMPLERS, generate_ar, generate_blocks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Generator:
    """sampler: the resolved name; steps: per block (diffusion) or None (AR); length: tokens per
    sample; run(params, keys (B,), prompt (B, P) | None) -> {"tokens", "lengths", "nfe", ...}."""

    sampler: str
    steps: int | None
    length: int
    block_len: int
    run: Callable[..., dict[str, Array]]


def sample_keys(seed: int, start: int, count: int) -> Array:
    """(count,) keys of samples start … start+count−1: fold_in(key(seed), i)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def default_sampler(method) -> str:
    return "ar" if isinstance(method, Autoregressive) else "ancestral"


def make_generator(exp, sampling: SamplingConfig) -> Generator:
    """The jitted generator for `exp`'s family under `sampling`; ConfigError for a sampler that
    does not fit the family or a length the model cannot produce."""
    method, cfg = exp.method, exp.cfg
    length = sampling.length or cfg.data.seq_len
    name = default_sampler(method) if sampling.sampler == "auto" else sampling.sampler
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    eos = exp.tokenizer.eos_id if (sampling.stop_at_eos and exp.tokenizer is not None) else None

    if isinstance(method, Autoregressive):
        if name != "ar":
            raise ConfigError(f"config.sampling.sampler={name!r} does not fit the AR family; "
                              f"use 'ar' (or 'auto')")

        def run_ar(params, keys, prompt):
            dec = method.block_decoder(exp.model(params), length, cached=sampling.kv_cache,
                                       window=min(length, cfg.data.seq_len))
            return generate_ar(dec, keys, length=length, prompt=prompt, eos_id=eos, **kw)
        return Generator("ar", None, length, 1, jax.jit(run_ar))

    if isinstance(method, Masked):
        if name not in BLOCK_SAMPLERS:
            raise ConfigError(f"config.sampling.sampler={name!r} does not fit {method.name}; "
                              f"choose one of {list(BLOCK_SAMPLERS)} (or 'auto')")
        block_len = method.block_size if method.blocks else length
        if not method.blocks and length > cfg.data.seq_len:
            raise ConfigError(f"config.sampling.length={length} is longer than the MDLM model's "
                              f"length data.seq_len={cfg.data.seq_len}")
        if length % block_len:
            raise ConfigError(f"config.sampling.length={length} must be a multiple of the block "
                              f"size {block_len}")
        steps = block_len if name == "first_hitting" else (sampling.steps or block_len)
        skip = sampling.skip_unchanged and not cfg.model.time_conditioning

        def run_blocks(params, keys, prompt):
            dec = method.block_decoder(exp.model(params), length, cached=sampling.kv_cache)
            return generate_blocks(
                dec, keys, length=length, block_len=block_len, steps=steps,
                mask_id=method.process.mask_id, schedule=method.schedule, sampler=name,
                prompt=prompt, skip_unchanged=skip, eos_id=eos,
                stop_entropy=sampling.stop_entropy or None,
                entropy_window=min(256, length), num_states=method.process.num_states, **kw)
        return Generator(name, steps, length, block_len, jax.jit(run_blocks))

    raise ConfigError(f"sampling is not available yet for the {method.name} family "
                      f"(objective {cfg.diffusion.objective!r})")


def encode_prompt(exp, text: str | None, batch: int, sampler: str) -> Any:
    """The (batch, P) int32 prompt: `text` encoded; AR without text starts at a document
    boundary (BOS when the data has one, else EOS); diffusion without text has none."""
    tok = exp.tokenizer
    if text:
        if tok is None:
            raise ConfigError("--prompt needs a tokenizer; this run's data has none (markov)")
        ids = list(tok.encode(text.encode() if isinstance(text, str) else text))
    elif sampler == "ar":
        ids = [0] if tok is None else [tok.bos_id if exp.cfg.data.add_bos else tok.eos_id]
    else:
        return None
    return jnp.asarray([ids] * batch, jnp.int32)
