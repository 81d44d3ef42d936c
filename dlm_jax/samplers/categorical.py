"""Categorical sampling that is exact in float32, with temperature, top-k and top-p.

Sampling is an exponential race: token v wins with probability p_v when it minimises E_v / p_v
over independent standard exponentials E_v; in log space the winner is
argmax_v (log p_v − log E_v), i.e. Gumbel-max with Gumbel noise −log E. Neither the
probabilities nor their logs need to be normalised, and no cumulative sum is formed (a float32
cumsum over 50k tokens loses probabilities below ~1e-7).

Tail safety. A token of probability p ≪ 1 wins when its exponential is below about p: the
sampler must produce E < 1e-7 with probability ≈ 1e-7. E = −log U from a float32 uniform on the
usual 2⁻²³ grid cannot (there is no U between 1 − 2⁻²⁴ and 1), and neither can −log(−log U)
Gumbel noise. Here E = −log1p(−W) with W uniform on (0, 1) at full float precision near 0: its
exponent comes from the leading zeros of a random 32-bit word (a geometric variate) and its 22
mantissa bits from another, so W resolves every scale down to 2⁻³³ (see `tests/test_samplers.py`
for the χ² test with a token of probability 1e-7).

Shapes: (..., V) logits or log-probabilities over the last axis; samples (...) int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NEG_INF = -jnp.inf


def fine_uniform(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform on (0, 1) in float32 with full relative precision near 0 (down to 2⁻³³)."""
    size = int(np.prod(shape, dtype=np.int64))
    # Drawn flat and reshaped: multi-dimensional draws compile about twice as slowly on CPU.
    words = jax.random.bits(key, (2, size), jnp.uint32).reshape((2, *shape))
    zeros = jax.lax.clz(words[0]).astype(jnp.float32)            # geometric: P(k) = 2^-(k+1)
    # 22 random bits, at the middle of their cell: exact in float32, never 0, always < 1.
    mantissa = (words[1] >> 10).astype(jnp.float32) * 2.0 ** -22 + 2.0 ** -23
    return (1.0 + mantissa) * jnp.exp2(-(zeros + 1.0))


def exponential_log(key: Array, shape: tuple[int, ...]) -> Array:
    """log E for standard exponentials E, accurate for tiny E (the rare-token tail)."""
    return jnp.log(-jnp.log1p(-fine_uniform(key, shape)))


def gumbel(key: Array, shape: tuple[int, ...]) -> Array:
    """Standard Gumbel noise −log E, tail-safe (see the module docstring)."""
    return -exponential_log(key, shape)


def truncate(log_probs: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Keep the top-k and/or nucleus (top-p) tokens, −inf elsewhere; (..., V) -> (..., V).

    top_k: keep the k most likely (0: all). top_p: the BD3-LM/MDLM nucleus rule, applied after
    top-k: keep the tokens whose cumulative probability in descending order, themselves
    included, is ≤ top_p, and always the most likely one (so the token crossing p is dropped;
    top_p=1 keeps all). The inputs need not be normalised.
    """
    out = log_probs
    V = log_probs.shape[-1]
    if top_k and top_k < V:
        kth = jax.lax.top_k(out, top_k)[0][..., -1:]
        out = jnp.where(out >= kth, out, NEG_INF)
    if top_p < 1.0:
        order = jnp.argsort(-out, axis=-1)
        sorted_lp = jnp.take_along_axis(out, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_lp, axis=-1), axis=-1)
        keep_sorted = (cum <= top_p) | (jnp.arange(V) == 0)
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        out = jnp.where(keep, out, NEG_INF)
    return out


def target_log_probs(log_probs: Array, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> Array:
    """The normalised log-probabilities (..., V) that `sample` draws from at `temperature` > 0:
    log softmax(truncate(log_probs / temperature)), −inf outside the kept tokens. Samplers
    whose exactness rests on a target's probabilities (speculative decoding, MH) use this as
    the AR model's conditionals, so their draws follow the same truncated distribution."""
    if temperature <= 0.0:
        raise ValueError(f"target_log_probs needs temperature > 0, got {temperature}")
    lp = jnp.asarray(log_probs, jnp.float32)
    if temperature != 1.0:
        lp = lp / temperature
    return jax.nn.log_softmax(truncate(lp, top_k=top_k, top_p=top_p), axis=-1)


def sample(key: Array, log_probs: Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> Array:
    """Draw one token per row from softmax(log_probs / temperature), after top-k/top-p.

    log_probs (..., V): logits or log-probabilities (−inf = impossible). temperature 0 is greedy
    (argmax). Returns (...) int32.
    """
    lp = jnp.asarray(log_probs, jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(lp, axis=-1).astype(jnp.int32)
    if temperature != 1.0:
        lp = lp / temperature
    lp = truncate(lp, top_k=top_k, top_p=top_p)
    return jnp.argmax(lp + gumbel(key, lp.shape), axis=-1).astype(jnp.int32)


def sample_probs(key: Array, probs: Array) -> Array:
    """Draw from unnormalised non-negative weights (..., V): argmax log w − log E. (..., ) int32."""
    w = jnp.asarray(probs, jnp.float32)
    logw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), NEG_INF)
    return jnp.argmax(logw + gumbel(key, w.shape), axis=-1).astype(jnp.int32)
