"""The continuous-time (CTMC) ELBO with an x0-parameterised reverse rate (Campbell et al., 2022).

Notation follows seed 002 §"Continuous Time Framework" and research/sedd_d3pm.md §8, in the
project's **row convention** (design.md): per token, the forward rate is R_t = σ(t)·Q with
Q[i, j] the rate i → j, q_{t|0}(x|x0) = expm(σ̄(t) Q)[x0, x]. A sequence x ∈ {0..S-1}^L
diffuses independently per position (eq. 3.12), so only single-position jumps have a rate
(eq. 3.16): R_t(x, x^{d←y}) = σ Q[x^d, y], with exit rate Z_t(x) = Σ_d σ·(-Q[x^d, x^d]).

**Reverse rate, eq. (3.20).** With a denoiser p_θ(x0^d | x) per position,

    R̂^θ_t(x, x^{d←y}) = R_t(y, x^d) Σ_{x0} p_θ(x0 | x)_d q_{t|0}(y|x0) / q_{t|0}(x^d|x0),  y ≠ x^d,

i.e. σ·Q[y, x^d]·ŝ(y) where ŝ(y) = Σ_{x0} p_θ(x0) q(y|x0)/q(x^d|x0) is the concrete score the
denoiser implies (`score_from_x0`; exactly p_t(y)/p_t(x^d) for the true posterior). Terms with
q(x^d|x0) = 0 are dropped: such x0 cannot have produced x (the true posterior gives them 0).

**Bound, eq. (3.11)/(3.18) and its multi-dimensional form (3.29).** For one data point x0,

    -log p_θ(x0) ≤ KL(q_{T|0}(·|x0) ‖ p_ref)
                   + ∫_0^T dt E_{x~q_{t|0}(·|x0)} [ Σ_{x'≠x} R̂^θ_t(x, x')
                                                    - Z_t(x) E_{x̃~r_t(·|x)} log R̂^θ_t(x̃, x) ]  + C(x0),
    r_t(x̃|x) = R_t(x, x̃) / Z_t(x)   (x̃ ≠ x: one position changes, eq. 3.19).

The seed leaves C as "+C". It is the θ-free part of log dQ^{x0}/dP^θ over paths (the
reference-path term of eq. 3.5). Written with the same expectations it is

    C(x0) = ∫_0^T dt E_x [ -Z_t(x) + Z_t(x) E_{x̃~r_t} log R̂^{x0}_t(x̃, x) ],
    R̂^{x0}_t(x̃, x) = R_t(x, x̃) q_{t|0}(x|x0) / q_{t|0}(x̃|x0)   (the reverse rate given x0),

so C contains the forward-rate terms Z_t(x)·log R_t(x, x̃). With C included the right-hand side
is E_{Q^{x0}}[log dQ^{x0}/dP^θ] ≥ -log p_θ(x0), a true bound, ≥ 0 pointwise in t after
averaging over x (it is a generalised KL between reverse rates). Per (t, x, x̃) we therefore
compute

    integrand = Σ_{x'≠x} R̂^θ(x, x')  -  Z_t(x)
                + Z_t(x) · [ log R̂^{x0}(x̃, x) - log R̂^θ(x̃, x) ],

where the forward rate R_t(x, x̃) cancels inside the log-ratio. Everything is a sum over
positions d, so values are returned per token, (B, L); sum over L for the per-sequence value.
With the exact denoiser (true posterior marginals) the reverse rate is the true time reversal
(eq. 3.17) and, for every x0,

    ∫_{t0}^{1} E[integrand | x0] dt = KL(q_{t0|0}(·|x0) ‖ p_{t0}) - KL(q_{1|0}(·|x0) ‖ p_1),

which is -log p0(x0) when σ̄(t0) = 0 and q_{1|0}(·|x0) = p_1 (tests check this). Averaged over
x0 ~ p0 with σ̄(t0) = 0, the full bound (integral + E KL(q_{1|0}(·|x0) ‖ p_ref)) is
H(p0) + KL(p_1 ‖ p_ref); the time integral alone is H(p0) - E_{x0} KL(q_{1|0}(·|x0) ‖ p_1).

Functions:
  * `x0_reverse_rate`, `score_from_x0`: eq. (3.20).
  * `ctmc_elbo_given_xt`: the integrand at (t, x0, x_t) with the expectation over the jump
    x̃ ~ r_t(·|x_t) done exactly (sum over all L(S-1) neighbours; the model runs on each).
  * `ctmc_elbo_expected`: additionally the exact expectation over x_t ~ q_{t|0}(·|x0) by
    enumerating all S^L sequences (tiny problems).
  * `ctmc_nelbo_exact`: Gauss–Legendre quadrature over t of the above plus the prior KL.
  * `ctmc_elbo` (+ `sample_jump`, `ctmc_elbo_mc`): the training estimator of eq. (3.29). Given
    one sampled t, x ~ q_{t|0}(·|x0) and x̃ ~ r_t(·|x), the first term uses the model at x and the
    second the model at x̃, summing over *all* single-position predecessors x' of x̃ weighted by
    the exact posterior φ_t(x'|x̃, x0) ∝ q_{t|0}(x'|x0) R_t(x', x̃)/Z_t(x') (eqs. 3.23-3.28;
    tLDR's variance reduction, which is exact, not approximate, because φ is normalised over
    all predecessors).
  * `ctmc_prior_kl`: KL(q_{1|0}(·|x0^d) ‖ p_ref) per token.

`denoise_fn` everywhere maps `(xt (N, L) int, sigma_bar (N,)) -> x0_probs (N, L, S)`.
Values are per token (B, L); reduction is the caller's (design.md).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dlm_jax.processes.schedules import Schedule
from dlm_jax.processes.transitions import Absorbing, Process, Uniform

DenoiseFn = Callable[[Array, Array], Array]  # (xt (N, L), sigma_bar (N,)) -> (N, L, S)

MAX_ENUMERATED_STATES = 4096


# --- small helpers ------------------------------------------------------------------------------

def _per_token(v, shape: tuple[int, ...], dtype=None) -> Array:
    """Broadcast a scalar / (B,) / (B, L) noise value to `shape`, aligning leading axes."""
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(dtype or jnp.result_type(float))
    if v.ndim > len(shape):
        raise ValueError(f"noise of shape {v.shape} has more axes than tokens of shape {shape}")
    v = v.reshape(v.shape + (1,) * (len(shape) - v.ndim))
    try:
        return jnp.broadcast_to(v, shape)
    except ValueError as err:
        raise ValueError(f"noise of shape {v.shape} does not broadcast to tokens {shape}") from err


def _loss_dtype(x: Array):
    """At least float32 (bf16 model outputs are promoted; float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0; NaN-free in value and gradient."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _safe_log(x: Array) -> Array:
    """log x where x > 0, else 0 (for entries that carry zero weight)."""
    ok = x > 0
    return jnp.where(ok, jnp.log(jnp.where(ok, x, 1.0)), 0.0)


def _model_log(x: Array, on: Array) -> Array:
    """log x on the entries that carry weight (x = 0 there gives -inf: the bound is infinite),
    0 elsewhere; no NaN from the unused entries in value or gradient."""
    return jnp.where(on, jnp.log(jnp.where(on, x, 1.0)), 0.0)


def _rate_out(process: Process, x: Array) -> Array:
    """Q[x, ·], the rates out of x (..., S), diagonal included (row convention)."""
    if hasattr(process, "rate_out"):
        return process.rate_out(x)
    if isinstance(process, Uniform):
        return process.rate_into(x)  # Q is symmetric
    s = process.num_states
    hot = jax.nn.one_hot(x, s, dtype=jnp.result_type(float))
    if isinstance(process, Absorbing):
        out = jax.nn.one_hot(process.mask_id, s, dtype=hot.dtype) - hot
        return jnp.where((x == process.mask_id)[..., None], 0.0, out)
    return jnp.asarray(process.rate_matrix(), hot.dtype)[x]


def _exit_rates(process: Process) -> Array:
    """(S,) exit rate -Q[v, v] of every state v at unit noise rate."""
    s = process.num_states
    if isinstance(process, Uniform):
        return jnp.full((s,), 1.0 - 1.0 / s, jnp.result_type(float))
    if isinstance(process, Absorbing):
        return jnp.ones((s,), jnp.result_type(float)).at[process.mask_id].set(0.0)
    return -jnp.diagonal(jnp.asarray(process.rate_matrix(), jnp.result_type(float)))


def _check(process: Process, x0_probs: Array | None, xt: Array, name: str = "xt") -> None:
    if not jnp.issubdtype(xt.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer tokens, got dtype {xt.dtype}")
    if x0_probs is not None and x0_probs.shape != xt.shape + (process.num_states,):
        raise ValueError(f"x0_probs must have shape {name}.shape + (S,) = "
                         f"{xt.shape + (process.num_states,)}, got {x0_probs.shape}")


def _check_batch(x: Array, name: str) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be (B, L) integer tokens, got {x.shape} {x.dtype}")


# --- eq. (3.20) ---------------------------------------------------------------------------------

def score_from_x0(process: Process, x0_probs: Array, xt: Array, sigma_bar) -> Array:
    """The ratio the denoiser implies: ŝ(y) = Σ_{x0} p_θ(x0|x) q_{t|0}(y|x0) / q_{t|0}(x^d|x0).

    For the exact posterior p(x0|x) this is p_t(y)/p_t(x^d) (per position, given the rest). x0
    with q_{t|0}(x^d|x0) = 0 are dropped (they cannot have produced x^d).

    Args:
      process: forward process (S states).
      x0_probs: (..., S) denoiser probabilities p_θ(x0^d = · | x).
      xt: (...) int current tokens x^d.
      sigma_bar: integrated noise σ̄(t), broadcastable to xt from the left ((), (B,), (B, L)).
    Returns:
      (..., S) ratios ŝ; entry xt is Σ over the support of p_θ (1 for a valid denoiser).
    """
    _check(process, x0_probs, xt)
    x0_probs = x0_probs.astype(_loss_dtype(x0_probs))
    sb = _per_token(sigma_bar, xt.shape, x0_probs.dtype)
    lik = process.likelihood(xt, sb).astype(x0_probs.dtype)  # q(xt | x0 = ·)
    weights = _safe_div(x0_probs, lik)
    # Σ_{x0} w[x0] q(y|x0) = (expm(σ̄Q)ᵀ w)[y] = staggered_score(w, -σ̄): matrix-free.
    return process.staggered_score(weights, -sb)


def x0_reverse_rate(process: Process, x0_probs: Array, xt: Array, sigma_bar, sigma) -> Array:
    """Eq. (3.20): reverse rates out of x per position from an x0-denoiser.

    `out[..., d, y] = σ(t)·Q[y, x^d]·Σ_{x0} p_θ(x0|x)_d q(y|x0)/q(x^d|x0)` for y ≠ x^d (the
    rate of the reverse jump x → x^{d←y}); `out[..., d, x^d] = -Σ_{y≠x^d} out[..., d, y]`.

    Args:
      process: forward process; forward rate is σ(t)·Q (row convention).
      x0_probs: (B, L, S) p_θ(x0^d = · | x) (any leading shape works).
      xt: (B, L) int current state x.
      sigma_bar, sigma: σ̄(t) and σ(t); scalar, (B,) or (B, L).
    Returns:
      (B, L, S) rates, rows summing to 0. Finite whenever x0_probs is; absorbing real tokens
      get all-zero rows (Q[y, x] = 0 for y ≠ x).
    """
    ratio = score_from_x0(process, x0_probs, xt, sigma_bar)
    rate = _per_token(sigma, xt.shape, ratio.dtype)[..., None]
    return rate * process.reverse_rate(xt, ratio).astype(ratio.dtype)


# --- exact forms for tiny problems ----------------------------------------------------------------

def _neighbors(x: Array, num_states: int) -> Array:
    """(B, L) -> (B, L, S, L): [b, d, y] = x_b with position d set to y."""
    length = x.shape[1]
    y = jnp.arange(num_states, dtype=x.dtype)[None, None, :, None]
    return jnp.where(jnp.eye(length, dtype=bool)[None, :, None, :], y, x[:, None, None, :])


def ctmc_elbo_given_xt(process: Process, denoise_fn: DenoiseFn, x0: Array, xt: Array,
                       sigma_bar, sigma) -> tuple[Array, dict]:
    """Integrand of the bound at (t, x0, x_t), with E_{x̃~r_t(·|x_t)} summed exactly.

    Per position d (with x = x_t, R = σQ, q = q_{t|0}):

        value_d = Σ_{y≠x^d} R̂^θ(x, x^{d←y})  -  σ·(-Q[x^d, x^d])
                  + Σ_{y≠x^d} σQ[x^d, y] [log q(x^d|x0^d) - log q(y|x0^d) - log ŝ_{x^{d←y}}(x^d)]

    where σQ[x^d,y]·ŝ_{x^{d←y}}(x^d) = R̂^θ(x^{d←y}, x) is eq. (3.20) at the neighbour. The
    model runs at x and at all L·S neighbours. Positions with q(x^d|x0^d) = 0 (x_t impossible
    given x0) get finite but meaningless values; weight them by q(x_t|x0) = 0.

    Args:
      process: forward process.
      denoise_fn: (N, L) int, (N,) σ̄ -> (N, L, S) probabilities p_θ(x0^d | x).
      x0: (B, L) clean tokens; xt: (B, L) noisy tokens.
      sigma_bar, sigma: σ̄(t), σ(t) as scalars or (B,).
    Returns:
      values (B, L) per token, aux {"reverse_exit", "forward_exit", "log_rate_term"} — batch
      means of Σ_d of Σ_{x'≠x} R̂^θ(x, x'), Z_t(x), and Σ_{x̃} R_t(x, x̃) log R̂^θ(x̃, x), the
      raw terms of eq. (3.18) (the last is Z_t(x)·E_{x̃}[log R̂^θ(x̃, x)]).
    """
    _check_batch(x0, "x0")
    _check_batch(xt, "xt")
    if x0.shape != xt.shape:
        raise ValueError(f"x0 {x0.shape} and xt {xt.shape} must have the same shape")
    b, length = xt.shape
    s = process.num_states
    sb_b = _per_token(sigma_bar, (b,))
    sg = _per_token(sigma, (b, length))
    sb = _per_token(sigma_bar, (b, length))

    probs = denoise_fn(xt, sb_b)
    _check(process, probs, xt)
    rates = x0_reverse_rate(process, probs, xt, sb, sg)
    hot = jax.nn.one_hot(xt, s, dtype=rates.dtype)
    reverse_exit = -(rates * hot).sum(-1)                                   # (B, L)
    forward_exit = sg * _exit_rates(process).astype(rates.dtype)[xt]        # (B, L)

    nbrs = _neighbors(xt, s)                                                # (B, L, S, L)
    sb_nb = jnp.broadcast_to(sb_b[:, None, None], (b, length, s)).reshape(-1)
    probs_nb = denoise_fn(nbrs.reshape(-1, length), sb_nb).reshape(b, length, s, length, s)
    own = jnp.einsum("bdyls,dl->bdys", probs_nb, jnp.eye(length, dtype=probs_nb.dtype))
    y_grid = jnp.broadcast_to(jnp.arange(s, dtype=xt.dtype), (b, length, s))
    ratio_nb = score_from_x0(process, own, y_grid, sb[..., None])           # (B, L, S, S)
    back = jnp.take_along_axis(ratio_nb, xt[:, :, None, None], -1)[..., 0]  # ŝ_{x^{d←y}}(x^d)

    fwd = sg[..., None] * _rate_out(process, xt).astype(rates.dtype) * (1 - hot)  # R(x, x^{d←y})
    q0 = process.transition(x0, sb).astype(rates.dtype)                    # q(· | x0^d)
    q_cur = (q0 * hot).sum(-1, keepdims=True)                               # q(x^d | x0^d)
    on = fwd > 0
    log_back = _model_log(back, on)
    log_ratio = _safe_log(q_cur) - _safe_log(q0) - log_back
    cross = jnp.where(on, fwd * log_ratio, 0.0).sum(-1)
    values = reverse_exit - forward_exit + cross
    log_rate = jnp.where(on, fwd * (_safe_log(fwd) + log_back), 0.0).sum(-1)
    aux = {"reverse_exit": reverse_exit.sum(-1).mean(),
           "forward_exit": forward_exit.sum(-1).mean(),
           "log_rate_term": log_rate.sum(-1).mean()}
    return values, aux


def _all_sequences(num_states: int, length: int) -> Array:
    """(S^L, L) int32: every sequence, row-major order."""
    if num_states ** length > MAX_ENUMERATED_STATES:
        raise ValueError(f"enumerating S^L = {num_states}^{length} sequences exceeds "
                         f"{MAX_ENUMERATED_STATES}; use the Monte-Carlo estimator `ctmc_elbo`")
    grid = np.stack(np.meshgrid(*[np.arange(num_states)] * length, indexing="ij"), -1)
    return jnp.asarray(grid.reshape(-1, length), jnp.int32)


def ctmc_elbo_expected(process: Process, denoise_fn: DenoiseFn, x0: Array, sigma_bar, sigma
                       ) -> tuple[Array, dict]:
    """E_{x_t~q_{t|0}(·|x0)} E_{x̃~r_t(·|x_t)}[integrand], exactly, by enumerating all S^L x_t.

    Args:
      process, denoise_fn: as in `ctmc_elbo_given_xt`.
      x0: (B, L) clean tokens, S^L ≤ 4096.
      sigma_bar, sigma: σ̄(t), σ(t), scalars or (B,).
    Returns:
      values (B, L): the dt-integrand of the bound at time t for each x0 (per token; its sum
      over L is the per-sequence integrand), aux {"forward_exit": batch mean of E[Z_t(x_t)]}.
    """
    _check_batch(x0, "x0")
    b, length = x0.shape
    seqs = _all_sequences(process.num_states, length)                      # (K, L)
    k = seqs.shape[0]
    sb = _per_token(sigma_bar, (b,))
    sg = _per_token(sigma, (b,))
    x0_rep = jnp.repeat(x0, k, axis=0)
    xt_rep = jnp.tile(seqs, (b, 1))
    sb_rep, sg_rep = jnp.repeat(sb, k), jnp.repeat(sg, k)
    vals, _ = ctmc_elbo_given_xt(process, denoise_fn, x0_rep, xt_rep, sb_rep, sg_rep)
    q = process.transition(x0_rep, sb_rep[:, None])                        # (B·K, L, S)
    w = jnp.take_along_axis(q, xt_rep[..., None], -1)[..., 0].prod(-1)     # q(x_t | x0)
    vals = jnp.where(w[:, None] > 0, vals, 0.0)
    values = (w[:, None] * vals).reshape(b, k, length).sum(1)
    exits = sg[:, None] * _exit_rates(process)[xt_rep.reshape(b, k, length)].sum(-1)
    aux = {"forward_exit": (w.reshape(b, k) * exits).sum(1).mean()}
    return values, aux


def ctmc_prior_kl(process: Process, x0: Array, sigma_bar_final, ref_probs: Array | None = None
                  ) -> Array:
    """Prior term KL(q_{T|0}(·|x0^d) ‖ p_ref) per token, (B, L) (inf if p_ref misses mass).

    Args:
      process: forward process; p_ref defaults to `process.limit_probs()`.
      x0: (B, L) clean tokens.
      sigma_bar_final: σ̄(T) (may be inf for a log-linear schedule with eps = 0).
      ref_probs: optional (S,) reference distribution.
    """
    _check_batch(x0, "x0")
    ref = process.limit_probs() if ref_probs is None else jnp.asarray(ref_probs)
    q = process.transition(x0, _per_token(sigma_bar_final, x0.shape))
    ref = ref.astype(q.dtype)
    terms = jnp.where(q > 0, q * (_safe_log(q) - jnp.where(ref > 0, _safe_log(ref), -jnp.inf)),
                      0.0)
    return terms.sum(-1)


def ctmc_nelbo_exact(process: Process, schedule: Schedule, denoise_fn: DenoiseFn, x0: Array, *,
                     num_points: int = 128, t_min: float = 0.0, t_max: float = 1.0,
                     ref_probs: Array | None = None) -> tuple[Array, dict]:
    """The full bound per sequence for tiny problems: quadrature over t plus the prior KL.

        bound(x0) = ∫_{t_min}^{t_max} Σ_d E[integrand_d | x0] dt + Σ_d KL(q_{t_max|0}(·|x0^d) ‖ p_ref)

    The time integral uses `num_points` Gauss–Legendre nodes (no endpoint is evaluated, so
    σ̄(t_max) = inf is allowed). If σ̄(t_min) > 0 the bound is for x at noise σ̄(t_min), not x0.

    Returns:
      values (B,), aux {"integral": (B,), "prior": (B,)}.
    """
    _check_batch(x0, "x0")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    nodes, weights = np.polynomial.legendre.leggauss(num_points)
    dtype = jnp.result_type(float)
    ts = jnp.asarray(t_min + 0.5 * (t_max - t_min) * (nodes + 1.0), dtype)
    ws = jnp.asarray(0.5 * (t_max - t_min) * weights, dtype)

    def at_time(t):
        v, _ = ctmc_elbo_expected(process, denoise_fn, x0, schedule.sigma_bar(t),
                                  schedule.sigma(t))
        return v.sum(-1)

    per_t = jax.lax.map(at_time, ts)                                        # (P, B)
    integral = (ws[:, None] * per_t).sum(0)
    prior = ctmc_prior_kl(process, x0, schedule.sigma_bar(jnp.asarray(t_max, dtype)),
                          ref_probs).sum(-1)
    return integral + prior, {"integral": integral, "prior": prior}


# --- Monte-Carlo training estimator, eq. (3.29) ---------------------------------------------------

def sample_jump(key: Array, process: Process, xt: Array) -> Array:
    """Draw x̃ ~ r_t(·|x): one position d and value y ≠ x^d with probability ∝ Q[x^d, y].

    σ(t) cancels in r_t. Sequences with no possible jump (exit rate 0, e.g. all-mask under
    absorbing) are returned unchanged; `ctmc_elbo` gives them a zero jump term.

    Args:
      key: typed PRNG key.
      process: forward process.
      xt: (B, L) int tokens.
    Returns:
      (B, L) tokens x̃, same dtype.
    """
    _check_batch(xt, "xt")
    b, length = xt.shape
    s = process.num_states
    hot = jax.nn.one_hot(xt, s, dtype=bool)
    rates = jnp.where(hot, 0.0, _rate_out(process, xt)).reshape(b, length * s)
    logits = jnp.where(rates > 0, jnp.log(jnp.where(rates > 0, rates, 1.0)), -jnp.inf)
    idx = jax.random.categorical(key, logits, axis=-1)
    d, y = idx // s, (idx % s).astype(xt.dtype)
    jumped = xt.at[jnp.arange(b), d].set(y)
    return jnp.where((rates.sum(-1) > 0)[:, None], jumped, xt)


def ctmc_elbo(process: Process, x0_probs_xt: Array, x0_probs_jump: Array, x0: Array, xt: Array,
              x_jump: Array, sigma_bar, sigma) -> tuple[Array, dict]:
    """Eq. (3.29) integrand for one sample (x0, t, x_t ~ q_{t|0}, x̃ ~ r_t(·|x_t)), plus C.

    Per position d (R = σQ, q = q_{t|0}(·|x0), Z = exit rates):

        value_d = Σ_{y≠x^d} R̂^θ(x, x^{d←y})  -  Z^d(x^d)                       [model at x]
                  + Σ_{v≠x̃^d} φ_{d,v} Z(x̃^{d←v}) [log R̂^{x0}(x̃, v) - log R̂^θ(x̃, v)]   [model at x̃]

    with φ_{d,v} ∝ q(v|x0^d)/q(x̃^d|x0^d) · Q[v, x̃^d] / Z(x̃^{d←v}) normalised over all (d, v):
    the exact posterior of the pre-jump state given x̃ (eqs. 3.24-3.27), and
    log R̂^{x0}(x̃, v) - log R̂^θ(x̃, v) = log q(v|x0^d) - log q(x̃^d|x0^d) - log ŝ_{x̃,d}(v). The
    first line is eq. (3.29)'s first term with C's -Z_t(x); the second is its second term with
    C's Z·log R̂^{x0}. Its expectation over x_t and x̃ equals `ctmc_elbo_expected`'s values; the
    mean over t ~ U(0, T) times T estimates the time integral of the bound. If Z(x) = 0 there is
    no jump and the second line is 0.

    Args:
      process: forward process.
      x0_probs_xt: (B, L, S) p_θ(x0 | x_t).
      x0_probs_jump: (B, L, S) p_θ(x0 | x̃). (tLDR's `one_forward_pass` reuses the model output
        at x̃ for the first term too; that saves a call but biases the estimate, so it is not
        done here.)
      x0, xt, x_jump: (B, L) int tokens.
      sigma_bar, sigma: σ̄(t), σ(t): scalar, (B,) or (B, L).
    Returns:
      values (B, L) per token, aux {"reverse_exit", "forward_exit", "jump_term"} (batch means of
      per-sequence sums).
    """
    for name, arr in (("x0", x0), ("xt", xt), ("x_jump", x_jump)):
        _check_batch(arr, name)
    if not x0.shape == xt.shape == x_jump.shape:
        raise ValueError(f"x0 {x0.shape}, xt {xt.shape}, x_jump {x_jump.shape} must match")
    _check(process, x0_probs_xt, xt)
    _check(process, x0_probs_jump, x_jump, "x_jump")
    s = process.num_states
    dtype = _loss_dtype(x0_probs_xt)
    x0_probs_xt, x0_probs_jump = x0_probs_xt.astype(dtype), x0_probs_jump.astype(dtype)
    shape = xt.shape
    sb, sg = _per_token(sigma_bar, shape, dtype), _per_token(sigma, shape, dtype)
    exit_q = _exit_rates(process).astype(dtype)                             # (S,)

    # First term (model at x) and C's -Z_t(x).
    rates = x0_reverse_rate(process, x0_probs_xt, xt, sb, sg)
    reverse_exit = -(rates * jax.nn.one_hot(xt, s, dtype=dtype)).sum(-1)
    forward_exit = sg * exit_q[xt]
    has_jump = (exit_q[xt].sum(-1) > 0)[:, None]                           # (B, 1)

    # Second term (model at x̃) with C's Z·log R̂^{x0}: sum over predecessors v at each d.
    hot_j = jax.nn.one_hot(x_jump, s, dtype=dtype)
    q0 = process.transition(x0, sb).astype(dtype)                           # q(v | x0^d)
    q_cur = (q0 * hot_j).sum(-1, keepdims=True)                             # q(x̃^d | x0^d)
    into = process.rate_into(x_jump).astype(dtype) * (1 - hot_j)            # Q[v, x̃^d]
    z_pred = (exit_q[x_jump].sum(-1)[:, None, None] - exit_q[x_jump][..., None]
              + exit_q[None, None, :])                                      # Z(x̃^{d←v}) / σ
    w = _safe_div(into * _safe_div(q0, q_cur), z_pred)
    phi = _safe_div(w, w.sum((-2, -1), keepdims=True))
    ratio = score_from_x0(process, x0_probs_jump, x_jump, sb)               # ŝ_{x̃,d}(v)
    on = phi > 0
    log_ratio = _safe_log(q0) - _safe_log(q_cur) - _model_log(ratio, on)
    jump = jnp.where(on, phi * sg[..., None] * z_pred * log_ratio, 0.0).sum(-1)
    jump = jnp.where(has_jump, jump, 0.0)

    values = reverse_exit - forward_exit + jump
    aux = {"reverse_exit": reverse_exit.sum(-1).mean(),
           "forward_exit": forward_exit.sum(-1).mean(),
           "jump_term": jump.sum(-1).mean()}
    return values, aux


def ctmc_elbo_mc(key: Array, denoise_fn: DenoiseFn, x0: Array, *, process: Process,
                 schedule: Schedule, t_min: float = 0.0, t: Array | None = None
                 ) -> tuple[Array, dict]:
    """One-sample training loss: t ~ U(t_min, 1) per sequence, x_t, x̃, two model calls.

    Returns (1 - t_min)·`ctmc_elbo` values, so the mean over keys estimates
    ∫_{t_min}^1 E[integrand] dt per token (add `ctmc_prior_kl` for the full bound).

    Args:
      key: typed PRNG key.
      denoise_fn: (N, L) int, (N,) σ̄ -> (N, L, S) probabilities.
      x0: (B, L) clean tokens.
      process, schedule: forward process and noise schedule.
      t_min: lower end of the time interval.
      t: optional (B,) times overriding the draw (then no (1 - t_min) factor is applied).
    Returns:
      values (B, L), aux (that of `ctmc_elbo` plus "t": (B,)).
    """
    _check_batch(x0, "x0")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    k_t, k_x, k_j = jax.random.split(key, 3)
    b = x0.shape[0]
    dtype = jnp.result_type(float)
    if t is None:
        t = jax.random.uniform(k_t, (b,), dtype, t_min, 1.0)
        scale = 1.0 - t_min
    else:
        t = _per_token(t, (b,), dtype)
        scale = 1.0
    sb, sg = schedule.sigma_bar(t), schedule.sigma(t)
    xt = process.sample_transition(k_x, x0, sb[:, None])
    x_jump = sample_jump(k_j, process, xt)
    probs_xt = denoise_fn(xt, sb)
    probs_jump = denoise_fn(x_jump, sb)
    values, aux = ctmc_elbo(process, probs_xt, probs_jump, x0, xt, x_jump, sb, sg)
    aux["t"] = t
    return scale * values, aux
