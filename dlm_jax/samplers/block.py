"""Block-by-block generation: BD3-LM (diffusion inside a block, autoregressive over blocks) and
AR (blocks of one token), driven by a `BlockDecoder`.

BD3-LM (Arriola et al., 2025, "Block Diffusion", Alg. 2): an outer loop over blocks carries the
decoder's cache of the finished clean blocks; an inner `lax.scan` over diffusion steps denoises
the current block, reading the cache only; a finished block is committed to the cache once. Each
step is either the ancestral x0-parameterised update (`steps.ancestral_step`, with the reveal
probability (α_s − α_t)/(1 − α_t) on the grid t_i = 1 − i/T) or a first-hitting event
(`steps.first_hitting_step`: exactly one token per step, Lb steps per block). With
`skip_unchanged` the network is not called again while a step changed nothing (exact when the
denoiser ignores σ, i.e. without time conditioning: MDLM's "ddpm_cache").

The outer loop is a `lax.while_loop`, so generation stops as soon as every row is done: at EOS
(`eos_id`) or, as in the paper's variable-length sampling, when the entropy of a row's last
`entropy_window` tokens falls below `stop_entropy` nats (the row is then cut before that window).

A `BlockDecoder` is a plain triple of functions over a cache pytree, so the same loop runs the
KV-cached model, its uncached twin (the prefix recomputed at every step under the block-causal
mask) and an exact oracle. `generate_score_blocks` runs the same outer loop with SEDD's samplers
inside a block (block diffusion with score entropy, over an absorbing or a uniform process).
Shapes: B batch, L length, Lb block length, S states.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlm_jax.samplers import categorical
from dlm_jax.samplers.steps import ancestral_step, first_hitting_step, row_keys

Array = jax.Array

BLOCK_SAMPLERS = ("ancestral", "first_hitting")
FREE = -1  # a not-yet-generated position (score-based block sampling; never a token)


@dataclasses.dataclass(frozen=True)
class BlockDecoder:
    """A model seen one block at a time, behind an explicit cache pytree.

    init(batch) -> cache: the empty cache.
    log_probs(block (B, Lb) int32, sigma_bar (B,), cache) -> (B, Lb, S): for diffusion the SUBS
      log p_θ(x_0 | x_t) of the block given the committed prefix; the cache is only read.
    commit(block (B, Lb), cache) -> (outputs (B, Lb, S), cache): append the clean block; the
      outputs of that call (AR: the next-token log-probs at the block's positions; diffusion
      decoders return raw outputs, which the samplers do not use).
    max_tokens: the longest sequence it can produce (None: any, e.g. a sliding-window cache).
    """

    init: Callable[[int], Any]
    log_probs: Callable[[Array, Array, Any], Array]
    commit: Callable[[Array, Any], tuple[Array, Any]]
    max_tokens: int | None = None


def _check(decoder, length, block_len, prompt, steps=1):
    if block_len < 1 or length % block_len:
        raise ValueError(f"the block size {block_len} must divide the length {length}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if prompt is not None and prompt.shape[1] > length:
        raise ValueError(f"the prompt has {prompt.shape[1]} tokens, more than the length {length}")
    if decoder.max_tokens is not None and length > decoder.max_tokens:
        raise ValueError(f"length {length} exceeds what this decoder can hold "
                         f"({decoder.max_tokens}); use the KV cache (a sliding window)")


def _initial_tokens(batch: int, length: int, fill: int, prompt: Array | None) -> Array:
    tokens = jnp.full((batch, length), fill, jnp.int32)
    if prompt is not None:
        tokens = tokens.at[:, :prompt.shape[1]].set(jnp.asarray(prompt, jnp.int32))
    return tokens


def _row_entropy(window: Array, num_states: int) -> Array:
    """(B, W) tokens -> (B,) entropy in nats of each row's token histogram."""
    counts = jax.vmap(lambda r: jnp.bincount(r, length=num_states))(window)
    p = counts / window.shape[1]
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)


def _stop_lengths(tokens, end, prompt_len, length, eos_id, stop_entropy, entropy_window,
                  num_states, lengths):
    """Update per-row output lengths (length = still running) after tokens [0, end) are final."""
    pos = jnp.arange(tokens.shape[1])
    running = lengths == length
    if eos_id is not None:
        hit = (tokens == eos_id) & (pos >= prompt_len) & (pos < end)
        first = jnp.where(hit.any(-1), jnp.argmax(hit, -1) + 1, length)
        lengths = jnp.where(running, first, lengths)
        running = lengths == length
    if stop_entropy is not None and entropy_window <= tokens.shape[1]:
        start = jnp.maximum(end - entropy_window, 0)
        window = jax.lax.dynamic_slice_in_dim(tokens, start, entropy_window, axis=1)
        low = (end >= entropy_window) & (_row_entropy(window, num_states) < stop_entropy)
        lengths = jnp.where(running & low, jnp.maximum(start, prompt_len), lengths)
    return lengths


