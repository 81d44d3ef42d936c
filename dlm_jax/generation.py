"""From a trained `Experiment` and the `sampling` config section to one jitted generator.

`make_generator(exp, sampling)` asks the method for its sampler (`Method.generator`, which
picks one of the builders here: `samplers.block` for AR, BD3-LM and block SEDD,
`samplers.masked` for MDLM and D3PM, `samplers.score` for SEDD and the CTMC bound). A
`Generator`'s `run(params, keys, prompt)` is a single compiled program: the whole generation of
a batch, `lax.scan`/`lax.while_loop` inside. Row i of a batch depends on `keys[i]` only
(`sample_keys(seed, start, n)` gives sample i the key `fold_in(seed, i)`), so a sample does not
depend on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlm_jax.config import ConfigError, SamplingConfig
from dlm_jax.methods.base import Denoiser
from dlm_jax.samplers import categorical, jacobi, langevin, mh, speculative
from dlm_jax.samplers import masked as masked_samplers
from dlm_jax.samplers import score as score_samplers
from dlm_jax.samplers.block import (BLOCK_SAMPLERS, eos_lengths, generate_ar, generate_blocks,
                                    generate_score_blocks)

# MDLM (one block): the samplers of `samplers.masked`; "confidence" / "margin" / "entropy" are
# confidence-ordered parallel decoding by that score.
MDLM_SAMPLERS = ("ancestral", "first_hitting", "confidence", "margin", "entropy")
# SEDD: Tweedie ("analytic") or Euler τ-leaping; CTMC: τ-leaping, "pc" with one corrector step.
SEDD_SAMPLERS = ("analytic", "euler")
CTMC_SAMPLERS = ("tau_leaping", "pc")
# AR: token by token; the same draws by Jacobi iteration; exact draws with a diffusion drafter
# (speculative decoding) or proposal (Metropolis–Hastings). All start from a prompt.
AR_SAMPLERS = ("ar", "jacobi", "speculative", "mh")
DRAFTER_SAMPLERS = ("speculative", "mh")
# AR over an ordinal vocabulary trained on noisy histories (diffusion.history_noise): annealed
# Langevin on the smoothed likelihood (PnF), all positions in parallel; its "auto".
LANGEVIN_STEPS = 100                # updates per noise level when sampling.steps = 0

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
    drafter_params: Any = None  # with a drafter, run takes {"model": params, "drafter": these}

    def params(self, params):
        """What `run` takes as its params, given the run's own."""
        return params if self.drafter_params is None else {"model": params,
                                                             "drafter": self.drafter_params}


def sample_keys(seed: int, start: int, count: int) -> Array:
    """(count,) keys of samples start … start+count−1: fold_in(key(seed), i)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def make_generator(exp, sampling: SamplingConfig) -> Generator:
    """The jitted generator for `exp`'s family under `sampling` (the method picks its builder
    below: `Method.generator`); ConfigError for a sampler that does not fit the family or a
    length the model cannot produce."""
    return exp.method.generator(exp, sampling, sampling.length or exp.cfg.data.seq_len)


def load_drafter(exp, sampling: SamplingConfig):
    """(drafter experiment, its (EMA) params) of `sampling.drafter` for the AR samplers that
    need one, checked against the AR run `exp`: a masked-diffusion model over the same tokens."""
    if not sampling.drafter:
        raise ConfigError(f"config.sampling.sampler={sampling.sampler!r} needs a drafter: "
                          f"--drafter DIR (a masked-diffusion run over the same tokenizer)")
    from dlm_jax.evals import restore_run
    d_exp, _, _, d_state = restore_run(sampling.drafter)
    if not d_exp.method.drafts:
        raise ConfigError(f"config.sampling.drafter={sampling.drafter!r} is a "
                          f"{d_exp.method.name} run; the drafter must be a masked-diffusion run "
                          f"(mdlm / bd3lm)")
    ours = (exp.cfg.data.tokenizer, exp.cfg.data.tokenizer_path, exp.token_vocab)
    theirs = (d_exp.cfg.data.tokenizer, d_exp.cfg.data.tokenizer_path, d_exp.token_vocab)
    if ours != theirs:
        raise ConfigError(f"the drafter {sampling.drafter!r} has tokenizer/vocabulary {theirs}, "
                          f"the AR run {ours}: they must be the same")
    return d_exp, d_state.eval_params


def _resolve(sampling, names: tuple[str, ...], family: str) -> str:
    """The sampler name: `sampling.sampler`, "auto" meaning names[0]; it must be in `names`."""
    name = names[0] if sampling.sampler == "auto" else sampling.sampler
    if name not in names:
        raise ConfigError(f"config.sampling.sampler={name!r} does not fit {family}; choose one "
                          f"of {list(names)} (or 'auto')")
    return name


def _truncation(sampling) -> dict:
    return dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)


def _eos(exp, sampling) -> int | None:
    return exp.tokenizer.eos_id if (sampling.stop_at_eos and exp.tokenizer is not None) else None


def _check_length(exp, length: int, block_len: int | None = None) -> None:
    """Whole-sequence samplers: at most the model's length; blocks: a multiple of the block."""
    if block_len is None and length > exp.cfg.data.seq_len:
        raise ConfigError(f"config.sampling.length={length} is longer than the "
                          f"{exp.method.name} model's length data.seq_len={exp.cfg.data.seq_len}")
    if block_len is not None and length % block_len:
        raise ConfigError(f"config.sampling.length={length} must be a multiple of the block "
                          f"size {block_len}")


