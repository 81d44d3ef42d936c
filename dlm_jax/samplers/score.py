"""Reverse-CTMC samplers for score (SEDD) and x0 (CTMC) denoisers, as pure jitted functions.

Two families, both model-agnostic (they take the denoiser's function, so an exact oracle of a tiny
known distribution can drive them):

  * `sedd_sample`: Lou et al. (2024), "Discrete Diffusion Modeling by Estimating the Ratios of the
    Data Distribution", §4.2. From the log-ratios s_θ(x_t)[i, y] ≈ log p_t(x_t^{i←y}) / p_t(x_t):
      - "euler": τ-leaping with the reverse rate R̄_t(x, y) = σ(t) Q[y, x^i] s_θ(x_t)[i, y]
        (their eq. 17): each position moves from δ_{x^i} + Δt·R̄_t(x^i, ·);
      - "analytic" (Tweedie τ-leaping, their eq. 19, Thm 4.2): each position is drawn from
            p(x_s^i = y) ∝ [exp(−Δσ̄ Q)ᵀ s_θ]_y · exp(Δσ̄ Q)[y, x_t^i],   Δσ̄ = σ̄(t) − σ̄(s),
        which with the exact ratios is the exact one-token reverse transition q(x_s^i | x_t);
      - a final denoising step: the same Tweedie formula from t = eps to σ̄ = 0 (Δσ̄ = σ̄(eps)),
        the mask excluded for an absorbing process, so no masks remain.
  * `ctmc_sample`: Campbell et al. (2022), "A Continuous Time Framework for Discrete Denoising
    Models", §4 (τ-leaping, predictor–corrector). The reverse rate comes from the x0-denoiser,
        R̂_t(x, x^{i←y}) = σ(t) Q[y, x^i] Σ_{x0} p_θ(x0^i | x) q_{t|0}(y | x0) / q_{t|0}(x^i | x0),
    and each position takes a Poisson number of jumps over the step h; a position that receives
    more than one jump keeps its value (categorical data: adding jumps is meaningless), so
        P(→ y) = hR̂_y e^{−hλ},  P(stay) = 1 − hλ e^{−hλ},  λ = Σ_{y≠x^i} R̂_y.
    The corrector (their §4) runs τ-leaps of the rate R_t + R̂_t (forward + reverse), for which
    p_t is stationary. A final step draws each position from p_θ(x0^i | x) at t = eps.

Conventions (`dlm_jax.processes.transitions`): row-convention rates, Q[i, j] = rate i → j;
processes provide `likelihood`, `staggered_score`, `reverse_rate`, `limit_probs`; schedules
`sigma_bar(t)` and `sigma(t)`. Time runs on the grid linspace(1, eps, steps + 1).

RNG: `keys` is a (B,) array of typed keys, one per sequence. Row i draws its start from
fold_in(key_i, 0), step n ∈ [0, steps) from fold_in(key_i, n + 1) (inside it, the predictor from
fold_in(·, 0) and corrector j from fold_in(·, j + 1)) and the final step from
fold_in(key_i, steps + 1); every draw is vmapped over rows, so sample i does not depend on the
batch it is drawn in. Every draw goes through `categorical` (exact in float32).

Shapes: B batch, L length, S states (`process.num_states`, the mask included for absorbing).
Denoiser functions: `log_score` (xt (B, L) int32, σ̄ (B,)) -> (B, L, S) log-ratios, 0 at
y = x_t^i; `x0_probs` (xt, σ̄ (B,)) -> (B, L, S) probabilities p_θ(x0^i | x_t). They are static
arguments of `jax.jit`: pass the same function object to reuse a compilation.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser
from dlm_jax.objectives.ctmc import rate_out, x0_reverse_rate
from dlm_jax.samplers import categorical
from dlm_jax.samplers.steps import row_keys

Array = jax.Array

PREDICTORS = ("analytic", "euler")
# exp(log-ratio) is capped at e^60 so that inf · 0 cannot turn a step into NaN; true ratios stay
# far below (an absorbing unmasking ratio at σ̄ = 1e-5 is about e^11.5).
_MAX_LOG_SCORE = 60.0


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_common(keys, length, steps, eps, sampler: str) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"{sampler}: steps must be an integer >= 1, got {steps!r}")
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise ValueError(f"{sampler}: length must be an integer >= 1, got {length!r}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"{sampler}: eps must lie in (0, 1), got {eps!r}")
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.ndim != 1:
        raise ValueError(f"{sampler}: keys must be a (B,) array of typed keys "
                         f"(jax.random.split(jax.random.key(seed), B)), got dtype {keys.dtype} "
                         f"and shape {keys.shape}")
    return keys.shape[0]


def _check_tokens(x, batch: int, length: int, name: str) -> Array:
    x = jnp.asarray(x)
    if x.shape != (batch, length):
        raise ValueError(f"{name} must have shape (B, L) = {(batch, length)}, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer tokens, got dtype {x.dtype}")
    return x.astype(jnp.int32)


def _check_clamp(clamp, batch: int, length: int, clean_clamp: bool,
                 sampler: str) -> tuple[Array, Array] | None:
    if clean_clamp and clamp is None:
        raise ValueError(f"{sampler}: clean_clamp=True needs clamp=(positions, tokens)")
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError("clamp must be a pair (positions (B, L) bool, tokens (B, L) int)")
    pos = jnp.asarray(clamp[0])
    if pos.shape != (batch, length) or pos.dtype != jnp.bool_:
        raise ValueError(f"clamp positions must be a (B, L) = {(batch, length)} bool array, got "
                         f"{pos.shape} {pos.dtype}")
    return pos, _check_tokens(clamp[1], batch, length, "clamp tokens")


# --------------------------------------------------------------------------------------------
# Per-step pieces (pure; shapes (B, L, S))
# --------------------------------------------------------------------------------------------
def _draw(keys: Array, weights: Array, x: Array) -> Array:
    """One draw per position from unnormalised weights (B, L, S), row i from keys[i] only.

    Negative weights count as 0 (an Euler step with a large Δt, an imperfect model); a position
    whose weights are all ≤ 0 (or NaN) keeps its token.
    """
    weights = weights.astype(jnp.float32)
    positive = weights > 0
    log_w = jnp.where(positive, jnp.log(jnp.where(positive, weights, 1.0)), -jnp.inf)

    def row(key, lw):
        # The exponential race of `categorical.sample_probs`, with the row's noise drawn as one
        # flat vector (the same law; it compiles markedly faster than an (L, S) draw).
        noise = categorical.gumbel(key, (lw.size,)).reshape(lw.shape)
        return jnp.argmax(lw + noise, axis=-1).astype(jnp.int32)

    drawn = jax.vmap(row)(keys, log_w)
    return jnp.where(positive.any(-1), drawn, x)


def _score(log_score: Array) -> Array:
    return jnp.exp(jnp.minimum(log_score.astype(jnp.float32), _MAX_LOG_SCORE))


def tweedie_weights(process, x: Array, score: Array, dsigma) -> Array:
    """Tweedie τ-leaping weights (Lou et al. 2024, eq. 19): [exp(−Δσ̄Q)ᵀ s]_y · q_Δσ̄(x^i | y).

    x (B, L) int; score (B, L, S) ratios s[i, y] ≈ p_t(x^{i←y}) / p_t(x) with s[i, x^i] = 1;
    dsigma Δσ̄ = σ̄(t) − σ̄(s): scalar, (B,) or (B, L). Returns (B, L, S) unnormalised weights
    (negative entries are possible with an imperfect score; `_draw` treats them as 0). With the
    exact ratios this is p(x_s^i = y | x_t = x) for a single position.
    """
    d = jnp.asarray(dsigma, jnp.float32)
    d = jnp.broadcast_to(d.reshape(d.shape + (1,) * (x.ndim - d.ndim)), x.shape)
    return process.staggered_score(score, d) * process.likelihood(x, d)


def euler_weights(process, x: Array, score: Array, rate_dt) -> Array:
    """Euler τ-leaping weights (Lou et al. 2024, eq. 17): δ_{x^i} + σ(t)Δt · R̄(x^i, ·).

    R̄[y] = Q[y, x^i] s[i, y] (y ≠ x^i), R̄[x^i] = −Σ_{y≠x^i} R̄[y] (`process.reverse_rate`).
    rate_dt σ(t)·Δt: scalar or (B,). Returns (B, L, S); the stay entry may be negative.
    """
    h = jnp.asarray(rate_dt, jnp.float32)
    h = h.reshape(h.shape + (1,) * (x.ndim + 1 - h.ndim))
    hot = jax.nn.one_hot(x, process.num_states, dtype=jnp.float32)
    return hot + h * process.reverse_rate(x, score).astype(jnp.float32)


def leap_weights(x: Array, rates: Array, h) -> Array:
    """One τ-leap per position with multiple jumps rejected (Campbell et al. 2022, §4).

    rates (B, L, S): jump rates out of x^i (the entry at x^i and negative entries are ignored);
    h: step length, scalar or (B,). With λ = Σ_{y≠x^i} rates[y] the number of jumps over h is
    Poisson(hλ); exactly one jump lands on y with probability h·rates[y]·e^{−hλ}, otherwise
    (none, or several, which have no meaning for categorical tokens) the token stays. Returns the
    normalised (B, L, S) probabilities.
    """
    num_states = rates.shape[-1]
    own = jax.nn.one_hot(x, num_states, dtype=jnp.float32)
    off = jnp.where(own > 0, 0.0, jnp.maximum(rates.astype(jnp.float32), 0.0))
    h = jnp.asarray(h, jnp.float32)
    h = h.reshape(h.shape + (1,) * (x.ndim + 1 - h.ndim))
    total = h * off.sum(-1, keepdims=True)                     # hλ
    one_jump = h * off * jnp.exp(-total)
    return one_jump + own * (1.0 - total * jnp.exp(-total))


def _noise_arg(batch: int, clamp, sigma_bar) -> Array:
    """The denoiser's noise argument: σ̄ per sequence (B,), or per token (B, L) with 0 at the
    clamped positions when `clamp` is given (`clean_clamp`)."""
    sb = jnp.full((batch,), sigma_bar, jnp.float32)
    if clamp is None:
        return sb
    return jnp.where(clamp[0], 0.0, sb[:, None])


def _apply_clamp(x: Array, clamp) -> Array:
    return x if clamp is None else jnp.where(clamp[0], clamp[1], x)


def _start(process, keys: Array, length: int, init, clamp) -> Array:
    """x at t = 1: `init`, or a draw from the process's limit per row (fold_in(key_i, 0))."""
    if init is None:
        batch = keys.shape[0]
        limit = jnp.broadcast_to(jnp.asarray(process.limit_probs(), jnp.float32),
                                 (batch, length, process.num_states))
        init = _draw(row_keys(keys, 0), limit, jnp.zeros((batch, length), jnp.int32))
    return _apply_clamp(init, clamp)


