"""Forward-process corruption: training times and draws x_t ~ q(x_t | x_0).

Pure functions, PRNG key first (typed keys, `jax.random.key`). Shapes: B batch, L length,
K = L / Lb blocks of Lb tokens.

Times
  * `sample_times`: t ∈ [t_min, t_max]; with `antithetic=True` the n = prod(shape) times are
    stratified (one uniform in each of the n strata of width 1/n, MDLM / BD3-LM "antithetic").
  * `sample_block_times`: one time per (sequence, block), stratified over batch × blocks, on the
    interval `schedules.time_bounds(schedule, sampling_eps)` (the clipped [β_l, β_u] of BD3-LM).
  * `block_times`: repeat per-block times to per-token times.
  * `evaluation_times`: several times per element for validation, by a named scheme
    (`TIME_SCHEMES`: i.i.d., stratified, randomly shifted quadrature), each unbiased.

Corruption
  * `corrupt`: per-token times, any process with `sample_transition(key, x0, sigma_bar)`.
  * `corrupt_blocks`: per-block times, with BD3-LM's `resample` option for masking processes
    (realised per-block mask fraction constrained to the clipping bounds), drawn exactly by a
    direct sampler with static shapes (see `corrupt_blocks`).
Both take `keep_first=True` (BD3-LM `ignore_bos`): position 0 is never corrupted.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dlm_jax.processes.schedules import Clipped, Schedule, time_bounds

# BD3-LM's resample exceptions: a lower bound equal to this is not enforced, nor an upper bound
# equal to 1 (so the default interval (1e-3, 1) resamples nothing).
_UNENFORCED_LOWER = 1e-3
_UNENFORCED_UPPER = 1.0
# Bounds are compared with this tolerance so that float32-rounded bounds (0.3 → 0.30000001) and
# the exception values behave like the decimals they stand for.
_BOUND_TOL = 1e-6
# Floor on probabilities inside logs of the truncated-binomial sampler (see `_masked_counts`).
_TINY = 1e-30


def _enforced(beta_l: float, beta_u: float) -> tuple[bool, bool]:
    """Whether BD3-LM's resample rule enforces the lower and the upper bound."""
    return (not math.isclose(beta_l, _UNENFORCED_LOWER, rel_tol=_BOUND_TOL),
            not math.isclose(beta_u, _UNENFORCED_UPPER, rel_tol=_BOUND_TOL))