def _fixed_length(tokens: Array, length: int) -> Array:
    return jnp.full(tokens.shape[:1], length, jnp.int32)


def ar_generator(exp, sampling, length: int) -> Generator:
    """AR: token by token through the KV cache (a window of the model's length); "jacobi": the
    same draws by parallel fixed-point iteration (`samplers.jacobi`), window by window through
    the cache (`sampling.window`, 0: the whole length in one uncached window); "speculative" /
    "mh": exact draws with a masked-diffusion drafter (`_drafted_generator`)."""
    method, cfg = exp.method, exp.cfg
    name = _resolve(sampling, AR_SAMPLERS, "the AR family")
    kw, eos = _truncation(sampling), _eos(exp, sampling)
    window = sampling.window
    if name == "jacobi":
        if window and length % window:
            raise ConfigError(f"config.sampling.window={window} must divide the length {length}")
        if not window or not sampling.kv_cache:
            _check_length(exp, length)

    if name in DRAFTER_SAMPLERS:
        return _drafted_generator(exp, sampling, length, name, load_drafter(exp, sampling))

    def run(params, keys, prompt):
        model = exp.model(params)
        if name == "jacobi" and window and sampling.kv_cache:
            dec = method.block_decoder(model, length, window=min(length, cfg.data.seq_len))
            out = jacobi.jacobi_decode_windows(dec, keys, length=length, window=window,
                                               prompt=prompt, **kw)
        elif name == "jacobi":
            out = jacobi.jacobi_decode(method.denoiser(model).fn, keys, length=length,
                                       prompt=prompt, **kw)
        else:
            dec = method.block_decoder(model, length, cached=sampling.kv_cache,
                                       window=min(length, cfg.data.seq_len))
            return generate_ar(dec, keys, length=length, prompt=prompt, eos_id=eos, **kw)
        return {**out, "lengths": eos_lengths(out["tokens"], prompt.shape[1], eos)}
    return Generator(name, None, length, window or length if name == "jacobi" else 1,
                     jax.jit(run))


