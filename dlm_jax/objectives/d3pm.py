"""D3PM objectives: the discrete-time variational bound and the hybrid loss (Austin et al. 2021).

For clean tokens x_0, steps t = 1 … T and a denoiser p̃_θ(x_0 | x_t) (the model's logits), with the
reverse step p_θ(x_{t-1} | x_t) built from p̃ by `D3PM.reverse_log_probs`:

    -log p_θ(x_0) ≤ Σ_{t=1}^T E_{q(x_t|x_0)}[ L_t(x_0, x_t) ] + KL(q(x_T | x_0) ‖ π)

    L_t = KL( q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t) )    for t ≥ 2
    L_1 = -log p_θ(x_0 | x_1)                                 (the decoder / reconstruction term)

Indexing (this is where implementations disagree): the term for step t uses
x_t ~ q(x_t | x_0), i.e. exactly the (xt, t) pair a training step draws. L_t here is the paper's
L_{t-1}; the D3PM image code calls it step t-1 and the text code step t-1 with x_{t}. L_1 is also
KL(δ_{x_0} ‖ p_θ(x_0 | x_1)) because q(x_0 | x_1, x_0) = δ_{x_0}, so a single formula covers all
t. The prior term is `d3pm_prior_term`, 0 when β_T = 1.

Training estimator: draw t ~ Uniform{1, …, T} and x_t ~ q(x_t | x_0); `d3pm_loss` returns per
token T·L_t + λ·CE, whose expectation over t is the sum of the T bound terms plus λ times the
expected cross-entropy -log p̃_θ(x_0 | x_t) (the hybrid loss L_λ, paper Eq. 5). The reference
codebases add λ·CE to the *unscaled* L_t, so their λ corresponds to λ·T here.

Reductions are the caller's: sum over positions (and divide by the number of tokens for a
per-token bound in nats). Losses are computed in float32 (float64 under `jax.enable_x64`) from
log-probabilities; zero-probability entries of the exact posterior contribute 0 (0·log 0 = 0) and
no epsilon is used.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import Array

from dlm_jax.oracles import all_sequences
from dlm_jax.processes.d3pm import D3PM, _expand_time


def _kl_from_probs_and_log(q: Array, log_p: Array) -> Array:
    """Σ_j q_j (log q_j - log p_j) over the last axis, with 0·log 0 = 0 (NaN stays NaN): (...)."""
    zero = q == 0
    log_q = jnp.log(jnp.where(zero, 1.0, q))
    return jnp.sum(jnp.where(zero, 0.0, q * (log_q - log_p)), axis=-1)


def _check_tokens(logits: Array, x0: Array, xt: Array, process: D3PM) -> None:
    if x0.shape != xt.shape:
        raise ValueError(f"x0 shape {x0.shape} must equal xt shape {xt.shape}")
    if logits.ndim != x0.ndim + 1 or logits.shape[:-1] != x0.shape:
        raise ValueError(f"logits must have shape x0.shape + (S,) = {x0.shape} + (S,), got "
                         f"{logits.shape}")
    if not isinstance(process, D3PM):
        raise ValueError(f"process must be a D3PM, got {type(process).__name__}")


def d3pm_vb_term(logits: Array, x0: Array, xt: Array, t, process: D3PM, *,
                 parameterization: str = "mixture") -> Array:
    """The bound term L_t(x_0, x_t) per token (unscaled; see the module docstring).

    Args:
      logits: (..., S) logits of p̃_θ(x_0 | x_t) (absorbing: S = V+1 or V; mask entry ignored).
      x0: (...) int clean tokens.
      xt: (...) int tokens at step t (drawn from q(x_t | x_0)).
      t: int steps in [1, T], a prefix of x0's shape (scalar, (B,) or (B, L)).
      process: the D3PM forward process.
      parameterization: "mixture" or "joint" (see `D3PM.reverse_log_probs`).
    Returns:
      (...) KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)); for t = 1 this is -log p_θ(x_0 | x_1).
    """
    _check_tokens(logits, x0, xt, process)
    log_p = process.reverse_log_probs(xt, logits, t, parameterization=parameterization)
    q = process.posterior(xt, x0, t)
    return _kl_from_probs_and_log(q, log_p)


def d3pm_loss(logits: Array, x0: Array, xt: Array, t, process: D3PM, *,
              hybrid_lambda: float = 0.01,
              parameterization: str = "mixture") -> tuple[Array, dict[str, Array]]:
    """Per-token D3PM training loss T·L_t + λ·CE at a sampled step t.

    Args:
      logits: (B, L, S) logits of p̃_θ(x_0 | x_t); for absorbing the mask entry is ignored
        (S = V+1, or V without a mask column).
      x0: (B, L) int clean tokens.
      xt: (B, L) int, x_t ~ q(x_t | x_0) at step t (`D3PM.sample_xt`).
      t: (B,) int steps drawn uniformly from {1, …, T} (or (B, L) per token, or a scalar).
      process: the D3PM forward process.
      hybrid_lambda: λ ≥ 0 of the auxiliary cross-entropy -log p̃_θ(x_0 | x_t) (0 = pure L_vb).
        The reference codebases' λ equals this λ / T (they do not scale L_t by T).
      parameterization: "mixture" (default) or "joint" (paper Eq. 4).
    Returns:
      per_token: (B, L) T·L_t + λ·CE. Its expectation over t and x_t, summed over positions, is
        the bound without the prior term (`d3pm_prior_term`) plus λ·E[CE].
      aux: scalars averaged over all B·L tokens: "loss", "vb" (T·L_t), "ce", "decoder_frac"
        (fraction of tokens at t = 1).
    """
    static_lambda = isinstance(hybrid_lambda, (int, float))
    if static_lambda and hybrid_lambda < 0:
        raise ValueError(f"hybrid_lambda must be >= 0, got {hybrid_lambda}")
    _check_tokens(logits, x0, xt, process)
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, L), got shape {x0.shape}")
    vb = process.num_steps * d3pm_vb_term(logits, x0, xt, t, process,
                                          parameterization=parameterization)
    log_p0 = process.x0_log_probs(logits)
    ce = -jnp.take_along_axis(log_p0, x0[..., None], axis=-1)[..., 0]
    per_token = vb if (static_lambda and hybrid_lambda == 0) else vb + hybrid_lambda * ce
    t_tok = jnp.broadcast_to(_expand_time(t, x0.ndim), x0.shape)
    aux = {
        "loss": per_token.mean(),
        "vb": vb.mean(),
        "ce": ce.mean(),
        "decoder_frac": (t_tok == 1).astype(vb.dtype).mean(),
    }
    return per_token, aux


def d3pm_prior_term(x0: Array, process: D3PM) -> Array:
    """KL(q(x_T | x_0) ‖ π) per token: (...) for x0 (...) (0 when β_T = 1; see `D3PM.prior_kl`)."""
    return process.prior_kl(x0)


LogitsFn = Callable[[Array, Array], Array]


def d3pm_exact_bound(logits_fn: LogitsFn, x0: Array, process: D3PM, *,
                     parameterization: str = "mixture",
                     max_configs: int = 4096) -> tuple[Array, Array]:
    """Σ_{t=1}^T E_{q(x_t|x_0)}[L_t] per token, exact: every t and every noisy sequence x_t.

    For tiny problems (tests, toy evaluation): enumerates all S^L sequences x_t, weighted by
    Π_l q(x_t^l | x_0^l), so the cost is T · B · S^L denoiser calls on length-L inputs, made at
    once (`logits_fn` is vmapped over the T steps; memory T·B·S^L·L·S).

    Args:
      logits_fn: (xt (N, L) int32, t (N,) int32) -> (N, L, S) logits of p̃_θ(x_0 | x_t).
      x0: (B, L) int clean sequences.
      process: the D3PM process.
      parameterization: "mixture" or "joint".
      max_configs: refuse when S^L exceeds this.
    Returns:
      (total, per_step): (B, L) the sum over t, and (T, B, L) each E[L_t]. Add
      `d3pm_prior_term(x0, process)` for the full bound on -log p_θ(x_0).
    """
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, L), got shape {x0.shape}")
    b, length = x0.shape
    s = process.num_states
    try:
        configs = all_sequences(s, length, max_configs)  # (C, L)
    except ValueError as err:
        raise ValueError(f"{err}; use d3pm_bound_all_steps") from None
    c = configs.shape[0]
    xt = jnp.broadcast_to(configs[None], (b, c, length))
    x0_rep = jnp.broadcast_to(x0[:, None, :], (b, c, length))

    def step(t):
        # weight of each x_t config given x0: Π_l q(x_t^l | x0^l)
        probs = process.q_xt_given_x0(x0_rep, t)  # (B, C, L, S)
        w = jnp.take_along_axis(probs, xt[..., None], axis=-1)[..., 0].prod(-1)  # (B, C)
        tt = jnp.full((b * c,), t, jnp.int32)
        logits = logits_fn(xt.reshape(b * c, length), tt).reshape(b, c, length, -1)
        term = d3pm_vb_term(logits, x0_rep, xt, tt.reshape(b, c), process,
                            parameterization=parameterization)  # (B, C, L)
        return jnp.sum(jnp.where(w[..., None] > 0, w[..., None] * term, 0.0), axis=1)

    per_step = jax.vmap(step)(jnp.arange(1, process.num_steps + 1, dtype=jnp.int32))
    return per_step.sum(0), per_step


def d3pm_bound_all_steps(key: Array, logits_fn: LogitsFn, x0: Array, process: D3PM, *,
                         parameterization: str = "mixture") -> tuple[Array, Array]:
    """Σ_{t=1}^T L_t per token with every t visited and one draw x_t ~ q(·|x_0) per t.

    An unbiased, lower-variance evaluation estimate than a single sampled t (the D3PM text code's
    ELBO evaluation). The draw for step t uses `fold_in(key, t)`.

    Args:
      key: typed PRNG key.
      logits_fn: (xt (B, L) int, t (B,) int32) -> (B, L, S) logits of p̃_θ(x_0 | x_t).
      x0: (B, L) int clean sequences.
      process, parameterization: as in `d3pm_exact_bound`.
    Returns:
      (total, per_step): (B, L) and (T, B, L). Add `d3pm_prior_term` for the full bound.
    """
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, L), got shape {x0.shape}")

    def step(t):
        xt = process.sample_xt(jax.random.fold_in(key, t), x0, t)
        tt = jnp.full((x0.shape[0],), t, jnp.int32)
        return d3pm_vb_term(logits_fn(xt, tt), x0, xt, tt, process,
                            parameterization=parameterization)

    per_step = jax.lax.map(step, jnp.arange(1, process.num_steps + 1, dtype=jnp.int32))
    return per_step.sum(0), per_step