def eos_lengths(tokens: Array, prompt_len: int, eos_id: int | None) -> Array:
    """(B,) int32 tokens to keep of finished (B, L) rows: through the first EOS after the
    prompt, or all L (no `eos_id`, or no EOS)."""
    B, L = tokens.shape
    return _stop_lengths(tokens, L, prompt_len, L, eos_id, None, 0, 1,
                         jnp.full((B,), L, jnp.int32))


def generate_blocks(decoder: BlockDecoder, keys: Array, *, length: int, block_len: int,
                    steps: int, mask_id: int, schedule, sampler: str = "ancestral",
                    prompt: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, skip_unchanged: bool = False, eos_id: int | None = None,
                    stop_entropy: float | None = None, entropy_window: int = 256,
                    num_states: int | None = None) -> dict[str, Array]:
    """Generate (B, length) tokens block by block with a diffusion `decoder` (BD3-LM; MDLM is
    block_len = length).

    keys: (B,) typed keys, one per row (row i depends on keys[i] only). steps: diffusion steps
    per block (ancestral; first-hitting always takes Lb). schedule: the masking schedule
    (α(t), σ̄(t)). prompt: (B, P) tokens held fixed; the blocks it fills are committed as they
    are. temperature / top_k / top_p: applied to p_θ(x_0 | x_t) (`categorical.truncate`).
    eos_id / stop_entropy: variable length (see the module docstring); num_states (for the
    entropy histogram) defaults to mask_id + 1.

    Returns {"tokens": (B, length) int32, "lengths": (B,) int32 tokens to keep, "nfe": int32[]
    network calls (commits not counted), "blocks": int32[] blocks generated}.
    """
    if sampler not in BLOCK_SAMPLERS:
        raise ValueError(f"unknown block sampler {sampler!r}; choose one of {BLOCK_SAMPLERS}")
    _check(decoder, length, block_len, prompt, steps)
    B, lb = keys.shape[0], block_len
    P = 0 if prompt is None else prompt.shape[1]
    S = num_states or mask_id + 1
    inner = lb if sampler == "first_hitting" else steps
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def denoise_block(x, cache, block_keys):
        """The inner scan: (B, Lb) block with masks -> clean block, NFE."""
        lp0 = jnp.zeros(x.shape + (S,), jnp.float32)

        def step(carry, i):
            x, lp, stale, t_row, nfe = carry
            sigma = schedule.sigma_bar(t_row)
            # Call the network while any mask is left, and (skip_unchanged) only if the last
            # step changed something: the previous p_θ is then still exact.
            call = jnp.any(x == mask_id) & (stale if skip_unchanged else True)
            lp = jax.lax.cond(call, lambda: decoder.log_probs(x, sigma, cache), lambda: lp)
            nfe = nfe + call.astype(jnp.int32)
            k = row_keys(block_keys, i)
            if sampler == "first_hitting":
                n_masked = (x == mask_id).sum(-1)
                u = jax.vmap(lambda kk: categorical.fine_uniform(jax.random.fold_in(kk, 1),
                                                                 ()))(k)
                t_row = jnp.where(n_masked > 0, t_row * u ** (1.0 / jnp.maximum(n_masked, 1)),
                                  t_row)
                x_new = first_hitting_step(k, x, lp, mask_id, **sample_kw)
            else:
                t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
                a_t, a_s = schedule.alpha(t), schedule.alpha(s)
                p_reveal = jnp.where(i == steps - 1, 1.0, (a_s - a_t) / (1.0 - a_t))
                t_row = jnp.full((B,), s, jnp.float32)
                x_new = ancestral_step(k, x, lp, jnp.full((B,), p_reveal), mask_id,
                                       **sample_kw)
            stale = jnp.any(x_new != x)
            return (x_new, lp, stale, t_row, nfe), None

        init = (x, lp0, jnp.bool_(True), jnp.ones((B,), jnp.float32), jnp.int32(0))
        (x, _, _, _, nfe), _ = jax.lax.scan(step, init, jnp.arange(inner))
        return x, nfe

    tokens = _initial_tokens(B, length, mask_id, prompt)
    return _block_loop(decoder, keys, tokens, block_len, P, denoise_block, eos_id=eos_id,
                       stop_entropy=stop_entropy, entropy_window=entropy_window, num_states=S)