def _drafted_generator(exp, sampling, length: int, name: str, drafter) -> Generator:
    """AR "speculative" / "mh": exact draws from the AR model with a masked-diffusion drafter
    (`drafter` = (its experiment, params), `load_drafter`); run(params = {"model", "drafter"},
    keys, prompt). NFE counts AR passes (the drafter's calls are in "draft_nfe"). The target is
    the AR model under `sampling.temperature` / `top_k` / `top_p` (its conditionals through
    `categorical.target_log_probs`): the draws are exact for that distribution."""
    d_exp, d_params = drafter
    _check_length(exp, length)
    if sampling.temperature == 0.0:
        raise ConfigError(f"config.sampling.temperature=0 (greedy) has no distribution for "
                          f"the {name!r} sampler to match: use sampler 'ar' or 'jacobi'")
    kw = _truncation(sampling)
    if length > d_exp.cfg.data.seq_len:
        raise ConfigError(f"config.sampling.length={length} is longer than the drafter's "
                          f"data.seq_len={d_exp.cfg.data.seq_len}")
    method, d_method, k = exp.method, d_exp.method, sampling.draft_tokens
    mask_id, schedule = d_method.process.mask_id, d_method.schedule

    def run(params, keys, prompt):
        ar_fn = method.denoiser(exp.model(params["model"])).fn
        ar = Denoiser("next_token_log_probs",
                      lambda tokens: categorical.target_log_probs(ar_fn(tokens), **kw))
        draft = d_method.denoiser(d_exp.model(params["drafter"]))
        if name == "speculative":
            out = speculative.speculative_sample(
                ar, draft, keys, prompt, length=length, draft_len=k, mask_id=mask_id,
                draft_steps=min(sampling.steps or 1, k), schedule=schedule)
            nfe, draft_nfe = out["rounds"], out["draft_nfe"]
        else:  # start from one full draft of the drafter, then T MH steps
            P = prompt.shape[1]
            x = jnp.zeros((keys.shape[0], length), jnp.int32).at[:, :P].set(prompt)
            # The init's keys: fold_in with an index no MH step uses.
            init_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 2**31 - 1))(keys)
            init = mh.propose_masked(init_keys, x, draft, prompt_len=P, num_masked=length - P,
                                     vocab=exp.token_vocab, mask_id=mask_id,
                                     schedule=schedule)[0]
            out = mh.mh_sample(ar, keys, init, steps=sampling.steps or 100, prompt_len=P,
                               proposal=sampling.mh_proposal, denoiser=draft, mask_id=mask_id,
                               num_masked=min(k, length - P), schedule=schedule)
            nfe, draft_nfe = out["ar_nfe"], out["denoiser_nfe"] + 1
        return {"tokens": out["tokens"],
                "lengths": eos_lengths(out["tokens"], prompt.shape[1], _eos(exp, sampling)),
                "nfe": nfe, "draft_nfe": draft_nfe, "acceptance": out["acceptance"]}
    return Generator(name, sampling.steps or None, length, k, jax.jit(run), d_params)


def langevin_generator(exp, sampling, length: int) -> Generator:
    """AR runs trained on noisy histories (`diffusion.history_noise`): annealed Langevin dynamics
    on the Gaussian-smoothed likelihood (`samplers.langevin`), all positions at once,
    `sampling.steps` updates per noise level (0: `LANGEVIN_STEPS`), η = `sampling.step_size`·σ²,
    from the largest trained level to the smallest, then the posterior mode of each token. NFE:
    gradient evaluations (a forward + backward pass each count 1) plus the final pass."""
    levels = exp.method.history_noise  # only the AR method dispatches here
    if not levels:
        raise ConfigError("config.sampling.sampler='langevin' needs an AR run trained on noisy "
                          "histories (diffusion.history_noise, over data.source='ordinal'); "
                          "this run has none")
    _check_length(exp, length)
    method, steps = exp.method, sampling.steps or LANGEVIN_STEPS

    def run(params, keys, prompt):
        out = langevin.langevin_sample(method.noisy_log_probs(exp.model(params)), keys,
                                       length=length, sigmas=levels, steps=steps,
                                       step_size=sampling.step_size, prompt=prompt)
        return {"tokens": out["tokens"], "lengths": _fixed_length(out["tokens"], length),
                "nfe": out["nfe"]}
    return Generator("langevin", steps, length, length, jax.jit(run))


def bd3lm_generator(exp, sampling, length: int) -> Generator:
    """BD3-LM: block by block (`samplers.block`); any multiple of the block (the cache slides)."""
    method, cfg = exp.method, exp.cfg
    name = _resolve(sampling, BLOCK_SAMPLERS, method.name)
    block_len = method.block_size
    _check_length(exp, length, block_len)
    steps = block_len if name == "first_hitting" else (sampling.steps or block_len)
    skip = sampling.skip_unchanged and not cfg.model.time_conditioning
    kw, eos = _truncation(sampling), _eos(exp, sampling)

    def run(params, keys, prompt):
        dec = method.block_decoder(exp.model(params), length, cached=sampling.kv_cache)
        return generate_blocks(
            dec, keys, length=length, block_len=block_len, steps=steps,
            mask_id=method.process.mask_id, schedule=method.schedule, sampler=name,
            prompt=prompt, skip_unchanged=skip, eos_id=eos,
            stop_entropy=sampling.stop_entropy or None,
            entropy_window=min(256, length), num_states=method.process.num_states, **kw)
    return Generator(name, steps, length, block_len, jax.jit(run))


