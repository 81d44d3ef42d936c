"""Autoregressive next-token negative log-likelihood.

Shift convention (the one contract of this module): the logits at position i predict the token
at position i + 1. The returned per-token array is indexed by the *logit* position i:

    per_token[b, i] = -log softmax(logits[b, i])[tokens[b, i + 1]]     for i < L - 1
    per_token[b, L - 1] = 0                                             (nothing left to predict)

so `per_token.sum(-1)` is the NLL of tokens[:, 1:] given tokens[:, 0] (token 0 is never scored:
it is the context, e.g. a BOS). Weights are given per *target* token, aligned with `tokens`:
`weights[b, j]` scales the loss of predicting `tokens[b, j]`, which lands at `per_token[b, j - 1]`;
`weights[:, 0]` is therefore unused. A padding mask (1 = real token) is the typical weight.
`segment_ids` (packed documents) additionally zero every prediction that crosses a document
boundary (segment_ids[b, i] != segment_ids[b, i + 1]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def ar_nll(logits: Array, tokens: Array, *, weights: Array | None = None,
           segment_ids: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Next-token NLL with the shift done here (see the module docstring for the convention).

    Args:
      logits: (B, L, V) float; the log-softmax is computed in float32 (float64 stays float64).
      tokens: (B, L) int token ids; `tokens[:, i + 1]` is the target of `logits[:, i]`.
      weights: optional (B, L) per-target-token weights aligned with `tokens` (e.g. a 0/1
        padding mask); `weights[b, j]` applies to the prediction of `tokens[b, j]`.
      segment_ids: optional (B, L) int document ids; predictions whose context token and target
        token lie in different segments get weight 0.

    Returns:
      per_token: (B, L) float32 (float64 for float64 logits); `per_token[b, i]` = weighted NLL
        of tokens[b, i + 1] given tokens[b, :i + 1]; the last column is 0.
      aux: scalars `nll_sum` (Σ per_token), `num_targets` (Σ of the effective weights) and
        `nll_mean` (nll_sum / max(num_targets, 1)); `row_targets` (B,) the effective weights
        per sequence.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, L, V), got shape {logits.shape}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens must be (B, L) = {logits.shape[:2]}, got shape {tokens.shape}")
    if weights is not None and weights.shape != tokens.shape:
        raise ValueError(f"weights must match tokens {tokens.shape}, got shape {weights.shape}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids must match tokens {tokens.shape}, got shape "
                         f"{segment_ids.shape}")

    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32; float64 logits stay float64
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)  # (B, L, V)
    targets = tokens[:, 1:]  # (B, L-1)
    nll = -jnp.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]  # (B, L-1)

    w = jnp.ones(targets.shape, dtype)
    if weights is not None:
        w = w * weights[:, 1:].astype(dtype)
    if segment_ids is not None:
        w = w * (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(dtype)
    # where, not multiply: a zero weight must silence even an infinite NLL (and its gradient).
    nll = jnp.where(w != 0, w * nll, 0.0)

    per_token = jnp.pad(nll, ((0, 0), (0, 1)))  # (B, L), last column 0
    nll_sum = per_token.sum()
    num = w.sum()
    aux = {"nll_sum": nll_sum, "num_targets": num, "nll_mean": nll_sum / jnp.maximum(num, 1.0),
           "row_targets": w.sum(-1)}
    return per_token, aux


def noisy_history(key: Array, tokens: Array, levels) -> tuple[Array, Array]:
    """The inputs of noisy-history AR training over an ordinal vocabulary (Jayaram & Thickstun,
    2021, "Parallel and Flexible Sampling from Autoregressive Models via Langevin Dynamics"):
    x̃ = x + σ·ε with ε ~ N(0, I) and one σ per sequence drawn uniformly from `levels`.

    Trained with `ar_nll(model(x̃, σ), x)` — the target stays the clean token — the model is
    p_θ(x_{i+1} | x̃_{≤i}, σ), which makes p_σ(x̃_{i+1} | x̃_{≤i}) = Σ_k p_θ(k | x̃_{≤i}, σ)
    N(x̃_{i+1}; k, σ²) exact (ε_{i+1} is independent of x̃_{≤i} given x_{i+1}).

    Args:
      key: typed key.
      tokens: (B, L) int, token k standing for the value k.
      levels: the noise levels σ > 0 (a non-empty sequence of floats, level units).
    Returns:
      (x̃ (B, L) float32, σ (B,) float32).
    """
    levels = jnp.asarray(tuple(levels), jnp.float32)
    k_level, k_eps = jax.random.split(key)
    sigma = levels[jax.random.randint(k_level, tokens.shape[:1], 0, levels.shape[0])]
    eps = jax.random.normal(k_eps, tokens.shape, jnp.float32)
    return tokens.astype(jnp.float32) + sigma[:, None] * eps, sigma
