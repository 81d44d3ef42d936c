"""Continuous-time masked-diffusion NELBO (MDLM) and its block-wise use (BD3-LM).

References: Sahoo et al. (2024), "Simple and Effective Masked Diffusion Language Models" (MDLM);
Arriola et al. (2025), "Block Diffusion: Interpolating Between Autoregressive and Diffusion
Language Models" (BD3-LM).

Absorbing forward process with keep probability alpha(t) (schedules.py). For clean tokens x0 and
x_t ~ q(·|x0) the negative ELBO of a denoiser p_θ(x0_i | x_t) is

    -log p_θ(x0) ≤ ∫_0^1 E_{x_t} Σ_{i: x_t^i = m} w(t) · (-log p_θ(x0_i | x_t)) dt  + prior term,
    w(t) = -alpha'(t) / (1 - alpha(t)) = schedule.nelbo_weight(t)          (= 1/t for log-linear)

The integrand is what `masked_nelbo` returns per token (0 at unmasked positions); the caller
draws t, sums over positions and averages over the batch. With the SUBS parameterisation the
denoiser never predicts the mask and copies unmasked tokens, so those positions contribute
exactly 0. The prior term is 0 when alpha(1) = 0 (LogLinear(eps=0)); for eps > 0 a fraction eps
of the tokens is still clean at t = 1 and the bound needs KL(q(x_1|x0) ‖ p_1), see
tests/test_elbo_identities.py.

BD3-LM: the sequence is cut into K blocks of Lb tokens; block k gets its own time t_k and is
denoised given the clean blocks < k. The per-token formula is the same with t replaced by the time
of the token's block, so pass `t` per token, e.g.
`dlm_jax.processes.corruption.block_times(t_blocks, Lb)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from dlm_jax.processes.schedules import Schedule

# The SUBS sentinel for "log 0": finite so that no inf/NaN arithmetic can appear downstream
# (0 · -inf), large enough that exp(NEG_INF - anything reasonable) is exactly 0 in float32.
NEG_INF = -1e6


def per_token_time(t, shape: tuple[int, ...], name: str = "t", dtype=None) -> Array:
    """Broadcast a time / noise argument to per-token shape, normally (B, L).

    Accepts a scalar, a per-sequence (B,) or (B, 1) array, or a per-token (B, L) array. The axes
    of `t` are aligned with the *leading* axes of `shape` (t is padded with trailing singleton
    axes, then broadcast like NumPy), so a 1-D array is always read as per-sequence, (B,) or
    (1,), and a (B,) array never broadcasts against L by accident. Any token shape works the same
    way: for `shape = (B,)` the result is per-sequence (B,); for `shape = (B, L, S)` a (B, L, 1)
    array is broadcast over S.

    Args:
      t: scalar or array with at most len(shape) axes, each of size 1 or the matching size.
      shape: the token shape (B, ...) to broadcast to.
      name: the argument's name, for error messages.
      dtype: the float dtype that non-float input (ints, bools) is cast to; default float32.
        Float input keeps its dtype.
    Returns:
      `shape` float array.
    """
    shape = tuple(shape)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32 if dtype is None else dtype)
    if t.ndim > len(shape):
        raise ValueError(f"{name} of shape {t.shape} has more axes than the tokens of shape "
                         f"{shape}; pass a scalar, (B,), (B, 1) or the token shape")
    try:
        return jnp.broadcast_to(t.reshape(t.shape + (1,) * (len(shape) - t.ndim)), shape)
    except ValueError:
        per_seq = (f": a 1-D array is read as per-sequence and must have length B = {shape[0]}"
                   if t.ndim == 1 else "")
        raise ValueError(f"{name} of shape {t.shape} does not broadcast to the tokens of shape "
                         f"{shape}{per_seq}") from None


def subs_log_probs(logits: Array, xt: Array, mask_id: int) -> Array:
    """SUBS parameterisation: log p_θ(x0_i = · | x_t), (B, L, S) float32 (at least).

    1. The mask logit is set to NEG_INF = -1e6 (a finite sentinel, not -inf): the denoiser
       never predicts the mask, its probability is exactly 0 in float32.
    2. log-softmax over the last axis in float32 (float64 logits stay float64).
    3. Carry-over: at positions with xt != mask_id the row becomes 0 at xt and NEG_INF elsewhere
       (the observed token is kept with probability 1).

    Args:
      logits: (B, L, S) raw model outputs (bf16/float32/float64), S > mask_id.
      xt: (B, L) int noised tokens.
      mask_id: the absorbing state's id (`Absorbing.mask_id`, i.e. vocab_size).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, L, S), got shape {logits.shape}")
    if xt.shape != logits.shape[:2]:
        raise ValueError(f"xt must be (B, L) = {logits.shape[:2]}, got shape {xt.shape}")
    num_states = logits.shape[-1]
    if not 0 <= mask_id < num_states:
        raise ValueError(f"mask_id must index the last axis of logits (size {num_states}), "
                         f"got {mask_id}")
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float32, or float64 if given
    is_mask_col = jnp.arange(num_states) == mask_id
    z = jnp.where(is_mask_col, NEG_INF, z)
    logp = jax.nn.log_softmax(z, axis=-1)
    carry = jnp.where(jax.nn.one_hot(xt, num_states, dtype=jnp.bool_), 0.0, NEG_INF)
    return jnp.where((xt == mask_id)[..., None], logp, carry)