def mdlm_generator(exp, sampling, length: int) -> Generator:
    """MDLM: one bidirectional block through `samplers.masked`."""
    method, cfg = exp.method, exp.cfg
    name = _resolve(sampling, MDLM_SAMPLERS, method.name)
    _check_length(exp, length)
    steps = length if name == "first_hitting" else (sampling.steps or length)
    mask_id, timed = method.process.mask_id, cfg.model.time_conditioning
    kw = _truncation(sampling)

    def run(params, keys, prompt):
        denoise = method.denoiser(exp.model(params))
        common = dict(prompt=prompt, top_k=kw["top_k"], top_p=kw["top_p"])
        if name == "ancestral":
            fn = (masked_samplers.ancestral_cached if sampling.skip_unchanged
                  else masked_samplers.ancestral)
            extra = {"time_conditioned": timed} if sampling.skip_unchanged else {}
            tokens, nfe = fn(denoise, method.schedule, keys, length, mask_id, steps=steps,
                             temperature=kw["temperature"], **common, **extra)
        elif name == "first_hitting":
            tokens, nfe = masked_samplers.first_hitting(
                denoise, method.schedule, keys, length, mask_id,
                temperature=kw["temperature"], **common)
        else:
            tokens, nfe = masked_samplers.confidence_decode(
                denoise, method.schedule, keys, length, mask_id, steps=steps, strategy=name,
                **common)
        return {"tokens": tokens, "lengths": _fixed_length(tokens, length), "nfe": nfe.max()}
    return Generator(name, steps, length, length, jax.jit(run))


def score_generator(exp, sampling, length: int, *, denoiser: str) -> Generator:
    """Whole sequences from a "log_score" (SEDD) or "x0_probs" (CTMC bound) denoiser through
    `samplers.score`; a prompt is clamped (with σ̄ = 0 at its positions for a uniform process,
    which is exact)."""
    method = exp.method
    sedd = denoiser == "log_score"
    name = _resolve(sampling, SEDD_SAMPLERS if sedd else CTMC_SAMPLERS, method.name)
    _check_length(exp, length)
    steps = sampling.steps or length
    uniform = getattr(method.process, "mask_id", None) is None

    def run(params, keys, prompt):
        fn = method.denoiser(exp.model(params))
        clamp = None
        if prompt is not None:
            known = jnp.broadcast_to(jnp.arange(length) < prompt.shape[1], (keys.shape[0], length))
            tokens = jnp.zeros((keys.shape[0], length), jnp.int32).at[:, :prompt.shape[1]].set(
                prompt)
            clamp = (known, tokens)
        kw = dict(steps=steps, clamp=clamp, clean_clamp=clamp is not None and uniform)
        if sedd:
            x = score_samplers.sedd_sample(fn, method.process, method.schedule, keys, length,
                                           predictor=name, **kw)
        else:
            x = score_samplers.ctmc_sample(fn, method.process, method.schedule, keys, length,
                                           corrector_steps=1 if name == "pc" else 0, **kw)
        nfe = steps * (2 if name == "pc" else 1) + 1
        return {"tokens": x, "lengths": _fixed_length(x, length), "nfe": jnp.int32(nfe)}
    return Generator(name, steps, length, length, jax.jit(run))


def sedd_blocks_generator(exp, sampling, length: int) -> Generator:
    """Block diffusion with score entropy: block by block through the KV cache, SEDD inside."""
    method = exp.method
    name = _resolve(sampling, SEDD_SAMPLERS, method.name)
    lb = method.block_size
    _check_length(exp, length, lb)
    steps = sampling.steps or lb
    eos = _eos(exp, sampling)

    def run(params, keys, prompt):
        dec = method.block_decoder(exp.model(params), length, cached=sampling.kv_cache)
        return generate_score_blocks(dec, keys, length=length, block_len=lb, steps=steps,
                                     process=method.process, schedule=method.schedule,
                                     predictor=name, prompt=prompt, eos_id=eos)
    return Generator(name, steps, length, lb, jax.jit(run))


def d3pm_generator(exp, sampling, length: int) -> Generator:
    """D3PM: ancestral over all T steps (`samplers.masked.d3pm_ancestral`); no prompt."""
    method = exp.method
    _resolve(sampling, ("ancestral",), "D3PM")
    _check_length(exp, length)
    T = method.process.num_steps

    def run(params, keys, prompt):
        if prompt is not None:
            raise ConfigError("D3PM sampling takes no prompt")
        tokens, nfe = masked_samplers.d3pm_ancestral(
            method.reverse_log_probs(exp.model(params)), method.process, keys, length)
        return {"tokens": tokens, "lengths": _fixed_length(tokens, length), "nfe": nfe.max()}
    return Generator("ancestral", T, length, length, jax.jit(run))


