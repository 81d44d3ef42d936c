"""Concrete score matching (CSM; Meng et al., 2022), for small vocabularies.

Reference: Meng, Choi, Song and Ermon (2022), "Concrete Score Matching: Generalized Score Matching
for Discrete Data" (NeurIPS 2022). The formulas are written out below and numbered (1)-(4)
locally; function docstrings refer to these numbers.

For a data distribution p over sequences x ∈ {0..S-1}^L and a neighbourhood map
N(x) = {x_{n_1}, ..., x_{n_K}}, the concrete score is the vector

    (1)  c_p(x; N)_i = (p(x_{n_i}) - p(x)) / p(x) = p(x_{n_i}) / p(x) - 1,    i = 1 … K.

Neighbourhood used here: **Hamming distance 1**, i.e. every single-position replacement
x^{i←y} (position i, new value y ≠ x^i). Then |N(x)| = L(S-1), the graph is symmetric
(x' ∈ N(x) ⟺ x ∈ N(x')), and for a single token (L = 1) N(x) is "all other states".

Array layout: a concrete score for a batch of sequences is a `(B, L, S)` array `c` with
`c[b, i, y] = c(x_b)_{x_b^{i←y}}`. The entries `c[b, i, x_b^i]` are not neighbours; every function
here ignores them (the true value there is 0, the ratio p(x)/p(x) - 1).

Objectives (both are expectations over x ~ p_data; they return per-sequence values and the
caller takes the mean over a data batch, which is an unbiased estimate of the sum over x):

  * `csm_explicit` — the explicit objective, which needs the true score (intractable in general):
        (2)  L(θ) = Σ_x p(x) ‖c_θ(x) - c_p(x)‖²
  * `csm_implicit` / `csm_loss` — the trainable form, with no c_p:
        (3)  J(θ) = Σ_x p(x) Σ_i (c_θ(x)_i² + 2 c_θ(x)_i)  -  2 Σ_x Σ_i p(x_{n_i}) c_θ(x)_i
    Expanding the square in (2) gives (3) plus C = Σ_x p(x) ‖c_p(x)‖², independent of θ, because
    Σ_x p(x) c_p(x)_i c_θ(x)_i = Σ_x (p(x_{n_i}) - p(x)) c_θ(x)_i. The second sum of (3) is
    re-indexed by the neighbour x' = x_{n_i} ~ p_data:
        (4)  Σ_x Σ_i p(x_{n_i}) c_θ(x)_i = E_{x'~p}[ Σ_{(x, i): N(x)_i = x'} c_θ(x)_i ],
    the sum over N^{-1}(x') (= N(x') for Hamming-1), so it needs the model at the neighbours of
    each data point. L(θ) = J(θ) + C: both are minimised by c_θ = c_p, where L = 0 and the
    gradient of J vanishes.
  * `csm_loss_sampled` — a one-neighbour unbiased estimator of (3): draw one neighbour uniformly
    for the first term (scaled by |N(x)|) and one element of N^{-1}(x) uniformly for the second
    (scaled by |N^{-1}(x)|): two model calls per sequence instead of 1 + L(S-1).

`concrete_score_table` computes the true c_p from an enumerated joint table p (tests, tiny
problems). `hamming_neighbors` lives in `dlm_jax.oracles` and is importable from here too.
Everything is a pure function of arrays and works under jit/grad/vmap.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import Array

from dlm_jax.oracles import hamming_neighbors, sequence_index

ScoreFn = Callable[[Array], Array]  # (N, L) int tokens -> (N, L, S) concrete scores


def _check_tokens(x: Array, name: str = "x") -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be (B, L) integer tokens, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer tokens, got dtype {x.dtype}")


def _check_score(score: Array, x: Array, name: str) -> None:
    if score.ndim != 3 or score.shape[:2] != x.shape:
        raise ValueError(f"{name} must be (B, L, S) with (B, L) = {x.shape}, got {score.shape}")


def _neighbour_mask(x: Array, num_states: int, dtype) -> Array:
    """(B, L, S): 1 where (i, y) is a Hamming-1 neighbour of x (y ≠ x^i), else 0."""
    return 1 - jax.nn.one_hot(x, num_states, dtype=dtype)


def concrete_score_table(probs: Array, x: Array) -> Array:
    """True concrete score c_p(x) of (1) for an enumerated joint distribution.

    Args:
      probs: joint table p of shape (S,)*L (L = x.shape[1]); need not be normalised.
      x: (B, L) int tokens with p(x) > 0 (otherwise the ratio is inf/nan).
    Returns:
      (B, L, S): `c[b, i, y] = p(x_b^{i←y}) / p(x_b) - 1`; 0 at y = x_b^i.
    """
    _check_tokens(x)
    length = x.shape[1]
    if probs.ndim != length or len(set(probs.shape)) != 1:
        raise ValueError(f"probs must have shape (S,)*L with L={length}, got {probs.shape}")
    num_states = probs.shape[0]
    flat = probs.reshape(-1)
    p_x = flat[sequence_index(x, num_states)]                                 # (B,)
    p_nb = flat[sequence_index(hamming_neighbors(x, num_states), num_states)]  # (B, L, S)
    return p_nb / p_x[:, None, None] - 1.0


def csm_explicit(score: Array, target: Array, x: Array) -> tuple[Array, dict]:
    """The integrand of (2): ‖c_θ(x) - c_p(x)‖² over the Hamming-1 neighbours of x.

    E_{x~p_data}[values] = L(θ) = Σ_x p(x)‖c_θ(x) - c_p(x)‖², which needs the true score.

    Args:
      score: (B, L, S) model concrete scores c_θ(x).
      target: (B, L, S) true concrete scores c_p(x) (e.g. from `concrete_score_table`).
      x: (B, L) int tokens.
    Returns:
      values (B,) per-sequence squared errors, and aux {"sq_error": mean}.
    """
    _check_tokens(x)
    _check_score(score, x, "score")
    _check_score(target, x, "target")
    score = score.astype(jnp.promote_types(score.dtype, jnp.float32))
    nb = _neighbour_mask(x, score.shape[-1], score.dtype)
    values = (nb * (score - target) ** 2).sum((-2, -1))
    return values, {"sq_error": values.mean()}


def gather_back_scores(scores_at_neighbors: Array, x: Array) -> Array:
    """Pick, at every neighbour x' = x^{i←y}, the model's score for jumping back to x.

    Args:
      scores_at_neighbors: (B, L, S, L, S) with `[b, i, y] = c_θ(x_b^{i←y})` (a (L, S) score).
      x: (B, L) int tokens.
    Returns:
      (B, L, S): `back[b, i, y] = c_θ(x_b^{i←y})[i, x_b^i]`, the entry whose neighbour is x_b.
    """
    _check_tokens(x)
    b, length = x.shape
    if scores_at_neighbors.ndim != 5 or scores_at_neighbors.shape[:2] != (b, length):
        raise ValueError("scores_at_neighbors must be (B, L, S, L, S), got "
                         f"{scores_at_neighbors.shape} for x of shape {x.shape}")
    # Diagonal over the position axes: [b, i, y, i, :] -> (B, L, S, S).
    own = jnp.einsum("biyjs,ij->biys", scores_at_neighbors,
                     jnp.eye(length, dtype=scores_at_neighbors.dtype))
    return jnp.take_along_axis(own, x[:, :, None, None], axis=-1)[..., 0]


def csm_implicit(score: Array, back_score: Array, x: Array) -> tuple[Array, dict]:
    """The integrand of (3) for a data point x ~ p_data (exact sums over the neighbours).

        values = Σ_{(i,y) ∈ N(x)} (c_θ(x)_{iy}² + 2 c_θ(x)_{iy})  -  2 Σ_{x' ∈ N^{-1}(x)} c_θ(x')_{→x}

    With Hamming-1 neighbours N^{-1}(x) = N(x), and the score of x' = x^{i←y} for its neighbour
    x is `back_score[b, i, y]` (see `gather_back_scores`). E_{x~p}[values] = J_CSM(θ) exactly.

    Args:
      score: (B, L, S) model concrete scores at x.
      back_score: (B, L, S) model scores at the neighbours, pointing back to x.
      x: (B, L) int tokens (data samples).
    Returns:
      values (B,), aux {"self_term", "cross_term"} (batch means).
    """
    _check_tokens(x)
    _check_score(score, x, "score")
    _check_score(back_score, x, "back_score")
    dtype = jnp.promote_types(score.dtype, jnp.float32)
    score, back_score = score.astype(dtype), back_score.astype(dtype)
    nb = _neighbour_mask(x, score.shape[-1], score.dtype)
    self_term = (nb * (score ** 2 + 2.0 * score)).sum((-2, -1))
    cross_term = -2.0 * (nb * back_score).sum((-2, -1))
    values = self_term + cross_term
    return values, {"self_term": self_term.mean(), "cross_term": cross_term.mean()}


def csm_loss(score_fn: ScoreFn, x: Array) -> tuple[Array, dict]:
    """(3) with the model called at x and at all L(S-1) neighbours (1 + L·S calls' rows).

    Args:
      score_fn: (N, L) int tokens -> (N, L, S) concrete scores c_θ.
      x: (B, L) int data tokens.
    Returns:
      values (B,) (mean over a data batch estimates J_CSM), aux as in `csm_implicit`.
    """
    _check_tokens(x)
    b, length = x.shape
    score = score_fn(x)
    _check_score(score, x, "score_fn(x)")
    num_states = score.shape[-1]
    nbrs = hamming_neighbors(x, num_states).reshape(-1, length)
    at_nb = score_fn(nbrs).reshape(b, length, num_states, length, num_states)
    return csm_implicit(score, gather_back_scores(at_nb, x), x)


def csm_loss_sampled(key: Array, score_fn: ScoreFn, x: Array, num_states: int
                     ) -> tuple[Array, dict]:
    """A sampled, unbiased estimator of (3): one neighbour per term, two model calls.

    For each data point x: draw (i, y), y ≠ x^i, uniformly from N(x) (K = L(S-1) choices);
    first term K·(c_θ(x)_{iy}² + 2c_θ(x)_{iy}); second term -2K·c_θ(x^{i←y})_{i, x^i}, since
    x^{i←y} is a uniform draw from N^{-1}(x) = N(x). Unbiased for `csm_implicit`'s values.

    Args:
      key: typed PRNG key.
      score_fn: (N, L) int tokens -> (N, L, S) concrete scores.
      x: (B, L) int data tokens.
      num_states: S.
    Returns:
      values (B,), aux {"self_term", "cross_term"}.
    """
    _check_tokens(x)
    if num_states < 2:
        raise ValueError(f"num_states must be >= 2, got {num_states}")
    b, length = x.shape
    k = length * (num_states - 1)
    draw = jax.random.randint(key, (b,), 0, k)
    i = draw // (num_states - 1)
    r = draw % (num_states - 1)
    rows = jnp.arange(b)
    cur = x[rows, i]
    y = (r + (r >= cur)).astype(x.dtype)                 # skip the current value
    c_x = score_fn(x)[rows, i, y]
    x_nb = x.at[rows, i].set(y)
    c_back = score_fn(x_nb)[rows, i, cur]
    self_term = k * (c_x ** 2 + 2.0 * c_x)
    cross_term = -2.0 * k * c_back
    values = self_term + cross_term
    return values, {"self_term": self_term.mean(), "cross_term": cross_term.mean()}
