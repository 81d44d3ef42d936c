"""Exact enumerators and denoisers of tiny known distributions (for exactness tests of objectives
and samplers).

Everything here enumerates a sequence space exhaustively, so it is for tiny problems only (S^L up
to a few thousand sequences). It turns a known data distribution into the exact quantities that a
perfectly trained model would output, so that objectives (exact bounds) and samplers (the true
reverse process) can be checked against closed-form answers. All functions are pure; the ones
returning JAX arrays are jit-able in their array arguments (sizes are static).

Shapes and conventions:
  S   states per token of the process (`process.num_states`; an absorbing process counts its mask).
  V   states of the clean data, V ≤ S: the joint table covers states 0 … V-1 only (e.g. V = S - 1,
      the real tokens of an absorbing process whose mask is the last state, or V = S).
  L   sequence length;  N  number of query sequences;  B  number of clean sequences.
  Sequences are enumerated in row-major order: the index of x is Σ_d x^d · S^{L-1-d}
  (`sequence_index`), so row i of `all_sequences(S, L)` is the sequence of index i and a table of
  shape (S,)*L flattened by `.reshape(-1)` is indexed by it.
  joint: the data distribution p0 as a table of shape (V,)*L, joint[x0] = p0(x0) ≥ 0, Σ = 1.
  process: a forward process acting independently per token, with `num_states` and
      `likelihood(xt, noise) -> (..., S)`, the probabilities q(x_t^d = xt^d | x_0^d = ·): every
      process of `dlm_jax.processes.transitions` (noise = the integrated noise σ̄) and the
      discrete-time `dlm_jax.processes.d3pm.D3PM` (noise = the integer step t).
  noise: a scalar shared by all rows, or one value per row, (N,) or (B,).

With q(x_t | x_0) = Π_d q(x_t^d | x_0^d) the quantities computed here are

    (1)  q(x | x0)                                                 `transition_table`
    (2)  p_t(x) = Σ_{x0} p0(x0) q(x | x0)                          `exact_marginal`
    (3)  p(x0^d = s | x_t) = Σ_{x0 : x0^d = s} p0(x0) q(x_t | x0) / p_t(x_t)
                                                                   `exact_x0_posterior`
    (4)  log p_t(x_t^{d←y}) - log p_t(x_t)                         `exact_log_ratios`

where x^{d←y} is x with position d set to y. (3) is the optimal per-position denoiser of the
x0-parameterised objectives (MDLM, Sahoo et al., 2024; D3PM, Austin et al., 2021; the CTMC bound of
Campbell et al., 2022) and (4) the logarithm of the optimal concrete score of SEDD (Lou et al.,
2024, "Discrete Diffusion Modeling by Estimating the Ratios of the Data Distribution").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

MAX_SEQUENCES = 4096
_HIGHEST = jax.lax.Precision.HIGHEST


def all_sequences(num_states: int, length: int, max_count: int = MAX_SEQUENCES) -> Array:
    """Every sequence of `length` tokens over `num_states` states, in row-major order.

    Args:
      num_states: S ≥ 1.
      length: L ≥ 1.
      max_count: refuse to enumerate more than this many sequences.
    Returns:
      (S^L, L) int32: row i is the sequence of index i (the last position varies fastest).
    Raises:
      ValueError if S^L > max_count (the message names S, L and the limit).
    """
    num_states, length = int(num_states), int(length)
    if num_states < 1 or length < 1:
        raise ValueError(f"all_sequences needs S >= 1 states and L >= 1 positions, got "
                         f"S={num_states}, L={length}")
    count = num_states ** length
    if count > max_count:
        raise ValueError(f"enumerating S^L = {num_states}^{length} = {count} sequences "
                         f"(S={num_states} states, L={length} positions) exceeds "
                         f"max_count={max_count}")
    grid = np.stack(np.meshgrid(*[np.arange(num_states)] * length, indexing="ij"), -1)
    return jnp.asarray(grid.reshape(-1, length), jnp.int32)


def sequence_index(x: Array, num_states: int) -> Array:
    """Row-major index Σ_d x^d · S^{L-1-d} of each sequence: x (..., L) int -> (...) int."""
    x = jnp.asarray(x)
    length = x.shape[-1]
    strides = num_states ** jnp.arange(length - 1, -1, -1)
    return (x * strides).sum(-1)


def _check_tokens(x: Array, name: str = "x") -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be (B, L) integer tokens, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer tokens, got dtype {x.dtype}")


def hamming_neighbors(x: Array, num_states: int) -> Array:
    """All single-position replacements of x.

    Args:
      x: (B, L) int tokens in [0, S).
      num_states: S.
    Returns:
      (B, L, S, L) int: `out[b, i, y] = x_b` with position i set to y. The entry y = x_b^i is x_b
      itself (not a neighbour; kept so the layout is rectangular).
    """
    x = jnp.asarray(x)
    _check_tokens(x)
    _, length = x.shape
    y = jnp.arange(num_states, dtype=x.dtype)[None, None, :, None]         # (1, 1, S, 1)
    at_i = jnp.eye(length, dtype=bool)[None, :, None, :]                   # (1, L, 1, L)
    return jnp.where(at_i, y, x[:, None, None, :])


def _row_noise(noise, rows: int, extra_axes: int) -> Array:
    """`noise` as a scalar, or (rows,) padded with `extra_axes` trailing singleton axes."""
    noise = jnp.asarray(noise)
    if noise.ndim == 0:
        return noise
    if noise.shape != (rows,):
        raise ValueError(f"noise must be a scalar or one value per row, ({rows},); got shape "
                         f"{noise.shape}")
    return noise.reshape((rows,) + (1,) * extra_axes)


def _check_joint(joint, process) -> Array:
    joint = jnp.asarray(joint)
    if joint.ndim < 1 or len(set(joint.shape)) != 1:
        raise ValueError(f"joint must be a table of shape (V,)*L, got shape {joint.shape}")
    if joint.shape[0] > process.num_states:
        raise ValueError(f"joint covers V={joint.shape[0]} states per token, more than the "
                         f"process's S={process.num_states}")
    return joint


def _check_query(joint, process, xt) -> tuple[Array, Array]:
    """The checked joint table and (N, L) noisy sequences of one of its length."""
    joint = _check_joint(joint, process)
    xt = jnp.asarray(xt)
    _check_tokens(xt, "xt")
    if xt.shape[1] != joint.ndim:
        raise ValueError(f"xt has L={xt.shape[1]} positions, the joint table {joint.ndim}")
    return joint, xt


def transition_table(process, x0: Array, noise) -> Array:
    """(1): q(x_t = x | x_0 = x0_b) for every sequence x, by enumeration.

    Args:
      process: per-token forward process (see the module docstring), S states.
      x0: (B, L) int clean sequences.
      noise: σ̄ or step t; a scalar or (B,), one per clean sequence.
    Returns:
      (B, S^L): row b is the distribution of x_t given x0_b over `all_sequences(S, L)`.
    """
    x0 = jnp.asarray(x0)
    _check_tokens(x0, "x0")
    b, length = x0.shape
    xs = all_sequences(process.num_states, length)                        # (N, L)
    xs = jnp.broadcast_to(xs, (b,) + xs.shape)                             # (B, N, L)
    lik = process.likelihood(xs, _row_noise(noise, b, 2))                  # (B, N, L, S)
    per_pos = jnp.take_along_axis(lik, x0[:, None, :, None], axis=-1)[..., 0]
    return per_pos.prod(-1)


def exact_marginal(joint, process, noise) -> Array:
    """(2): the marginal p_t(x) = Σ_{x0} p0(x0) q(x | x0) of a joint table.

    Args:
      joint: (V,)*L table of p0 (V ≤ S).
      process: per-token forward process with S states.
      noise: scalar σ̄ or step t.
    Returns:
      (S,)*L table of p_t.
    """
    joint = _check_joint(joint, process)
    v, length = joint.shape[0], joint.ndim
    if jnp.ndim(noise) != 0:
        raise ValueError(f"exact_marginal needs a scalar noise, got shape {jnp.shape(noise)}")
    kernel = transition_table(process, all_sequences(v, length), noise)   # (V^L, S^L)
    flat = joint.reshape(-1).astype(jnp.promote_types(joint.dtype, kernel.dtype))
    pt = jnp.tensordot(flat, kernel.astype(flat.dtype), axes=1, precision=_HIGHEST)
    return pt.reshape((process.num_states,) * length)


def exact_x0_posterior(joint, process, xt: Array, noise) -> Array:
    """(3): the exact denoiser, posterior marginals p(x0^d = · | x_t) of a joint table.

    Args:
      joint: (V,)*L table of p0 (V ≤ S).
      process: per-token forward process with S states.
      xt: (N, L) int noisy sequences.
      noise: σ̄ or step t; a scalar or (N,), one per row of xt.
    Returns:
      (N, L, S) probabilities; entries s ≥ V are 0, and rows with p_t(xt_n) = 0 (an impossible
      noisy sequence) are all 0.
    """
    joint, xt = _check_query(joint, process, xt)
    v, length, s = joint.shape[0], joint.ndim, process.num_states
    lik = process.likelihood(xt, _row_noise(noise, xt.shape[0], 1))        # (N, L, S)
    dtype = jnp.promote_types(lik.dtype, joint.dtype)
    hot = jax.nn.one_hot(all_sequences(v, length), s, dtype=dtype)        # (K, L, S)
    per_pos = jnp.einsum("nls,kls->nkl", lik.astype(dtype), hot, precision=_HIGHEST)
    weights = per_pos.prod(-1) * joint.reshape(-1).astype(dtype)           # p0(x0) q(xt | x0)
    total = weights.sum(-1, keepdims=True)                                 # p_t(xt)
    post = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.einsum("nk,kls->nls", post, hot, precision=_HIGHEST)


def _log_ratios_from_marginal(log_pt: Array, xt: Array, num_states: int) -> Array:
    """log_pt (S^L,) flat log-marginal, xt (N, L) -> (N, L, S) of (4), 0 at y = xt^d."""
    nb = sequence_index(hamming_neighbors(xt, num_states), num_states)    # (N, L, S)
    own = sequence_index(xt, num_states)                                    # (N,)
    out = log_pt[nb] - log_pt[own][:, None, None]
    return jnp.where(jax.nn.one_hot(xt, num_states, dtype=bool), 0.0, out)


def exact_log_ratios(joint, process, xt: Array, noise) -> Array:
    """(4): the exact log concrete scores log p_t(xt^{d←y}) - log p_t(xt) of a joint table.

    Args:
      joint: (V,)*L table of p0 (V ≤ S).
      process: per-token forward process with S states.
      xt: (N, L) int noisy sequences.
      noise: σ̄ or step t; a scalar or (N,), one per row of xt.
    Returns:
      (N, L, S): entry [n, d, y] is log p_t(xt_n^{d←y}) - log p_t(xt_n); 0 at y = xt_n^d, -inf
      where the neighbour has p_t = 0. Rows with p_t(xt_n) = 0 are not meaningful (+inf or NaN
      off the entries y = xt_n^d).
    """
    joint, xt = _check_query(joint, process, xt)
    s = process.num_states
    noise = jnp.asarray(noise)
    if noise.ndim == 0:
        log_pt = jnp.log(exact_marginal(joint, process, noise).reshape(-1))
        return _log_ratios_from_marginal(log_pt, xt, s)
    _row_noise(noise, xt.shape[0], 0)  # validates the shape

    def one_row(x, nz):
        log_pt = jnp.log(exact_marginal(joint, process, nz).reshape(-1))
        return _log_ratios_from_marginal(log_pt, x[None], s)[0]

    return jax.vmap(one_row)(xt, noise)


def random_joint(seed: int, num_states: int, length: int,
                 excluded_state: int | None = None) -> np.ndarray:
    """A random data distribution over (S,)*L for tests.

    Draws p ~ Dirichlet(1, …, 1) over all S^L sequences (NumPy `default_rng(seed)`); if
    `excluded_state` is given (e.g. the mask of an absorbing process), every sequence containing it
    gets probability 0 and the rest is renormalised.

    Returns:
      (S,)*L float64 NumPy table summing to 1.
    """
    count = num_states ** length
    p = np.random.default_rng(seed).dirichlet(np.ones(count))
    if excluded_state is not None:
        seqs = np.asarray(all_sequences(num_states, length, max_count=count))
        p[(seqs == excluded_state).any(-1)] = 0.0
        p /= p.sum()
    return p.reshape((num_states,) * length)