def _block_loop(decoder, keys, tokens, block_len, prompt_len, denoise_block, *, eos_id,
                stop_entropy, entropy_window, num_states) -> dict[str, Array]:
    """The outer loop over blocks: denoise (`denoise_block(x, cache, block_keys) -> (x, nfe)`),
    commit, stop checks; blocks the prompt fills are committed as they are."""
    B, length = tokens.shape
    lb = block_len

    def body(carry):
        b, tokens, cache, lengths, nfe = carry
        start = b * lb
        x = jax.lax.dynamic_slice_in_dim(tokens, start, lb, axis=1)
        x, n = jax.lax.cond(start + lb > prompt_len,
                            lambda: denoise_block(x, cache, row_keys(keys, b)),
                            lambda: (x, jnp.int32(0)))
        _, cache = decoder.commit(x, cache)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, x, start, axis=1)
        lengths = _stop_lengths(tokens, start + lb, prompt_len, length, eos_id, stop_entropy,
                                entropy_window, num_states, lengths)
        return b + 1, tokens, cache, lengths, nfe + n

    def cond(carry):
        b, _, _, lengths, _ = carry
        return (b < length // lb) & jnp.any(lengths == length)

    init = (jnp.int32(0), tokens, decoder.init(B), jnp.full((B,), length, jnp.int32),
            jnp.int32(0))
    blocks, tokens, _, lengths, nfe = jax.lax.while_loop(cond, body, init)
    return {"tokens": tokens, "lengths": lengths, "nfe": nfe, "blocks": blocks}


def generate_score_blocks(decoder: BlockDecoder, keys: Array, *, length: int, block_len: int,
                          steps: int, process, schedule, predictor: str = "analytic",
                          prompt: Array | None = None, eos_id: int | None = None,
                          eps: float = 1e-5) -> dict[str, Array]:
    """Block diffusion with a score-entropy (SEDD) model over any process: each block is drawn by
    `samplers.score.sedd_sample` (Tweedie or Euler τ-leaping and the final denoising step) with
    the block's log-scores given the committed clean prefix (`decoder.log_probs`); prompt
    positions are clamped (with σ̄ = 0 there for a process without a mask, which is exact).

    Returns {"tokens", "lengths", "nfe", "blocks"} as `generate_blocks`.
    """
    from dlm_jax.samplers import score
    _check(decoder, length, block_len, prompt, steps)
    B, lb = keys.shape[0], block_len
    P = 0 if prompt is None else prompt.shape[1]
    uniform = getattr(process, "mask_id", None) is None

    def denoise_block(x, cache, block_keys):
        known = x != FREE
        clamp = (known, x) if P else None
        out = score.sedd_sample(lambda xb, sb: decoder.log_probs(xb, sb, cache), process,
                                schedule, block_keys, lb, steps=steps, predictor=predictor,
                                eps=eps, clamp=clamp, clean_clamp=bool(P) and uniform)
        return out, jnp.int32(steps + 1)

    tokens = _initial_tokens(B, length, FREE, prompt)
    return _block_loop(decoder, keys, tokens, lb, P, denoise_block, eos_id=eos_id,
                       stop_entropy=None, entropy_window=0, num_states=process.num_states)


def generate_ar(decoder: BlockDecoder, keys: Array, *, length: int, prompt: Array,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                eos_id: int | None = None) -> dict[str, Array]:
    """Autoregressive generation token by token through `decoder` (commit returns next-token
    log-probs). prompt: (B, P ≥ 1) tokens (at least a BOS). keys: (B,), one per row.

    Returns {"tokens": (B, length), "lengths": (B,), "nfe": int32[] network calls (one per
    position but the last, the prompt's included)}.
    """
    if prompt is None or prompt.shape[1] < 1:
        raise ValueError("AR generation needs a prompt of at least one token (e.g. BOS)")
    _check(decoder, length, 1, prompt)
    B, P = prompt.shape

    def step(carry, i):
        tokens, cache = carry
        lp, cache = decoder.commit(jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), cache)
        nxt = jax.vmap(lambda k, row: categorical.sample(
            jax.random.fold_in(k, i), row, temperature=temperature, top_k=top_k,
            top_p=top_p))(keys, lp[:, 0])
        keep = jax.lax.dynamic_slice_in_dim(tokens, i + 1, 1, axis=1)[:, 0]
        nxt = jnp.where(i + 1 < P, keep, nxt)
        return (jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i + 1, axis=1),
                cache), None

    tokens = _initial_tokens(B, length, 0, prompt)
    (tokens, _), _ = jax.lax.scan(step, (tokens, decoder.init(B)), jnp.arange(length - 1))
    lengths = eos_lengths(tokens, P, eos_id)
    return {"tokens": tokens, "lengths": lengths, "nfe": jnp.int32(length - 1)}