def document_boundary(exp) -> int:
    """The token a document starts after in `exp`'s data: BOS when it has one, else EOS (0 for
    the tokenizer-free Markov source)."""
    tok = exp.tokenizer
    return 0 if tok is None else (tok.bos_id if exp.cfg.data.add_bos else tok.eos_id)


def encode_prompt(exp, text: str | None, batch: int, sampler: str) -> Any:
    """The (batch, P) int32 prompt: `text` encoded; AR without text starts at a document
    boundary (BOS when the data has one, else EOS); diffusion without text has none."""
    tok = exp.tokenizer
    if text:
        if tok is None:
            raise ConfigError("--prompt needs a tokenizer; this run's data has none (markov / "
                              "ordinal)")
        ids = list(tok.encode(text.encode() if isinstance(text, str) else text))
    elif sampler in AR_SAMPLERS:
        ids = [document_boundary(exp)]
    else:
        return None
    return jnp.asarray([ids] * batch, jnp.int32)


def generate_samples(exp, params, sampling: SamplingConfig, prompt: str | None = None,
                     say=None) -> tuple[list[dict], dict]:
    """`sampling.num_samples` samples from `params`, in batches of `sampling.batch_size` (one
    compiled program). Returns (rows: sample, text, tokens, length; summary: sampler, steps,
    NFE, seconds, compile seconds and tokens/s of the generated tokens)."""
    import numpy as np
    gen = make_generator(exp, sampling)
    batch = min(sampling.batch_size, sampling.num_samples)
    prompt_ids = encode_prompt(exp, prompt, batch, gen.sampler)
    p_len = 0 if prompt_ids is None else prompt_ids.shape[1]
    if p_len > gen.length:
        raise ConfigError(f"the prompt has {p_len} tokens, more than the sample length "
                          f"{gen.length} (sampling.length)")
    t0 = time.perf_counter()
    params = gen.params(params)
    compiled = gen.run.lower(params, sample_keys(sampling.seed, 0, batch), prompt_ids).compile()
    compile_s = time.perf_counter() - t0
    rows, seconds, new_tokens, nfe, extra = [], 0.0, 0, 0, {}
    for start in range(0, sampling.num_samples, batch):
        t0 = time.perf_counter()
        res = jax.device_get(compiled(params, sample_keys(sampling.seed, start, batch),
                                      prompt_ids))
        dt = time.perf_counter() - t0
        seconds += dt
        count = min(batch, sampling.num_samples - start)
        nfe = int(res["nfe"])
        extra = {k: float(res[k]) for k in ("draft_nfe", "acceptance") if k in res}
        for i in range(count):
            n = int(res["lengths"][i])
            ids = np.asarray(res["tokens"][i, :n])
            new_tokens += n - p_len
            text = exp.tokenizer.decode(ids) if exp.tokenizer is not None else None
            rows.append({"sample": start + i, "text": text, "tokens": ids.tolist(),
                         "length": n})
        if say is not None:
            say(f"batch {start // batch + 1}/{-(-sampling.num_samples // batch)}: {count} "
                f"samples in {dt:.2f}s")
    summary = {"method": exp.method.name, "sampler": gen.sampler, "steps": gen.steps,
               "block": gen.block_len, "length": gen.length, "prompt_tokens": p_len,
               "num_samples": len(rows), "nfe_per_batch": nfe, "seconds": seconds,
               "compile_seconds": compile_s, "tokens_per_s": new_tokens / max(seconds, 1e-9),
               **extra, "settings": dataclasses.asdict(sampling)}
    return rows, summary


def sample_run(workdir: str, *, prompt: str | None = None, out: str | None = None,
               overrides=None, say=None) -> dict:
    """Generate from the newest checkpoint (EMA parameters if kept) of a training run and write
    one JSONL row per sample (text, tokens, settings, NFE, tokens/s) to `out` (default
    `<workdir>/samples_step<N>.jsonl`). `overrides(cfg)` edits the run's config first."""
    from dlm_jax.evals import restore_run
    exp, _, step, state = restore_run(workdir, overrides)
    params = state.eval_params
    rows, summary = generate_samples(exp, params, exp.cfg.sampling, prompt, say)
    out = out or os.path.join(workdir, f"samples_step{step}.jsonl")
    keep = ("method", "sampler", "steps", "block", "nfe_per_batch", "tokens_per_s", "settings")
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "step": step, **{k: summary[k] for k in keep}}) + "\n")
    return {**summary, "workdir": os.path.abspath(workdir), "step": step, "out": out,
            "samples": rows}
