"""Annealed Langevin dynamics on the Gaussian-smoothed likelihood of an autoregressive model over an
ordinal vocabulary (PnF: Jayaram & Thickstun, 2021, "Parallel and Flexible Sampling from
Autoregressive Models via Langevin Dynamics", ICML).

The smoothed likelihood. Tokens k ∈ {0, …, V−1} stand for the values k. Adding Gaussian noise of
level σ to a sequence, x̃ = x + σ·ε, gives a density on R^L with the AR factorisation

    log p_σ(x̃) = Σ_i log p_σ(x̃_i | x̃_<i),
    p_σ(x̃_i | x̃_<i) = Σ_k p_θ(x_i = k | x̃_<i, σ) · N(x̃_i; k, σ²),                     (1)

one Gaussian mixture per position whose weights are the next-token probabilities given the *noisy*
history: what an AR model trained on noisy histories outputs (`objectives.ar.noisy_history`; (1)
is exact for the true conditionals because ε_i is independent of x̃_<i given x_i). One causal pass
gives all L mixtures. Position 0 has no conditional in our AR convention (`objectives.ar`: token
0 is context); its prior is uniform over the V levels, so its factor is (1/V) Σ_k N(x̃_0; k, σ²).

The sampler. The gradient ∇ log p_σ(x̃) comes from `jax.grad` through the model (factor i depends
on x̃_≤i, so every position receives the pull of its own mixture and of all later conditionals).
Annealed Langevin dynamics (Song & Ermon, 2019, "Generative Modeling by Estimating Gradients of the
Data Distribution", Algorithm 1, as PnF uses it) runs the noise levels from the largest to the
smallest, T updates of all positions at once per level:

    x̃ ← x̃ + η_σ ∇ log p_σ(x̃) + sqrt(2 η_σ) z,    z ~ N(0, I_L),    η_σ = step_size · σ²    (2)

(Song & Ermon's α_i = ε σ_i² / σ_L² with ε = step_size · σ_L²: the step shrinks with the scale of
the mixture components, so step_size is a fraction of the local variance; a Gaussian target of
variance s² is kept at variance s² / (1 − η/(2 s²)), the O(η) bias of unadjusted Langevin). The
chain starts from x̃ ~ U[0, V − 1] i.i.d. per position (or a given `init`) and is one `lax.scan`
over all J·T updates.

Tokens. At the end every position takes the mode of its clean-token posterior at the smallest
level σ_min, given its noisy prefix and its own noisy value:

    x_i = argmax_k  log p_θ(x_i = k | x̃_<i, σ_min) − (x̃_i − k)² / (2 σ_min²)                (3)

(Bayes with the model's conditional as the prior and the Gaussian as the likelihood; the uniform
prior at position 0 is rounding). Rounding alone would ignore the model: near a midpoint between
two levels, (3) picks the one the model finds likelier. It costs one more causal pass. As σ_min → 0
both are the nearest level.

Prompt: positions < P are clamped to the prompt's values (no gradient step, no noise) and kept as
tokens; they enter the model as exact values (a history with ε = 0) and their own factors of (1)
are left out (the chain targets p_σ(x̃_≥P | x_<P)).

NFE: one gradient evaluation (a forward pass and its backward pass) per update counts 1, the
final pass 1: J·T + 1.

Shapes: B batch, L length, V levels (the vocabulary), J noise levels, T updates per level, P
prompt length.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
# values (B, L) float32, σ (B,) -> (B, L, V): log p_θ(x_{i+1} = k | x̃_≤i, σ) at row i.
NoisyLogProbs = Callable[[Array, Array], Array]


def _dtype(values: Array):
    """float32, or float64 for float64 values (tests under `jax.enable_x64`)."""
    return jnp.promote_types(jnp.asarray(values).dtype, jnp.float32)


def _per_row(sigma: Array, batch: int, dtype=jnp.float32) -> Array:
    return jnp.broadcast_to(jnp.asarray(sigma, dtype), (batch,))


def mixture_log_density(log_probs: Array, values: Array, sigma: Array) -> Array:
    """Per-position log p_σ(x̃_i | x̃_<i) of eq. (1) from next-token log-probs.

    log_probs: (B, L, V), row i = log p_θ(x_{i+1} = k | x̃_≤i, σ) (the AR shift; row L − 1 is
    unused). values: (B, L) float x̃. sigma: (B,) or scalar σ > 0.
    Returns (B, L) float32 (float64 for float64 values); position 0 uses the uniform prior 1/V.
    """
    B, L, V = log_probs.shape
    dtype = _dtype(values)
    sigma = _per_row(sigma, B, dtype)[:, None, None]
    k = jnp.arange(V, dtype=dtype)
    log_gauss = (-0.5 * jnp.square((values.astype(dtype)[..., None] - k) / sigma)
                 - jnp.log(sigma) - 0.5 * math.log(2 * math.pi))               # (B, L, V)
    prior = jnp.concatenate([jnp.full((B, 1, V), -math.log(V), dtype),
                             log_probs[:, :-1].astype(dtype)], axis=1)         # p(x_i = k | ·)
    return jax.nn.logsumexp(prior + log_gauss, axis=-1)


def smoothed_log_likelihood(log_probs_fn: NoisyLogProbs, values: Array, sigma: Array, *,
                            prompt_len: int = 0) -> Array:
    """log p_σ(x̃) of eq. (1), one causal pass: values (B, L) float, σ (B,) or scalar ->
    (B,) float32. Positions < prompt_len (clamped, conditioned on) are left out."""
    B, L = values.shape
    sigma = _per_row(sigma, B, _dtype(values))
    per_position = mixture_log_density(log_probs_fn(values, sigma), values, sigma)
    return jnp.where(jnp.arange(L) >= prompt_len, per_position, 0.0).sum(-1)


def smoothed_score(log_probs_fn: NoisyLogProbs, values: Array, sigma: Array, *,
                   prompt_len: int = 0) -> tuple[Array, Array]:
    """(log p_σ(x̃) (B,), ∇_x̃ log p_σ(x̃) (B, L)) by reverse-mode differentiation through the
    model (rows are independent, so the gradient of the batch sum is each row's own)."""
    dtype = _dtype(values)
    sigma = _per_row(sigma, values.shape[0], dtype)

    def total(v):
        ll = smoothed_log_likelihood(log_probs_fn, v, sigma, prompt_len=prompt_len)
        return ll.sum(), ll

    (_, ll), grad = jax.value_and_grad(total, has_aux=True)(values.astype(dtype))
    return ll, grad


def posterior_tokens(log_probs: Array, values: Array, sigma: Array) -> Array:
    """Eq. (3): (B, L, V) next-token log-probs at the values (B, L) and σ -> (B, L) int32 modes
    of the clean-token posteriors."""
    B, L, V = log_probs.shape
    sigma = _per_row(sigma, B)[:, None, None]
    k = jnp.arange(V, dtype=jnp.float32)
    prior = jnp.concatenate([jnp.zeros((B, 1, V), jnp.float32),
                             log_probs[:, :-1].astype(jnp.float32)], axis=1)
    scores = prior - 0.5 * jnp.square((values.astype(jnp.float32)[..., None] - k) / sigma)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def langevin_sample(log_probs_fn: NoisyLogProbs, keys: Array, *, length: int,
                    sigmas: Sequence[float], steps: int, step_size: float,
                    prompt: Array | None = None, init: Array | None = None) -> dict[str, Array]:
    """Annealed Langevin dynamics (2) on the smoothed likelihood (1), then tokens by (3).

    log_probs_fn: values (B, L) float32, σ (B,) -> (B, L, V) next-token log-probs given the noisy
      history at level σ (e.g. `Autoregressive.noisy_log_probs(model)`; causal: row i may read
      values ≤ i only).
    keys: (B,) typed keys, one per row: the start from fold_in(key, 0), update t (0-based over
      all levels) from fold_in(key, t + 1), so a row does not depend on its batch.
    length: L. sigmas: the J noise levels (any order; run from the largest to the smallest).
    steps: T updates per level. step_size: η_σ = step_size · σ².
    prompt: (B, P) int clamped prefix, or None. init: (B, L) float start, or None (U[0, V − 1]).

    Returns {"tokens": (B, L) int32, "values": (B, L) float32 final x̃, "log_likelihood": (B, J)
    log p_σ at the last update of each level (before it), "nfe": int32[] = J·T + 1}.
    """
    if steps < 1:
        raise ValueError(f"steps (updates per noise level) must be >= 1, got {steps}")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    levels = sorted((float(s) for s in sigmas), reverse=True)
    if not levels or levels[-1] <= 0:
        raise ValueError(f"sigmas must be a non-empty sequence of levels > 0, got {sigmas}")
    B = keys.shape[0]
    P = 0 if prompt is None else prompt.shape[1]
    if P > length:
        raise ValueError(f"the prompt has {P} tokens, more than the length {length}")
    probe = jnp.zeros((B, length), jnp.float32)
    V = jax.eval_shape(log_probs_fn, probe, jnp.ones((B,), jnp.float32)).shape[-1]

    free = jnp.arange(length) >= P                                           # (L,)
    clamp = jnp.zeros((B, length), jnp.float32)
    if prompt is not None:
        clamp = clamp.at[:, :P].set(jnp.asarray(prompt, jnp.float32))
    if init is None:
        init = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (length,),
                                                     maxval=V - 1.0))(keys)
    x = jnp.where(free, jnp.asarray(init, jnp.float32), clamp)

    J, T = len(levels), int(steps)
    sigma_seq = jnp.repeat(jnp.asarray(levels, jnp.float32), T)              # (J·T,)

    def update(x, inp):
        sigma, t = inp
        ll, grad = smoothed_score(log_probs_fn, x, jnp.full((B,), sigma), prompt_len=P)
        eta = step_size * sigma * sigma
        z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t + 1), (length,)))(keys)
        x_new = x + eta * grad + jnp.sqrt(2.0 * eta) * z
        return jnp.where(free, x_new, x), ll

    x, ll = jax.lax.scan(update, x, (sigma_seq, jnp.arange(J * T, dtype=jnp.int32)))
    sigma_min = jnp.full((B,), levels[-1], jnp.float32)
    tokens = posterior_tokens(log_probs_fn(x, sigma_min), x, sigma_min)
    if prompt is not None:
        tokens = jnp.where(free, tokens, jnp.asarray(clamp, jnp.int32))
    return {"tokens": tokens, "values": x, "log_likelihood": ll.reshape(J, T, B)[:, -1].T,
            "nfe": jnp.int32(J * T + 1)}
