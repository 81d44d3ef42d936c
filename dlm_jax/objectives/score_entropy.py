"""Denoising score entropy (SEDD) for any per-token CTMC forward process.

Reference: Lou, Meng and Ermon (2024), "Discrete Diffusion Modeling by Estimating the Ratios of
the Data Distribution" (SEDD).

Notation (row convention: Q[y, x] is the rate y → x for y ≠ x and every row of Q sums to 0, see
`dlm_jax.processes.transitions`); a process's `rate_into(x)` is Q[·, x]. The network outputs log-scores ℓ with `exp(ℓ[b, i, y]) ≈ p_t(x_t^i ← y) / p_t(x_t)`;
the entry y = x_t^i is 1 by definition and is ignored here (whatever the network put there).

Per position i (DWDSE, SEDD Thm 3.6 / Eq. 10, including the constant K term):

    DSE_i = σ(t) · Σ_{y ≠ x_t^i} Q[y, x_t^i] · ( s_y − r_y log s_y + K(r_y) ),
    s_y = exp(ℓ_y),   r_y = q_t(y | x0_i) / q_t(x_t^i | x0_i),   K(r) = r (log r − 1),  K(0) = 0.

Each bracket is the Bregman divergence of −log between s and r: ≥ 0, = 0 iff s = r, and its
gradient in ℓ is s − r. Summed over positions and integrated over t ∈ [0, 1] (plus the prior KL)
it bounds −log p_θ(x0); the per-position value is the integrand the caller averages over t.

Numerics (float32). The bracket is evaluated as r·ψ(δ) with δ = ℓ − log r and
ψ(δ) = e^δ − 1 − δ = expm1(δ) − δ, which is algebraically identical but never forms the large,
cancelling terms r·log s and r·log r (r ≈ 1/σ̄ at small noise). For δ > 1 (s > e·r, no
cancellation) it switches to s − r − r·δ to avoid overflowing e^δ. E = e^σ̄ − 1 always comes from
`expm1`, and log E from `log_expm1`.

Fast paths (exact algebraic rewrites of the definition, valid for ANY log-score):
  * Absorbing (S = V + 1, mask m): only masked positions contribute (nothing jumps into a real
    token: Q[y, x] = 0 for y ≠ x ≠ m). With Q[y, m] = 1 for y ≠ m, r_{x0} = 1/E and r_y = 0 otherwise:
        DSE = σ · [ Σ_{y ∉ {m, x0}} s_y + (1/E) ψ(ℓ_{x0} + log E) ]
            = σ · (1/E) · [ Σ_{y ≠ m} e^{ℓ̃_y} − 1 − ℓ̃_{x0} ],   ℓ̃ := ℓ + log E,
    the form the SEDD code evaluates for its absorbing graph: with SEDD's `scale_by_sigma` output
    shift (`scale_by_sigma_offset`), ℓ̃ is the raw network output − log(V_states − 1).
  * Uniform (S = V, Q = 11ᵀ/V − I): every y ≠ x has weight 1/V; with ρ = E / (E + V)
    (log ρ = log(1 − e^{−σ̄}) − log1p((V − 1) e^{−σ̄}), stable for every σ̄ > 0):
    x_t = x0 → r_y = ρ for all y ≠ x_t;  x_t ≠ x0 → r_{x0} = 1/ρ and r_y = 1 otherwise.
Any other process (e.g. `MatrixProcess`) takes the generic path through `transition` and `rate_into`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import Array

from dlm_jax.objectives.nelbo import per_token_time
from dlm_jax.processes.transitions import Absorbing, Process, Uniform


def log_expm1(x: Array) -> Array:
    """log(e^x − 1) for x ≥ 0, stable at both ends (−inf at 0, x + log1p(−e^{−x}) for large x)."""
    x = jnp.asarray(x)
    big = x > 1.0
    x_small = jnp.where(big, 1.0, x)
    x_big = jnp.where(big, x, 2.0)
    return jnp.where(big, x_big + jnp.log1p(-jnp.exp(-x_big)), jnp.log(jnp.expm1(x_small)))


def scale_by_sigma_offset(sigma_bar: Array, num_states: int) -> Array:
    """SEDD's absorbing `scale_by_sigma` shift: −log(e^σ̄ − 1) − log(num_states − 1), shape of σ̄.

    A network output `out` becomes the log-score `out + offset`; with out = 0 the scores at a masked
    position sum to exactly 1/E, the total mass of the true ratios. `num_states` counts the mask.
    """
    return -log_expm1(sigma_bar) - math.log(num_states - 1)


def bregman(log_score: Array, log_ratio: Array) -> Array:
    """Elementwise s − r·log s + K(r), s = e^{log_score}, r = e^{log_ratio}; broadcastable shapes.

    log_ratio = −inf means r = 0 and gives s (K(0) = 0). Computed as r·(expm1(δ) − δ),
    δ = log_score − log_ratio, for δ ≤ 1 and as s − r − r·δ above, so float32 stays accurate when
    r is large. Gradient w.r.t. log_score: s − r (NaN-free where the value is finite).
    """
    log_score = jnp.asarray(log_score)
    log_ratio = jnp.asarray(log_ratio)
    has_r = log_ratio > -jnp.inf
    lr = jnp.where(has_r, log_ratio, 0.0)
    r = jnp.exp(lr)
    d = log_score - lr
    small = d <= 1.0
    d_small = jnp.where(small, d, 0.0)
    val_small = r * (jnp.expm1(d_small) - d_small)
    d_big = jnp.where(small, 1.0, d)
    val_big = jnp.exp(lr + d_big) - r * (1.0 + d_big)
    val_r = jnp.where(small, val_small, val_big)
    # r = 0: the bracket is just s. (Safe input: where has_r, feed a finite placeholder.)
    s_only = jnp.exp(jnp.where(has_r, 0.0, log_score))
    return jnp.where(has_r, val_r, s_only)


def _check(process: Process, log_score: Array, xt: Array, x0: Array | None):
    if log_score.ndim != 3:
        raise ValueError(f"log_score must be (B, L, S), got shape {log_score.shape}")
    if log_score.shape[-1] != process.num_states:
        raise ValueError(f"log_score's last axis must be num_states = {process.num_states}, got "
                         f"shape {log_score.shape}")
    if xt.shape != log_score.shape[:2]:
        raise ValueError(f"xt must be (B, L) = {log_score.shape[:2]}, got shape {xt.shape}")
    if x0 is not None and x0.shape != log_score.shape[:2]:
        raise ValueError(f"x0 must be (B, L) = {log_score.shape[:2]}, got shape {x0.shape}")


def _float_dtype(*xs) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def true_log_ratios(process: Process, xt: Array, x0: Array, sigma_bar) -> Array:
    """log r_y = log q_t(y | x0) − log q_t(x_t | x0), (B, L, S): the minimiser of `score_entropy`.

    These are the conditional (given x0) ratios; the entry at y = x_t is 0. Entries with
    q_t(y|x0) = 0 are −inf (r = 0). Where x_t cannot arise from x0 (q_t(x_t|x0) = 0, a
    probability-zero pair) every y ≠ x_t gets −inf.

    Args:
      process: any `Process` (uses `transition`).
      xt, x0: (B, L) int tokens.
      sigma_bar: integrated noise, scalar / (B,) / (B, L).
    """
    if xt.ndim != 2:
        raise ValueError(f"xt must be (B, L), got shape {xt.shape}")
    if x0.shape != xt.shape:
        raise ValueError(f"x0 must match xt {xt.shape}, got shape {x0.shape}")
    sb = per_token_time(sigma_bar, xt.shape, "sigma_bar")
    q0 = process.transition(x0, sb)  # (B, L, S): q(y | x0)
    q_xt = jnp.take_along_axis(q0, xt[..., None], axis=-1)  # (B, L, 1)
    possible = q_xt > 0
    out = jnp.where(possible, jnp.log(q0) - jnp.log(jnp.where(possible, q_xt, 1.0)), -jnp.inf)
    at_xt = jax.nn.one_hot(xt, process.num_states, dtype=jnp.bool_)
    return jnp.where(at_xt, 0.0, out)


def _generic(process, log_score, xt, x0, sb, sg):
    s_states = process.num_states
    at_xt = jax.nn.one_hot(xt, s_states, dtype=jnp.bool_)
    w = jnp.where(at_xt, 0.0, process.rate_into(xt)).astype(log_score.dtype)  # Q[y, xt], y≠xt
    active = w > 0
    log_r = true_log_ratios(process, xt, x0, sb).astype(log_score.dtype)
    ls = jnp.where(active, log_score, 0.0)
    terms = jnp.where(active, w * bregman(ls, jnp.where(active, log_r, 0.0)), 0.0)
    per_token = sg * terms.sum(-1)
    return per_token, active.any(-1)


def _absorbing(process: Absorbing, log_score, xt, x0, sb, sg):
    m = process.mask_id
    s_states = process.num_states
    masked = xt == m  # (B, L)
    log_e = log_expm1(sb)  # log E, E = e^σ̄ − 1
    is_x0 = jax.nn.one_hot(x0, s_states, dtype=jnp.bool_)
    others = (jnp.arange(s_states) != m) & ~is_x0 & masked[..., None]  # y ∉ {m, x0}, r_y = 0
    s_others = jnp.exp(jnp.where(others, log_score, -jnp.inf)).sum(-1)
    l_x0 = jnp.take_along_axis(log_score, x0[..., None], axis=-1)[..., 0]
    l_x0 = jnp.where(masked, l_x0, 0.0)
    term_x0 = bregman(l_x0, jnp.where(masked, -log_e, 0.0))  # (1/E)·ψ(ℓ_{x0} + log E)
    dse = s_others + term_x0
    return jnp.where(masked, sg * dse, 0.0), masked


def _uniform(process: Uniform, log_score, xt, x0, sb, sg):
    v = process.vocab_size
    at_xt = jax.nn.one_hot(xt, v, dtype=jnp.bool_)
    is_x0 = jax.nn.one_hot(x0, v, dtype=jnp.bool_)
    # log ρ = log(E/(E+V)) = log(1 − e^{−σ̄}) − log(1 + (V−1) e^{−σ̄}).
    log_rho = jnp.log(-jnp.expm1(-sb)) - jnp.log1p((v - 1) * jnp.exp(-sb))
    log_rho = log_rho[..., None]
    same = (xt == x0)[..., None]
    log_r = jnp.where(same, log_rho, jnp.where(is_x0, -log_rho, 0.0))
    ls = jnp.where(at_xt, 0.0, log_score)
    terms = jnp.where(at_xt, 0.0, bregman(ls, jnp.where(at_xt, 0.0, log_r)))
    per_token = sg * terms.sum(-1) / v
    return per_token, jnp.ones(xt.shape, jnp.bool_)


def score_entropy(process: Process, log_score: Array, xt: Array, x0: Array, sigma_bar, sigma, *,
                  method: str = "auto") -> tuple[Array, dict[str, Array]]:
    """Per-token denoising score entropy σ(t)·Σ_{y≠x_t} Q[y, x_t]·(s − r log s + K(r)).

    Args:
      process: the forward process (Uniform, Absorbing, MatrixProcess or any `Process`).
      log_score: (B, L, S) log s_θ(x_t, t); entry [b, i, y] ≈ log p_t(x_t^i ← y)/p_t(x_t). The
        entry at y = x_t^i is ignored (no value, no gradient).
      xt: (B, L) int noised tokens.
      x0: (B, L) int clean tokens (for Absorbing, never the mask).
      sigma_bar: integrated noise σ̄(t); scalar, (B,), (B, 1) or (B, L).
      sigma: noise rate σ(t) = dσ̄/dt, same shapes; multiplies the per-token value.
      method: "auto" (closed form for Uniform/Absorbing, generic otherwise), "closed_form"
        (error if unavailable) or "generic" (through `transition`/`rate_into`, any process).

    Returns:
      per_token: (B, L), ≥ 0 (up to rounding), float32 (float64 when log_score is float64); 0 wherever nothing
        can jump into x_t (for Absorbing: every unmasked position).
      aux: scalars `loss_sum` (Σ per_token) and `num_active` (positions with a nonzero rate into
        x_t, i.e. the masked count for Absorbing).
    """
    _check(process, log_score, xt, x0)
    shape = xt.shape
    dtype = _float_dtype(log_score)
    log_score = log_score.astype(dtype)
    sb = per_token_time(sigma_bar, shape, "sigma_bar").astype(dtype)
    sg = per_token_time(sigma, shape, "sigma").astype(dtype)

    closed = isinstance(process, (Absorbing, Uniform))
    if method == "auto":
        method = "closed_form" if closed else "generic"
    if method == "closed_form":
        if isinstance(process, Absorbing):
            per_token, active = _absorbing(process, log_score, xt, x0, sb, sg)
        elif isinstance(process, Uniform):
            per_token, active = _uniform(process, log_score, xt, x0, sb, sg)
        else:
            raise ValueError(f"method='closed_form' needs a Uniform or Absorbing process, got "
                             f"{type(process).__name__}; use method='generic'")
    elif method == "generic":
        per_token, active = _generic(process, log_score, xt, x0, sb, sg)
    else:
        raise ValueError(f"method must be 'auto', 'closed_form' or 'generic', got {method!r}")
    aux = {"loss_sum": per_token.sum(), "num_active": active.sum().astype(dtype)}
    return per_token, aux
