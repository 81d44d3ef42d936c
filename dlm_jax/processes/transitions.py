"""Continuous-time forward processes over a finite state space, per token.

Row convention (used throughout the package): `Q[i, j]` is the rate of jumping from state i to
state j (i ≠ j), the diagonal is `Q[i, i] = -Σ_{j≠i} Q[i, j]` so every row sums to 0, and
`expm(sigma_bar · Q)[x0, j] = q(x_t = j | x_0 = x0)` (a row-stochastic matrix). This is the
convention of Campbell et al. (2022), "A Continuous Time Framework for Discrete Denoising Models".
The SEDD code (Lou et al., 2024, "Discrete Diffusion Modeling by Estimating the Ratios of the Data
Distribution") stores the transpose (columns); its `transp_transition`/`transp_rate` are our
`likelihood`/`rate_into`.

A process offers, for token arrays of any shape `(...)` and noise `sigma_bar` broadcastable to it:
  * `transition(x0, sigma_bar) -> (..., S)`: q(x_t = · | x_0 = x0), the row of expm(σ̄Q).
  * `likelihood(xt, sigma_bar) -> (..., S)`: q(x_t = xt | x_0 = ·), the column of expm(σ̄Q).
  * `rate_into(x) -> (..., S)`: Q[·, x], the rates into x from every state (the score-entropy
    weights and the forward factor of the reverse rate).
  * `reverse_rate(xt, score) -> (..., S)`: R̄[y] = Q[y, xt] · score[y] for y ≠ xt and
    R̄[xt] = -Σ_{y≠xt} R̄[y] — the time reversal at unit noise rate; multiply by sigma(t).
  * `staggered_score(score, dsigma) -> (..., S)`: expm(-dσ Q)ᵀ score, used by Tweedie τ-leaping.
  * `sample_transition(key, x0, sigma_bar)`, `sample_limit(key, shape)`, `limit_probs()`.
Uniform and Absorbing compute all of these in closed form, without an S×S matrix; `MatrixProcess`
does it for any small user-given generator through `jax.scipy.linalg.expm`, and is the independent
check.

S = `num_states`; for Absorbing, S = vocab_size + 1 and the mask is state `mask_id = vocab_size`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


def _noise(sigma_bar, like: Array | None = None) -> Array:
    """sigma_bar as a float array with a trailing axis for the state dimension."""
    s = jnp.asarray(sigma_bar)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    return s[..., None]


def _one_hot(x: Array, num_states: int, dtype) -> Array:
    return jax.nn.one_hot(x, num_states, dtype=dtype)


def default_float():
    """The default float dtype: float32, or float64 under `jax.enable_x64`."""
    return jnp.result_type(float)


class Process:
    """Shared logic; subclasses provide the closed forms."""

    num_states: int
    mask_id: int | None = None

    # --- generic pieces expressed through rate_into -------------------------------------------
    def reverse_rate(self, xt: Array, score: Array) -> Array:
        """Reverse-time rates out of xt, (..., S), given score (..., S) ≈ p_t(y)/p_t(xt).

        Entries y ≠ xt are Q[y, xt]·score[y]; the xt entry makes the row sum to 0. The entry
        score[xt] is ignored (it is 1 by definition).
        """
        off = self.rate_into(xt) * score
        at_xt = _one_hot(xt, self.num_states, off.dtype)
        off = off * (1 - at_xt)
        return off - at_xt * off.sum(-1, keepdims=True)

    def sample_transition(self, key: Array, x0: Array, sigma_bar) -> Array:
        """Draw x_t ~ q(· | x0) per token; same shape and dtype as x0."""
        probs = self.transition(x0, sigma_bar)
        return jax.random.categorical(key, jnp.log(probs)).astype(x0.dtype)

    def sample_limit(self, key: Array, shape: tuple[int, ...]) -> Array:
        """Draw tokens from the limit (t → ∞) distribution; int32 array of `shape`."""
        logits = jnp.log(self.limit_probs())
        return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Uniform(Process):
    """Q = (1/V)·11ᵀ - I over V states: expm(σ̄Q) = e^{-σ̄} I + (1 - e^{-σ̄})/V · 11ᵀ."""

    vocab_size: int

    @property
    def num_states(self) -> int:
        return self.vocab_size

    def rate_matrix(self) -> Array:
        """The (V, V) generator as a dense matrix; for small vocabularies and tests."""
        v = self.vocab_size
        return jnp.full((v, v), 1.0 / v) - jnp.eye(v)

    def transition(self, x0: Array, sigma_bar) -> Array:
        s = _noise(sigma_bar)
        stay = jnp.exp(-s)
        return stay * _one_hot(x0, self.num_states, s.dtype) + (-jnp.expm1(-s)) / self.vocab_size

    def likelihood(self, xt: Array, sigma_bar) -> Array:
        return self.transition(xt, sigma_bar)  # Q is symmetric

    def rate_into(self, x: Array) -> Array:
        v = self.vocab_size
        return jnp.full(x.shape + (v,), 1.0 / v, default_float()) - _one_hot(x, v, default_float())

    def staggered_score(self, score: Array, dsigma) -> Array:
        """expm(-dσ Q)ᵀ score = e^{dσ} s + (1 - e^{dσ})/V · Σ s; (..., V)."""
        d = _noise(dsigma)
        return jnp.exp(d) * score - jnp.expm1(d) / self.vocab_size * score.sum(-1, keepdims=True)

    def sample_transition(self, key: Array, x0: Array, sigma_bar) -> Array:
        k_move, k_tok = jax.random.split(key)
        move = jax.random.uniform(k_move, x0.shape) < -jnp.expm1(-jnp.broadcast_to(
            jnp.asarray(sigma_bar, jnp.float32), x0.shape))
        new = jax.random.randint(k_tok, x0.shape, 0, self.vocab_size, dtype=x0.dtype)
        return jnp.where(move, new, x0)

    def limit_probs(self) -> Array:
        return jnp.full((self.vocab_size,), 1.0 / self.vocab_size, default_float())

    def sample_limit(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.randint(key, shape, 0, self.vocab_size, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Absorbing(Process):
    """V real tokens plus a mask state m = V; every real token jumps to m at rate 1.

    expm(σ̄Q)[i, i] = e^{-σ̄}, [i, m] = 1 - e^{-σ̄} for i ≠ m; row m is e_m.
    """

    vocab_size: int

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def rate_matrix(self) -> Array:
        """The (V+1, V+1) generator as a dense matrix; for small vocabularies and tests."""
        s, m = self.num_states, self.mask_id
        q = -jnp.eye(s).at[:, m].set(-1.0)  # row i: -1 at i, +1 at m
        return q.at[m].set(0.0)

    def transition(self, x0: Array, sigma_bar) -> Array:
        s = _noise(sigma_bar)
        hot = _one_hot(x0, self.num_states, s.dtype)
        is_mask = hot[..., self.mask_id:]
        mask_col = _one_hot(jnp.full(x0.shape, self.mask_id), self.num_states, s.dtype)
        probs = jnp.exp(-s) * hot + (-jnp.expm1(-s)) * mask_col
        return jnp.where(is_mask > 0, mask_col, probs)

    def likelihood(self, xt: Array, sigma_bar) -> Array:
        s = _noise(sigma_bar)
        hot = _one_hot(xt, self.num_states, s.dtype)
        is_mask = hot[..., self.mask_id:]
        # xt real: only x0 = xt could have produced it, with probability e^{-σ̄}.
        # xt = mask: any real x0 with probability 1 - e^{-σ̄}; x0 = mask with probability 1.
        from_mask = (-jnp.expm1(-s)) * (1 - hot) + hot
        return jnp.where(is_mask > 0, from_mask, jnp.exp(-s) * hot)

    def rate_into(self, x: Array) -> Array:
        hot = _one_hot(x, self.num_states, default_float())
        is_mask = hot[..., self.mask_id:]
        return jnp.where(is_mask > 0, 1.0 - hot, -hot)

    def staggered_score(self, score: Array, dsigma) -> Array:
        """expm(-dσ Q)ᵀ score: e^{dσ} s, plus (1 - e^{dσ}) Σ s on the mask entry; (..., V+1)."""
        d = _noise(dsigma)
        out = jnp.exp(d) * score
        extra = -jnp.expm1(d) * score.sum(-1, keepdims=True)
        return out.at[..., self.mask_id].add(extra[..., 0])

    def sample_transition(self, key: Array, x0: Array, sigma_bar) -> Array:
        move = jax.random.uniform(key, x0.shape) < -jnp.expm1(-jnp.broadcast_to(
            jnp.asarray(sigma_bar, jnp.float32), x0.shape))
        return jnp.where(move, jnp.asarray(self.mask_id, x0.dtype), x0)

    def limit_probs(self) -> Array:
        return _one_hot(jnp.asarray(self.mask_id), self.num_states, default_float())

    def sample_limit(self, key: Array, shape: tuple[int, ...]) -> Array:
        del key
        return jnp.full(shape, self.mask_id, jnp.int32)


class MatrixProcess(Process):
    """A process given by any small dense generator Q (S, S), row convention; all through `expm`.

    `limit` defaults to the stationary distribution (unique for an ergodic Q or a Q with one
    absorbing state); pass it explicitly otherwise. `mask_id` may name an absorbing state.
    """

    def __init__(self, rate_matrix, limit=None, mask_id: int | None = None):
        q = np.asarray(rate_matrix)
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise ValueError(f"rate_matrix must be square (S, S), got shape {q.shape}")
        off = q - np.diag(np.diag(q))
        if (off < -1e-12).any() or not np.allclose(q.sum(1), 0.0, atol=1e-6):
            raise ValueError("rate_matrix must have non-negative off-diagonal rates and rows "
                             "summing to 0 (row convention: Q[i, j] = rate i -> j)")
        self._q = q
        self.num_states = q.shape[0]
        self.mask_id = mask_id
        if limit is None:  # the stationary distribution: pᵀQ = 0, Σp = 1 (least squares)
            system = np.vstack([q.T, np.ones((1, q.shape[0]))])
            rhs = np.zeros(q.shape[0] + 1)
            rhs[-1] = 1.0
            limit = np.linalg.lstsq(system, rhs, rcond=None)[0]
        self._limit = np.asarray(limit, np.float64)

    def rate_matrix(self) -> Array:
        return jnp.asarray(self._q)

    def _expm(self, sigma_bar) -> Array:
        """expm(σ̄Q) for every σ̄ entry: (..., S, S)."""
        s = jnp.asarray(sigma_bar)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            s = s.astype(jnp.float32)
        q = jnp.asarray(self._q, s.dtype)
        flat = s.reshape(-1)
        mats = jax.vmap(lambda v: jax.scipy.linalg.expm(v * q))(flat)
        return mats.reshape(s.shape + q.shape)

    def transition(self, x0: Array, sigma_bar) -> Array:
        p = self._expm(jnp.broadcast_to(jnp.asarray(sigma_bar), x0.shape))
        return jnp.take_along_axis(p, x0[..., None, None], axis=-2)[..., 0, :]

    def likelihood(self, xt: Array, sigma_bar) -> Array:
        p = self._expm(jnp.broadcast_to(jnp.asarray(sigma_bar), xt.shape))
        return jnp.take_along_axis(p, xt[..., None, None], axis=-1)[..., 0]

    def rate_into(self, x: Array) -> Array:
        return jnp.asarray(self._q, default_float()).T[x]

    def staggered_score(self, score: Array, dsigma) -> Array:
        p = self._expm(-jnp.asarray(dsigma))  # (..., S, S)
        return jnp.einsum("...yx,...y->...x", p, score)

    def limit_probs(self) -> Array:
        return jnp.asarray(self._limit, default_float())


PROCESSES = {"uniform": Uniform, "absorbing": Absorbing}


def make_process(name: str, vocab_size: int) -> Process:
    """Build "uniform" or "absorbing" over `vocab_size` real tokens."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; choose one of {sorted(PROCESSES)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    return PROCESSES[name](vocab_size)