def masked_nelbo(log_probs: Array, x0: Array, xt: Array, t, schedule: Schedule,
                 mask_id: int) -> tuple[Array, dict[str, Array]]:
    """Per-token integrand of the continuous-time masked NELBO.

        per_token[b, i] = w(t[b, i]) · (-log_probs[b, i, x0[b, i]])   if xt[b, i] == mask_id
                        = 0                                             otherwise
        w(t) = schedule.nelbo_weight(t) = -alpha'(t)/(1 - alpha(t))  ≥ 0

    Args:
      log_probs: (B, L, S) log p_θ(x0_i = · | x_t), normally `subs_log_probs(...)`.
      x0: (B, L) int clean tokens.
      xt: (B, L) int noised tokens.
      t: times, scalar, (B,) / (B, 1) per sequence, or (B, L) per token (BD3-LM: each token
        carries its block's time).
      schedule: a masking schedule (`nelbo_weight`).
      mask_id: the absorbing state's id.

    Returns:
      per_token: (B, L) float32 (float64 under x64 with float64 inputs).
      aux: scalars `num_masked`, `nelbo_sum` (Σ per_token) and `masked_ce_mean` (unweighted
        -log p_θ(x0|x_t) averaged over masked positions).
    """
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be (B, L, S), got shape {log_probs.shape}")
    shape = log_probs.shape[:2]
    if x0.shape != shape:
        raise ValueError(f"x0 must be (B, L) = {shape}, got shape {x0.shape}")
    if xt.shape != shape:
        raise ValueError(f"xt must be (B, L) = {shape}, got shape {xt.shape}")
    t = per_token_time(t, shape, "t")
    masked = xt == mask_id
    # Where-before-multiply: the weight may be inf at t = 0 (log-linear 1/t) where nothing is
    # masked; 0 · inf must not leak NaN into values or gradients.
    w = jnp.where(masked, schedule.nelbo_weight(jnp.where(masked, t, 1.0)), 0.0)
    ce = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0]
    ce = jnp.where(masked, ce, 0.0)
    per_token = w * ce
    num_masked = masked.sum()
    aux = {
        "num_masked": num_masked.astype(per_token.dtype),
        "nelbo_sum": per_token.sum(),
        "masked_ce_mean": ce.sum() / jnp.maximum(num_masked, 1).astype(per_token.dtype),
    }
    return per_token, aux


def mdlm_loss(logits: Array, x0: Array, xt: Array, t, schedule: Schedule,
              mask_id: int) -> tuple[Array, dict[str, Array]]:
    """`masked_nelbo(subs_log_probs(logits, xt, mask_id), x0, xt, t, schedule, mask_id)`.

    logits (B, L, S); x0, xt (B, L); t scalar / (B,) / (B, L). Returns ((B, L), aux).
    """
    return masked_nelbo(subs_log_probs(logits, xt, mask_id), x0, xt, t, schedule, mask_id)