def _is_concrete(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False


# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------
def sample_times(key: Array, shape: tuple[int, ...], *, t_min=1e-3, t_max=1.0,
                 antithetic: bool = True, permute: bool = True,
                 dtype=jnp.float32) -> Array:
    """Training times t ∈ [t_min, t_max] of the given shape.

    With `antithetic=True` (stratified, MDLM/BD3-LM's "antithetic" sampling) the n = prod(shape)
    times use one shared uniform u0: u_i = (u0/n + i/n) mod 1 for i = 0..n−1, so exactly one u
    falls in each stratum [i/n, (i+1)/n), across ALL elements (e.g. batch × blocks). Then
    t = t_min + u·(t_max − t_min).

    `permute=True` (default) assigns the strata to elements by a uniformly random permutation.
    The reference does not permute, so in row-major order element i always lies in stratum i:
    sequence 0 of a batch gets the smallest times, the last sequence the largest, and inside a
    sequence block k's time grows with k. The *set* of times, and hence the batch-mean estimator's
    variance for exchangeable data, is the same either way, but without permutation an element's
    marginal is uniform on its stratum only, not on [t_min, t_max]. That biases anything computed
    per batch position or per block index (per-device or per-microbatch losses, per-block loss
    statistics such as BD3-LM's clip search, packed or sorted batches). Permuting costs one
    shuffle of n integers and makes every element marginally U[t_min, t_max] while keeping exact
    stratification. `permute=False` reproduces the reference ordering.

    If t_min ≥ 1 every time is 1 (BD3-LM's "always fully masked" setting, e.g. Lb = 1 → AR).
    t_min and t_max may be Python floats (validated: t_min ≤ t_max) or traced scalars.

    Returns: `shape` array of `dtype` (float32 by default).
    """
    shape = tuple(int(s) for s in shape)
    if _is_concrete(t_min) and _is_concrete(t_max) and float(t_min) > float(t_max):
        raise ValueError(f"sample_times needs t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return _sample_times(key, t_min, t_max, shape=shape, antithetic=bool(antithetic),
                         permute=bool(permute), dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("shape", "antithetic", "permute", "dtype"))
def _sample_times(key, t_min, t_max, *, shape, antithetic, permute, dtype):
    n = math.prod(shape)
    if antithetic:
        # One draw of random bits feeds everything (one threefry call keeps compiles short):
        # the shared offset u0 and, if permuting, two 32-bit sort keys per element.
        bits = jax.random.bits(key, (2 * n + 1,), jnp.uint32)
        u0 = _unit_interval(bits[0], closed_left=True)
        strata = jnp.arange(n, dtype=jnp.int32)
        if permute and n > 1:
            strata = _random_permutation(bits[1:n + 1], bits[n + 1:], strata)
        # u_i = (u0 + s_i) / n = (u0/n + s_i/n) mod 1: exactly one u per stratum [s/n, (s+1)/n).
        u = (u0 + strata.astype(jnp.float32)) / n
    else:
        u = jax.random.uniform(key, (n,), jnp.float32)
    t_min = jnp.asarray(t_min, jnp.float32)
    t_max = jnp.asarray(t_max, jnp.float32)
    t = jnp.clip(t_min + u * (t_max - t_min), t_min, t_max)
    t = jnp.where(t_min >= 1.0, jnp.ones_like(t), t)
    return t.reshape(shape).astype(dtype)


TIME_SCHEMES = ("iid", "stratified", "quadrature")


def evaluation_times(key: Array, shape: tuple[int, ...], *, scheme: str, samples: int = 1,
                     t_min=1e-3, t_max=1.0) -> Array:
    """`samples` evaluation times per element of `shape` (e.g. (B, K): sequence × block) in
    [t_min, t_max], each marginally U[t_min, t_max], so any average of a per-time objective over
    them is an unbiased Monte-Carlo estimate of its time integral (the NELBO of MDLM, Sahoo et
    al., 2024, eq. 10, and of BD3-LM per block, Arriola et al., 2025, eq. 8).

    scheme:
      "iid": plain Monte Carlo, every time independent.
      "stratified": the n = samples · prod(shape) times jointly stratified (`sample_times` with
        `antithetic=True`: one time in each of n strata of width 1/n, randomly assigned), the
        MDLM / BD3-LM "antithetic" sampling extended over the time samples.
      "quadrature": per element a randomly shifted midpoint rule (a rank-1 lattice with a
        Cranley–Patterson rotation; Cranley & Patterson, 1976, "Randomization of number theoretic
        methods for multiple integration"): t_r = t_min + (t_max − t_min)·frac(u + r/samples) for
        r < samples, with one u ~ U[0, 1) per element. Each element's times cover [t_min, t_max]
        evenly (the error of a smooth 1-D integrand falls like samples^-2 rather than
        samples^-1/2) and elements stay independent, so per-sequence values are i.i.d.

    Returns (samples, *shape) float32.
    """
    if scheme not in TIME_SCHEMES:
        raise ValueError(f"scheme must be one of {TIME_SCHEMES}, got {scheme!r}")
    shape = (int(samples),) + tuple(int(s) for s in shape)
    if scheme == "iid":
        return sample_times(key, shape, t_min=t_min, t_max=t_max, antithetic=False)
    if scheme == "stratified":
        return sample_times(key, shape, t_min=t_min, t_max=t_max, antithetic=True)
    u = jax.random.uniform(key, shape[1:], jnp.float32)
    grid = jnp.arange(shape[0], dtype=jnp.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    frac = jnp.mod(u[None] + grid / shape[0], 1.0)
    t_min = jnp.asarray(t_min, jnp.float32)
    t_max = jnp.asarray(t_max, jnp.float32)
    t = jnp.clip(t_min + frac * (t_max - t_min), t_min, t_max)
    return jnp.where(t_min >= 1.0, jnp.ones_like(t), t)


def _unit_interval(bits: Array, closed_left: bool = False) -> Array:
    """float32 uniforms from uint32 bits: [0, 1) on a 2^-24 grid, or (0, 1) on a 2^-23 grid."""
    if closed_left:
        return (bits >> 8).astype(jnp.float32) * (2.0 ** -24)
    return ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)


def _random_permutation(keys_hi: Array, keys_lo: Array, values: Array) -> Array:
    """`values` (…, n) shuffled along the last axis by sorting on 64-bit random keys (hi, lo).

    A tie needs two equal 64-bit keys (probability ≈ n² / 2^65), so the result is a uniformly
    random permutation for all practical n; each row of the leading axes is shuffled independently.
    """
    return jax.lax.sort((keys_hi, keys_lo, values), dimension=-1, num_keys=2)[2]


def block_times(t_blocks: Array, block_size: int) -> Array:
    """Per-token times from per-block times: each block's time repeated Lb times.

    Args:
      t_blocks: (..., K) times, one per block.
      block_size: Lb.

    Returns: (..., K·Lb) with out[..., j] = t_blocks[..., j // Lb].
    """
    t_blocks = jnp.asarray(t_blocks)
    k = t_blocks.shape[-1]
    return jnp.repeat(t_blocks, block_size, axis=-1, total_repeat_length=k * block_size)


def _num_blocks(length: int, block_size: int) -> int:
    if block_size < 1 or length % block_size:
        raise ValueError(f"block_size={block_size} must be a positive divisor of the sequence "
                         f"length L={length}")
    return length // block_size


def sample_block_times(key: Array, batch: int, length: int, block_size: int,
                       schedule: Schedule, sampling_eps: float = 1e-3,
                       antithetic: bool = True, permute: bool = True) -> Array:
    """One time per (sequence, block), stratified over all batch × blocks elements.

    The interval is `time_bounds(schedule, sampling_eps)`: [β_l, β_u] for a `Clipped` schedule,
    else [sampling_eps, 1]. See `sample_times` for `antithetic` and `permute`. Lb = L gives one time
    per sequence (MDLM). Raises ValueError if `block_size` does not divide `length`.

    Returns: (B, K) float32 with K = L / Lb.
    """
    k = _num_blocks(length, block_size)
    t_min, t_max = time_bounds(schedule, sampling_eps)
    return sample_times(key, (batch, k), t_min=t_min, t_max=t_max, antithetic=antithetic,
                        permute=permute)


# --------------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------------
def _noise_of(schedule: Schedule) -> Schedule:
    """The schedule whose noise functions a `Clipped` one delegates to (a shorter jit cache key)."""
    while isinstance(schedule, Clipped):
        schedule = schedule.base
    return schedule


def _restore_first(xt: Array, x0: Array, keep_first: bool) -> Array:
    if not keep_first:
        return xt
    return xt.at[..., 0].set(x0[..., 0])


def corrupt(key: Array, x0: Array, t: Array, process, schedule: Schedule, *,
            keep_first: bool = False) -> Array:
    """Draw x_t ~ q(x_t | x_0) independently per token, with noise σ̄(t) per token.

    Args:
      key: PRNG key.
      x0: (B, L) integer clean tokens (any shape works).
      t: times broadcastable to x0's shape, e.g. (B, L) per-token or (B, 1) per-sequence.
      process: any process with `sample_transition(key, x0, sigma_bar)` (Uniform, Absorbing, …).
      schedule: gives `sigma_bar(t)`.
      keep_first: if True, position 0 (last axis) is never corrupted (BD3-LM `ignore_bos`).

    Returns: (B, L) x_t, same dtype as x0.
    """
    return _corrupt(key, jnp.asarray(x0), jnp.asarray(t), process=process,
                    schedule=_noise_of(schedule), keep_first=bool(keep_first))


@functools.partial(jax.jit, static_argnames=("process", "schedule", "keep_first"))
def _corrupt(key, x0, t, *, process, schedule, keep_first):
    sigma_bar = jnp.broadcast_to(schedule.sigma_bar(t), x0.shape)
    xt = process.sample_transition(key, x0, sigma_bar)
    return _restore_first(xt, x0, keep_first)


def resample_count_range(block_size: int, bounds: tuple[float, float]) -> tuple[int, int]:
    """Allowed numbers of masked tokens per block under BD3-LM's `resample` rule.

    A block's realised fraction f = c / Lb must satisfy β_l ≤ f ≤ β_u, except that the lower bound
    is not enforced when β_l == 1e-3 and the upper bound is not enforced when β_u == 1 (so
    (1e-3, 1) allows everything). Both bounds are inclusive, compared with a 1e-6 tolerance so
    that float32-rounded bounds act like their decimals (0.3 with Lb = 10 admits c = 3).

    Returns: (c_min, c_max), inclusive, with 0 ≤ c_min ≤ c_max ≤ Lb. Raises ValueError when no
    count is allowed (e.g. Lb = 4 and bounds (0.3, 0.45)): the reference's rejection loop would
    never end there.
    """
    beta_l, beta_u = (float(b) for b in bounds)
    if not beta_l <= beta_u:
        raise ValueError(f"resample bounds need beta_l <= beta_u, got {bounds}")
    counts = np.arange(block_size + 1)
    frac = counts / block_size
    ok = np.ones(block_size + 1, bool)
    lower, upper = _enforced(beta_l, beta_u)
    if lower:
        ok &= frac >= beta_l - _BOUND_TOL
    if upper:
        ok &= frac <= beta_u + _BOUND_TOL
    if not ok.any():
        raise ValueError(f"resample: no masked count c in 0..{block_size} has c/block_size in "
                         f"[{beta_l}, {beta_u}] for block_size={block_size}; widen the bounds or "
                         f"use a larger block")
    allowed = counts[ok]  # contiguous: the constraint is an interval in c
    return int(allowed.min()), int(allowed.max())


def _masked_counts(gumbel_bits: Array, move: Array, keep: Array, block_size: int,
                   c_min, c_max) -> Array:
    """Masked count per block ~ Binomial(Lb, move) truncated to [c_min, c_max]; (..., K) int32.

    `gumbel_bits`: (..., K, Lb + 1) uint32 random bits. Sampled by Gumbel-max over the Lb + 1
    counts with logits(c) = log C(Lb, c) + c·(log move − log keep) (the c-independent Lb·log keep
    cancels); log C(Lb, c) is a static float64 table cast to float32. Only differences of logits
    near the mode matter, so the float32 error in the pmf is ~1e-7·max|log C| (≈ 4e-5 relative at
    Lb = 1024, far less for small blocks). Probabilities are floored at 1e-30 inside the logs, so a
    block whose truncated pmf has no float32 mass (move exactly 0 with c_min > 0, or exactly 1 with
    c_max < Lb) gets the allowed count nearest the untruncated one instead of NaN.
    """
    counts = np.arange(block_size + 1)
    log_binom = (math.lgamma(block_size + 1) - np.array([math.lgamma(c + 1) for c in counts])
                 - np.array([math.lgamma(block_size - c + 1) for c in counts]))
    c = jnp.asarray(counts, jnp.int32)
    allowed = (c >= c_min) & (c <= c_max)  # c_min, c_max may be traced
    logit = (jnp.log(jnp.maximum(move, _TINY)) - jnp.log(jnp.maximum(keep, _TINY)))[..., None]
    logits = jnp.asarray(log_binom, jnp.float32) + jnp.asarray(counts, jnp.float32) * logit
    gumbel = -jnp.log(-jnp.log(_unit_interval(gumbel_bits)))
    scores = jnp.where(allowed, logits + gumbel, -jnp.inf)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def corrupt_blocks(key: Array, x0: Array, t_blocks: Array, block_size: int, process,
                   schedule: Schedule, *, resample: bool = False,
                   bounds: tuple[float, float] | None = None, sampling_eps: float = 1e-3,
                   keep_first: bool = False) -> Array:
    """Draw x_t with one time per block (BD3-LM), optionally with the `resample` rule.

    Args:
      key: PRNG key.
      x0: (B, L) integer clean tokens (any leading axes; blocks along the last axis).
      t_blocks: (B, K) per-block times, K = L / Lb.
      block_size: Lb; must divide L.
      process: any process with `sample_transition`; `resample=True` needs a masking process
        (one with a `mask_id`, e.g. Absorbing).
      schedule: gives σ̄(t) (and `move_prob`/`alpha` for resampling).
      resample: enforce BD3-LM's realised-fraction rule per block (see below).
      bounds: (β_l, β_u) for the rule; default `time_bounds(schedule, sampling_eps)`, i.e. the
        clipping interval of a `Clipped` schedule, and (sampling_eps, 1) otherwise. Python floats
        are checked eagerly (an empty allowed range raises ValueError). Traced scalars (e.g. the
        clip search's interval inside a jitted step) are supported: the rule is evaluated in the
        graph, and an empty allowed range falls back to no resampling for that call.
      keep_first: position 0 is never corrupted (BD3-LM `ignore_bos`). As in the reference this
        is applied after resampling, so block 0's realised fraction may end up one token below
        the lower bound.

    Without `resample` this is `corrupt(key, x0, block_times(t_blocks, Lb), …)`.

    With `resample`, each block's masks are iid Bernoulli(p_b), p_b = move_prob(t_b), conditioned
    on the masked count c lying in `resample_count_range(Lb, bounds)` (the BD3-LM rule, with its
    exceptions: β_l == 1e-3 → upper bound only, β_u == 1 → lower bound only). The reference
    redraws failing blocks until they pass — a data-dependent loop. We sample the same law
    directly with static shapes and no iteration cap: conditioned on its count, an iid Bernoulli
    mask is a uniformly random subset of that size, so we (1) draw c from Binomial(Lb, p_b)
    truncated to the allowed range (`_masked_counts`), then (2) mask the positions whose rank in
    an independent uniformly random permutation of the block is < c. This is exact (no
    max-iterations fallback that would bias rare blocks) and costs O(L log Lb) per sequence. If no
    count is allowed the call raises ValueError (see `resample_count_range`). When neither bound is
    enforced (e.g. bounds (1e-3, 1)) nothing is resampled, as in the reference (with traced
    bounds the direct sampler then runs with the full range 0..Lb: the same law, another stream).

    Returns: (B, L) x_t, same dtype as x0.
    """
    x0 = jnp.asarray(x0)
    t_blocks = jnp.asarray(t_blocks)
    length = x0.shape[-1]
    k = _num_blocks(length, block_size)
    if t_blocks.shape[-1] != k:
        raise ValueError(f"t_blocks has {t_blocks.shape[-1]} blocks on its last axis but "
                         f"L={length} with block_size={block_size} needs K={k}")
    if bounds is None:
        bounds = time_bounds(schedule, sampling_eps)
    if len(bounds) != 2:
        raise ValueError(f"bounds must be (beta_l, beta_u), got {bounds!r}")
    static_bounds = all(_is_concrete(b) for b in bounds)
    if static_bounds:
        beta_l, beta_u = (float(b) for b in bounds)
        enforced = any(_enforced(beta_l, beta_u))
    else:
        enforced = True  # decided in the graph: unenforced bounds give the full range 0..Lb
    if not (resample and enforced):
        return corrupt(key, x0, block_times(t_blocks, block_size), process, schedule,
                       keep_first=keep_first)

    mask_id = getattr(process, "mask_id", None)
    if mask_id is None:
        raise ValueError(f"resample=True needs a masking process with a mask_id (e.g. "
                         f"Absorbing), got {type(process).__name__}")
    if static_bounds:
        c_min, c_max = resample_count_range(block_size, (beta_l, beta_u))
        c_min, c_max = jnp.int32(c_min), jnp.int32(c_max)
    else:
        c_min, c_max = _traced_count_range(block_size, *bounds)
    return _corrupt_resampled(key, x0, t_blocks, c_min, c_max,
                              block_size=block_size, mask_id=int(mask_id),
                              schedule=_noise_of(schedule),
                              keep_first=bool(keep_first))


def _traced_count_range(block_size: int, beta_l, beta_u) -> tuple[Array, Array]:
    """`resample_count_range` for traced bounds: int32 scalars (c_min, c_max).

    Same rule and tolerances, computed in float32 in the graph. An empty range cannot raise
    here; it falls back to the full range 0..Lb (no resampling).
    """
    beta_l = jnp.asarray(beta_l, jnp.float32)
    beta_u = jnp.asarray(beta_u, jnp.float32)
    lower = jnp.abs(beta_l - _UNENFORCED_LOWER) > _BOUND_TOL * jnp.maximum(
        jnp.abs(beta_l), _UNENFORCED_LOWER)
    upper = jnp.abs(beta_u - _UNENFORCED_UPPER) > _BOUND_TOL * jnp.maximum(
        jnp.abs(beta_u), _UNENFORCED_UPPER)
    # c / Lb ≥ β_l − tol  ⇔  c ≥ Lb (β_l − tol);  c / Lb ≤ β_u + tol  ⇔  c ≤ Lb (β_u + tol)
    c_min = jnp.where(lower, jnp.ceil(block_size * (beta_l - _BOUND_TOL)), 0.0)
    c_max = jnp.where(upper, jnp.floor(block_size * (beta_u + _BOUND_TOL)), float(block_size))
    c_min = jnp.clip(c_min, 0, block_size).astype(jnp.int32)
    c_max = jnp.clip(c_max, 0, block_size).astype(jnp.int32)
    empty = c_min > c_max
    return jnp.where(empty, 0, c_min), jnp.where(empty, block_size, c_max)


@functools.partial(jax.jit, static_argnames=("block_size", "mask_id", "schedule", "keep_first"))
def _corrupt_resampled(key, x0, t_blocks, c_min, c_max, *, block_size, mask_id, schedule,
                       keep_first):
    k = t_blocks.shape[-1]
    t_blocks = jnp.broadcast_to(t_blocks, x0.shape[:-1] + (k,))
    move = jnp.asarray(schedule.move_prob(t_blocks), jnp.float32)
    keep = jnp.asarray(schedule.alpha(t_blocks), jnp.float32)
    # One draw of random bits per block (a single threefry call keeps compiles short):
    # Lb + 1 Gumbel variates for the count, then two 32-bit sort keys per position.
    lb = block_size
    bits = jax.random.bits(key, t_blocks.shape + (3 * lb + 1,), jnp.uint32)
    count = _masked_counts(bits[..., :lb + 1], move, keep, lb, c_min, c_max)  # (..., K)
    ranks = jnp.broadcast_to(jnp.arange(lb, dtype=jnp.int32), t_blocks.shape + (lb,))
    ranks = _random_permutation(bits[..., lb + 1:2 * lb + 1], bits[..., 2 * lb + 1:], ranks)
    masked = (ranks < count[..., None]).reshape(x0.shape)
    xt = jnp.where(masked, jnp.asarray(mask_id, x0.dtype), x0)
    return _restore_first(xt, x0, keep_first)