def _grid(eps: float, steps: int) -> tuple[Array, Array]:
    """Times t_n = linspace(1, eps, steps + 1)[n] and the next times s_n = t_{n+1}, (steps,)."""
    ts = jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32)
    return ts[:-1], ts[1:]


# --------------------------------------------------------------------------------------------
# SEDD
# --------------------------------------------------------------------------------------------
def sedd_sample(denoiser_fn, process, schedule, keys: Array, length: int, *, steps: int,
                predictor: str = "analytic", denoise: bool = True, eps: float = 1e-5,
                init: Array | None = None, clamp: tuple[Array, Array] | None = None,
                clean_clamp: bool = False) -> Array:
    """SEDD's sampler (Lou et al. 2024, §4.2): predictor steps on linspace(1, eps, steps + 1).

    Args:
      denoiser_fn: a `Denoiser` of kind "log_score", or its function
        (xt (B, L) int32, σ̄ (B,)) -> (B, L, S) log s_θ, 0 at y = x_t^i.
      process: the forward process (Absorbing, Uniform, MatrixProcess).
      schedule: the noise schedule (σ̄(t), σ(t)).
      keys: (B,) typed keys, one per sequence.
      length: L.
      steps: number of predictor steps (static).
      predictor: "analytic" (Tweedie τ-leaping, eq. 19) or "euler" (τ-leaping, eq. 17). Step n
        goes from t to s = t − Δt with Δσ̄ = σ̄(t) − σ̄(s); the score is taken at σ̄(t).
      denoise: finish with the Tweedie step from σ̄(eps) to 0 with the mask excluded (absorbing).
      eps: the last time of the grid.
      init: optional (B, L) tokens at t = 1 instead of a draw from the process's limit.
      clamp: optional (positions (B, L) bool, tokens (B, L) int): these tokens are written before
        every step and on the output (prompts, infilling; SEDD eq. 22: the ratios on the free
        positions given the clamped ones are the joint ratios). The denoiser sees the clamped
        tokens at the sequence's noise level, which conditions exactly for an absorbing process
        (an unmasked token at time t is its clean value). For a uniform process it conditions on
        the clamped tokens as if they were noisy observations at time t, which biases the free
        positions at any number of steps (≈ 0.09 in total variation on a 3-token test); use
        `clean_clamp` there.
      clean_clamp: call the denoiser with per-token noise σ̄ (B, L), 0 at the clamped positions
        (they are clean data): then the ratios on the free positions are those of the noised
        conditional p_t(x^free | x_0^clamped), exact for any process. Needs a denoiser that
        honours per-token noise (the block models do) and `clamp`.
    Returns:
      (B, L) int32 samples.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {list(PREDICTORS)}")
    fn = Denoiser.function(denoiser_fn, "log_score", "sedd_sample: denoiser_fn")
    batch = _check_common(keys, length, steps, eps, "sedd_sample")
    init = None if init is None else _check_tokens(init, batch, length, "init")
    clamp = _check_clamp(clamp, batch, length, clean_clamp, "sedd_sample")
    return _sedd_run(fn, process, schedule, int(length), int(steps), predictor, bool(denoise),
                     float(eps), bool(clean_clamp), keys, init, clamp)


@functools.partial(jax.jit, static_argnums=tuple(range(9)))
def _sedd_run(fn, process, schedule, length, steps, predictor, denoise, eps, clean_clamp, keys,
              init, clamp):
    x = _start(process, keys, length, init, clamp)
    noise = functools.partial(_noise_arg, keys.shape[0], clamp if clean_clamp else None)

    def step(x, inputs):
        n, t, s = inputs
        sb_t = schedule.sigma_bar(t)
        score = _score(fn(x, noise(sb_t)))
        if predictor == "analytic":
            w = tweedie_weights(process, x, score, sb_t - schedule.sigma_bar(s))
        else:
            w = euler_weights(process, x, score, schedule.sigma(t) * (t - s))
        x = _draw(row_keys(keys, n + 1), w, x)
        return _apply_clamp(x, clamp), None

    t, s = _grid(eps, steps)
    x, _ = jax.lax.scan(step, x, (jnp.arange(steps, dtype=jnp.int32), t, s))
    if denoise:
        sb = schedule.sigma_bar(jnp.float32(eps))
        score = _score(fn(x, noise(sb)))
        w = tweedie_weights(process, x, score, sb)
        if process.mask_id is not None:  # to σ̄ = 0: nothing may stay masked
            w = w.at[..., process.mask_id].set(0.0)
        x = _apply_clamp(_draw(row_keys(keys, steps + 1), w, x), clamp)
    return x


# --------------------------------------------------------------------------------------------
# CTMC (Campbell et al. 2022)
# --------------------------------------------------------------------------------------------
def _reverse_rates(process, fn, noise, x: Array, sigma_bar, sigma) -> Array:
    """R̂_t(x, x^{i←·}) (B, L, S) from the x0-denoiser at σ̄(t) (`objectives.ctmc` eq. (2))."""
    probs = fn(x, noise(sigma_bar)).astype(jnp.float32)
    return x0_reverse_rate(process, probs, x, sigma_bar, sigma)


def ctmc_sample(x0_probs_fn, process, schedule, keys: Array, length: int, *, steps: int,
                corrector_steps: int = 0, corrector_size: float = 1.0,
                corrector_entry: float = 1.0, denoise: bool = True, eps: float = 1e-5,
                init: Array | None = None, clamp: tuple[Array, Array] | None = None,
                clean_clamp: bool = False) -> Array:
    """τ-leaping predictor–corrector sampler of Campbell et al. (2022, §4) with an x0-denoiser.

    Step n goes from t to s = t − h on linspace(1, eps, steps + 1): every position takes one
    τ-leap (`leap_weights`) of the reverse rate R̂_t built from p_θ(x0 | x_t) at σ̄(t). Then, when
    s ≤ `corrector_entry`, `corrector_steps` τ-leaps of length `corrector_size`·h with the rate
    R_s + R̂_s (forward σ(s)Q plus reverse, both at time s), which leaves p_s invariant.

    Args:
      x0_probs_fn: a `Denoiser` of kind "x0_probs", or its function
        (xt (B, L) int32, σ̄ (B,)) -> (B, L, S) probabilities p_θ(x0^i | x_t).
      process, schedule, keys, length, eps, init, clamp, clean_clamp: as in `sedd_sample` (the
        clamped tokens are written after every predictor and corrector step and on the output).
      steps: predictor steps (static).
      corrector_steps: corrector τ-leaps after each predictor step (static; 0: none).
      corrector_size: corrector step length in units of h (Campbell et al. use 1.5).
      corrector_entry: correct only once s ≤ this time (Campbell et al. use 0.1; 1: always).
      denoise: finish by drawing every position from p_θ(x0^i | x) at σ̄(eps) (masked positions
        only, for an absorbing process); otherwise the tokens at t = eps are returned.
    Returns:
      (B, L) int32 samples.
    """
    fn = Denoiser.function(x0_probs_fn, "x0_probs", "ctmc_sample: x0_probs_fn")
    batch = _check_common(keys, length, steps, eps, "ctmc_sample")
    if (isinstance(corrector_steps, bool) or int(corrector_steps) != corrector_steps
            or corrector_steps < 0):
        raise ValueError(f"ctmc_sample: corrector_steps must be an integer >= 0, got "
                         f"{corrector_steps!r}")
    if not float(corrector_size) > 0.0:
        raise ValueError(f"ctmc_sample: corrector_size must be > 0, got {corrector_size!r}")
    init = None if init is None else _check_tokens(init, batch, length, "init")
    clamp = _check_clamp(clamp, batch, length, clean_clamp, "ctmc_sample")
    return _ctmc_run(fn, process, schedule, int(length), int(steps), int(corrector_steps),
                     float(corrector_size), float(corrector_entry), bool(denoise), float(eps),
                     bool(clean_clamp), keys, init, clamp)


@functools.partial(jax.jit, static_argnums=tuple(range(11)))
def _ctmc_run(fn, process, schedule, length, steps, corrector_steps, corrector_size,
              corrector_entry, denoise, eps, clean_clamp, keys, init, clamp):
    x = _start(process, keys, length, init, clamp)
    noise = functools.partial(_noise_arg, keys.shape[0], clamp if clean_clamp else None)

    def correct(x, step_keys, s, h):
        sb_s, sg_s = schedule.sigma_bar(s), schedule.sigma(s)

        def one(x, j):
            rates = _reverse_rates(process, fn, noise, x, sb_s, sg_s)
            rates = rates + sg_s * rate_out(process, x).astype(jnp.float32)
            keys_j = jax.vmap(lambda k: jax.random.fold_in(k, j + 1))(step_keys)
            x = _draw(keys_j, leap_weights(x, rates, corrector_size * h), x)
            return _apply_clamp(x, clamp), None

        return jax.lax.scan(one, x, jnp.arange(corrector_steps, dtype=jnp.int32))[0]

    def step(x, inputs):
        n, t, s = inputs
        step_keys = row_keys(keys, n + 1)
        rates = _reverse_rates(process, fn, noise, x, schedule.sigma_bar(t), schedule.sigma(t))
        keys_p = jax.vmap(lambda k: jax.random.fold_in(k, 0))(step_keys)
        x = _apply_clamp(_draw(keys_p, leap_weights(x, rates, t - s), x), clamp)
        if corrector_steps and corrector_entry >= 1.0:  # every step: no branch to compile
            x = correct(x, step_keys, s, t - s)
        elif corrector_steps:
            x = jax.lax.cond(s <= corrector_entry, lambda x: correct(x, step_keys, s, t - s),
                             lambda x: x, x)
        return x, None

    t, s = _grid(eps, steps)
    x, _ = jax.lax.scan(step, x, (jnp.arange(steps, dtype=jnp.int32), t, s))
    if denoise:
        probs = fn(x, noise(schedule.sigma_bar(jnp.float32(eps)))).astype(jnp.float32)
        if process.mask_id is not None:
            probs = probs.at[..., process.mask_id].set(0.0)
        x0 = _draw(row_keys(keys, steps + 1), probs, x)
        # Under a masking process an unmasked token is its clean value: only masks are drawn.
        x = x0 if process.mask_id is None else jnp.where(x == process.mask_id, x0, x)
        x = _apply_clamp(x, clamp)
    return x
