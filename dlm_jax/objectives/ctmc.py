"""The continuous-time (CTMC) ELBO with an x0-parameterised reverse rate.

Reference: Campbell et al. (2022), "A Continuous Time Framework for Discrete Denoising Models"
(NeurIPS 2022). The formulas are written out below and numbered (1)-(8) locally; function
docstrings refer to these numbers.

Notation, in the package's row convention (`Q[i, j]` is the rate i → j for i ≠ j and every row of
Q sums to 0, see `dlm_jax.processes.transitions`): per token the forward rate is R_t = σ(t)·Q and
q_{t|0}(x|x0) = expm(σ̄(t) Q)[x0, x]. A sequence x ∈ {0..S-1}^L diffuses independently per
position, so only single-position jumps x → x^{d←y} (position d set to y) have a rate:

    (1)  R_t(x, x^{d←y}) = σ(t)·Q[x^d, y]   (y ≠ x^d),      Z_t(x) = Σ_d σ(t)·(-Q[x^d, x^d]),
         r_t(x̃|x) = R_t(x, x̃) / Z_t(x)                     (the jump distribution, x̃ ≠ x),

where Z_t(x) is the exit rate of x.

**Reverse rate (2).** With a denoiser p_θ(x0^d | x) per position,

    (2)  R̂^θ_t(x, x^{d←y}) = R_t(x^{d←y}, x) Σ_{x0} p_θ(x0 | x)_d q_{t|0}(y|x0) / q_{t|0}(x^d|x0),
         y ≠ x^d,

i.e. σ·Q[y, x^d]·ŝ(y) where ŝ(y) = Σ_{x0} p_θ(x0) q(y|x0)/q(x^d|x0) is the concrete score the
denoiser implies (`score_from_x0`). Terms with q(x^d|x0) = 0 are dropped: such x0 cannot have
produced x (the true posterior gives them 0). For the true posterior marginals q(x0^d | x) in
place of p_θ, ŝ(y) = p_t(x^{d←y})/p_t(x) and (2) is the exact time reversal of the forward chain,

    (3)  R̂_t(x, x̃) = R_t(x̃, x) · p_t(x̃) / p_t(x).

**Bound (4).** For one data point x0,

    (4)  -log p_θ(x0) ≤ KL(q_{T|0}(·|x0) ‖ p_ref)
                        + ∫_0^T dt E_{x~q_{t|0}(·|x0)} [ Σ_{x'≠x} R̂^θ_t(x, x')
                                                      - Z_t(x) E_{x̃~r_t(·|x)} log R̂^θ_t(x̃, x) ]
                        + C(x0).

Campbell et al. state the bound up to this θ-independent constant C. It is the θ-free part of
log dQ^{x0}/dP^θ over paths (Q^{x0}: the forward path measure given x0, P^θ: the model's
reverse path measure). Written with the same expectations it is

    (5)  C(x0) = ∫_0^T dt E_x [ -Z_t(x) + Z_t(x) E_{x̃~r_t} log R̂^{x0}_t(x̃, x) ],
         R̂^{x0}_t(x̃, x) = R_t(x, x̃) q_{t|0}(x|x0) / q_{t|0}(x̃|x0)   (the reverse rate given x0),

so C contains the forward-rate terms Z_t(x)·log R_t(x, x̃). With C included the right-hand side
is E_{Q^{x0}}[log dQ^{x0}/dP^θ] ≥ -log p_θ(x0), a true bound, ≥ 0 pointwise in t after
averaging over x (it is a generalised KL between reverse rates). Per (t, x, x̃) we therefore
compute

    (6)  integrand = Σ_{x'≠x} R̂^θ(x, x')  -  Z_t(x)
                     + Z_t(x) · [ log R̂^{x0}(x̃, x) - log R̂^θ(x̃, x) ],

where the forward rate R_t(x, x̃) cancels inside the log-ratio. Everything is a sum over
positions d, so values are returned per token, (B, L); sum over L for the per-sequence value.
With the exact denoiser (true posterior marginals) the reverse rate is the true time reversal
(3) and, for every x0,

    (7)  ∫_{t0}^{1} E[integrand | x0] dt = KL(q_{t0|0}(·|x0) ‖ p_{t0}) - KL(q_{1|0}(·|x0) ‖ p_1),

which is -log p0(x0) when σ̄(t0) = 0 and q_{1|0}(·|x0) = p_1 (tests check this). Averaged over
x0 ~ p0 with σ̄(t0) = 0, the full bound (integral + E KL(q_{1|0}(·|x0) ‖ p_ref)) is
H(p0) + KL(p_1 ‖ p_ref); the time integral alone is H(p0) - E_{x0} KL(q_{1|0}(·|x0) ‖ p_1).

**Training estimator (8).** For one sample t, x ~ q_{t|0}(·|x0), x̃ ~ r_t(·|x), the E_{x̃} term
of (6) is moved onto x̃: it is summed over *all* single-position predecessors x' of x̃, weighted
by their exact posterior given x̃ and x0,

    (8)  φ_t(x' | x̃, x0) ∝ q_{t|0}(x'|x0) R_t(x', x̃) / Z_t(x')     (normalised over all x'),
         value = Σ_{x'≠x} R̂^θ(x, x') - Z_t(x)
                 + Σ_{x'} φ_t(x'|x̃, x0) Z_t(x') [ log R̂^{x0}(x̃, x') - log R̂^θ(x̃, x') ].

Its expectation over (x, x̃) equals that of (6) exactly (not approximately), because φ is
normalised over all predecessors; the first line needs the model at x, the second at x̃ only.
This is the multi-dimensional form of the bound that Campbell et al. train with.

Functions:
  * `x0_reverse_rate`, `score_from_x0`: (2).
  * `ctmc_elbo_given_xt`: the integrand (6) at (t, x0, x_t) with the expectation over the jump
    x̃ ~ r_t(·|x_t) done exactly (sum over all L(S-1) neighbours; the model runs on each).
  * `ctmc_elbo_expected`: additionally the exact expectation over x_t ~ q_{t|0}(·|x0) by
    enumerating all S^L sequences (tiny problems).
  * `ctmc_nelbo_exact`: Gauss–Legendre quadrature over t of the above plus the prior KL.
  * `ctmc_elbo` (+ `sample_jump`, `ctmc_elbo_mc`): the training estimator (8).
  * `ctmc_prior_kl`: KL(q_{1|0}(·|x0^d) ‖ p_ref) per token.

`denoise_fn` everywhere maps `(xt (N, L) int, sigma_bar (N,)) -> x0_probs (N, L, S)`.
Values are per token (B, L); reduction (sum over positions, mean over the batch) is the caller's.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dlm_jax.objectives.nelbo import per_token_time
from dlm_jax.oracles import all_sequences, hamming_neighbors
from dlm_jax.processes.schedules import Schedule
from dlm_jax.processes.transitions import Absorbing, Process, Uniform, default_float

DenoiseFn = Callable[[Array, Array], Array]  # (xt (N, L), sigma_bar (N,)) -> (N, L, S)

MAX_ENUMERATED_STATES = 4096


# --- small helpers ------------------------------------------------------------------------------

def _loss_dtype(x: Array):
    """At least float32 (bf16 model outputs are promoted; float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0; NaN-free in value and gradient."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _log_or_zero(x: Array) -> Array:
    """log x where x > 0, else 0 (for entries that carry zero weight); same shape as x."""
    ok = x > 0
    return jnp.where(ok, jnp.log(jnp.where(ok, x, 1.0)), 0.0)


def _model_log(x: Array, on: Array) -> Array:
    """log x on the entries that carry weight (x = 0 there gives -inf: the bound is infinite),
    0 elsewhere; no NaN from the unused entries in value or gradient."""
    return jnp.where(on, jnp.log(jnp.where(on, x, 1.0)), 0.0)


def rate_out(process: Process, x: Array) -> Array:
    """Q[x, ·], the rates out of x (..., S), diagonal included (row convention)."""
    if hasattr(process, "rate_out"):
        return process.rate_out(x)
    if isinstance(process, Uniform):
        return process.rate_into(x)  # Q is symmetric
    s = process.num_states
    hot = jax.nn.one_hot(x, s, dtype=default_float())
    if isinstance(process, Absorbing):
        out = jax.nn.one_hot(process.mask_id, s, dtype=hot.dtype) - hot
        return jnp.where((x == process.mask_id)[..., None], 0.0, out)
    return jnp.asarray(process.rate_matrix(), hot.dtype)[x]


def _exit_rates(process: Process) -> Array:
    """(S,) exit rate -Q[v, v] of every state v at unit noise rate."""
    s = process.num_states
    if isinstance(process, Uniform):
        return jnp.full((s,), 1.0 - 1.0 / s, default_float())
    if isinstance(process, Absorbing):
        return jnp.ones((s,), default_float()).at[process.mask_id].set(0.0)
    return -jnp.diagonal(jnp.asarray(process.rate_matrix(), default_float()))


def _check(process: Process, x0_probs: Array | None, xt: Array, name: str = "xt") -> None:
    if not jnp.issubdtype(xt.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer tokens, got dtype {xt.dtype}")
    if x0_probs is not None and x0_probs.shape != xt.shape + (process.num_states,):
        raise ValueError(f"x0_probs must have shape {name}.shape + (S,) = "
                         f"{xt.shape + (process.num_states,)}, got {x0_probs.shape}")


def _check_batch(x: Array, name: str) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be (B, L) integer tokens, got {x.shape} {x.dtype}")


# --- the reverse rate (2) -----------------------------------------------------------------------

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
    sb = per_token_time(sigma_bar, xt.shape, "sigma_bar", x0_probs.dtype)
    lik = process.likelihood(xt, sb).astype(x0_probs.dtype)  # q(xt | x0 = ·)
    weights = _safe_div(x0_probs, lik)
    # Σ_{x0} w[x0] q(y|x0) = (expm(σ̄Q)ᵀ w)[y] = staggered_score(w, -σ̄): matrix-free.
    return process.staggered_score(weights, -sb)


def x0_reverse_rate(process: Process, x0_probs: Array, xt: Array, sigma_bar, sigma) -> Array:
    """(2): reverse rates out of x per position from an x0-denoiser.

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
    rate = per_token_time(sigma, xt.shape, "sigma", ratio.dtype)[..., None]
    return rate * process.reverse_rate(xt, ratio).astype(ratio.dtype)


# --- exact forms for tiny problems ----------------------------------------------------------------

def ctmc_elbo_given_xt(process: Process, denoise_fn: DenoiseFn, x0: Array, xt: Array,
                       sigma_bar, sigma) -> tuple[Array, dict]:
    """Integrand of the bound at (t, x0, x_t), with E_{x̃~r_t(·|x_t)} summed exactly.

    Per position d (with x = x_t, R = σQ, q = q_{t|0}):

        value_d = Σ_{y≠x^d} R̂^θ(x, x^{d←y})  -  σ·(-Q[x^d, x^d])
                  + Σ_{y≠x^d} σQ[x^d, y] [log q(x^d|x0^d) - log q(y|x0^d) - log ŝ_{x^{d←y}}(x^d)]

    where σQ[x^d,y]·ŝ_{x^{d←y}}(x^d) = R̂^θ(x^{d←y}, x) is (2) at the neighbour. The
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
      raw terms of (4) (the last is Z_t(x)·E_{x̃}[log R̂^θ(x̃, x)]).
    """
    _check_batch(x0, "x0")
    _check_batch(xt, "xt")
    if x0.shape != xt.shape:
        raise ValueError(f"x0 {x0.shape} and xt {xt.shape} must have the same shape")
    b, length = xt.shape
    s = process.num_states
    sb_b = per_token_time(sigma_bar, (b,), "sigma_bar", default_float())
    sg = per_token_time(sigma, (b, length), "sigma", default_float())
    sb = per_token_time(sigma_bar, (b, length), "sigma_bar", default_float())

    probs = denoise_fn(xt, sb_b)
    _check(process, probs, xt)
    rates = x0_reverse_rate(process, probs, xt, sb, sg)
    hot = jax.nn.one_hot(xt, s, dtype=rates.dtype)
    reverse_exit = -(rates * hot).sum(-1)                                   # (B, L)
    forward_exit = sg * _exit_rates(process).astype(rates.dtype)[xt]        # (B, L)

    nbrs = hamming_neighbors(xt, s)                                         # (B, L, S, L)
    sb_nb = jnp.broadcast_to(sb_b[:, None, None], (b, length, s)).reshape(-1)
    probs_nb = denoise_fn(nbrs.reshape(-1, length), sb_nb).reshape(b, length, s, length, s)
    own = jnp.einsum("bdyls,dl->bdys", probs_nb, jnp.eye(length, dtype=probs_nb.dtype))
    y_grid = jnp.broadcast_to(jnp.arange(s, dtype=xt.dtype), (b, length, s))
    ratio_nb = score_from_x0(process, own, y_grid, sb[..., None])           # (B, L, S, S)
    back = jnp.take_along_axis(ratio_nb, xt[:, :, None, None], -1)[..., 0]  # ŝ_{x^{d←y}}(x^d)

    fwd = sg[..., None] * rate_out(process, xt).astype(rates.dtype) * (1 - hot)  # R(x, x^{d←y})
    q0 = process.transition(x0, sb).astype(rates.dtype)                    # q(· | x0^d)
    q_cur = (q0 * hot).sum(-1, keepdims=True)                               # q(x^d | x0^d)
    on = fwd > 0
    log_back = _model_log(back, on)
    log_ratio = _log_or_zero(q_cur) - _log_or_zero(q0) - log_back
    cross = jnp.where(on, fwd * log_ratio, 0.0).sum(-1)
    values = reverse_exit - forward_exit + cross
    log_rate = jnp.where(on, fwd * (_log_or_zero(fwd) + log_back), 0.0).sum(-1)
    aux = {"reverse_exit": reverse_exit.sum(-1).mean(),
           "forward_exit": forward_exit.sum(-1).mean(),
           "log_rate_term": log_rate.sum(-1).mean()}
    return values, aux


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
    try:
        seqs = all_sequences(process.num_states, length, MAX_ENUMERATED_STATES)  # (K, L)
    except ValueError as err:
        raise ValueError(f"{err}; use the Monte-Carlo estimator `ctmc_elbo`") from None
    k = seqs.shape[0]
    sb = per_token_time(sigma_bar, (b,), "sigma_bar", default_float())
    sg = per_token_time(sigma, (b,), "sigma", default_float())
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
    q = process.transition(x0, per_token_time(sigma_bar_final, x0.shape, "sigma_bar_final",
                                                default_float()))
    ref = ref.astype(q.dtype)
    log_ref = jnp.where(ref > 0, _log_or_zero(ref), -jnp.inf)
    terms = jnp.where(q > 0, q * (_log_or_zero(q) - log_ref), 0.0)
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
    dtype = default_float()
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


# --- Monte-Carlo training estimator (8) ---------------------------------------------------------

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
    rates = jnp.where(hot, 0.0, rate_out(process, xt)).reshape(b, length * s)
    logits = jnp.where(rates > 0, jnp.log(jnp.where(rates > 0, rates, 1.0)), -jnp.inf)
    idx = jax.random.categorical(key, logits, axis=-1)
    d, y = idx // s, (idx % s).astype(xt.dtype)
    jumped = xt.at[jnp.arange(b), d].set(y)
    return jnp.where((rates.sum(-1) > 0)[:, None], jumped, xt)


def ctmc_elbo(process: Process, x0_probs_xt: Array, x0_probs_jump: Array, x0: Array, xt: Array,
              x_jump: Array, sigma_bar, sigma) -> tuple[Array, dict]:
    """The estimator (8) for one sample (x0, t, x_t ~ q_{t|0}, x̃ ~ r_t(·|x_t)), plus C.

    Per position d (R = σQ, q = q_{t|0}(·|x0), Z = exit rates):

        value_d = Σ_{y≠x^d} R̂^θ(x, x^{d←y})  -  Z^d(x^d)                       [model at x]
                  + Σ_{v≠x̃^d} φ_{d,v} Z(x̃^{d←v}) [log R̂^{x0}(x̃, v) - log R̂^θ(x̃, v)]   [model at x̃]

    with φ_{d,v} ∝ q(v|x0^d)/q(x̃^d|x0^d) · Q[v, x̃^d] / Z(x̃^{d←v}) normalised over all (d, v):
    φ_t of (8), the exact posterior of the pre-jump state given x̃, and
    log R̂^{x0}(x̃, v) - log R̂^θ(x̃, v) = log q(v|x0^d) - log q(x̃^d|x0^d) - log ŝ_{x̃,d}(v). The
    first line is the first term of the integrand of (4) with the -Z_t(x) of C (5); the second is
    its second term with the Z·log R̂^{x0} of C. Its expectation over x_t and x̃ equals
    `ctmc_elbo_expected`'s values; the mean over t ~ U(0, T) times T estimates the time integral
    of the bound. If Z(x) = 0 there is no jump and the second line is 0.

    Args:
      process: forward process.
      x0_probs_xt: (B, L, S) p_θ(x0 | x_t).
      x0_probs_jump: (B, L, S) p_θ(x0 | x̃). (The code released with Campbell et al. (2022) has a
        `one_forward_pass` option that reuses the model output at x̃ for the first term too;
        that saves a call but biases the estimate, so it is not done here.)
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
    sb = per_token_time(sigma_bar, shape, "sigma_bar", dtype)
    sg = per_token_time(sigma, shape, "sigma", dtype)
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
    log_ratio = _log_or_zero(q0) - _log_or_zero(q_cur) - _model_log(ratio, on)
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
    dtype = default_float()
    if t is None:
        t = jax.random.uniform(k_t, (b,), dtype, t_min, 1.0)
        scale = 1.0 - t_min
    else:
        t = per_token_time(t, (b,), "t", dtype)
        scale = 1.0
    sb, sg = schedule.sigma_bar(t), schedule.sigma(t)
    xt = process.sample_transition(k_x, x0, sb[:, None])
    x_jump = sample_jump(k_j, process, xt)
    probs_xt = denoise_fn(xt, sb)
    probs_jump = denoise_fn(x_jump, sb)
    values, aux = ctmc_elbo(process, probs_xt, probs_jump, x0, xt, x_jump, sb, sg)
    aux["t"] = t
    return scale * values, aux
