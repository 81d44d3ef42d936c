"""D3PM: discrete-time discrete diffusion (Austin et al. 2021), uniform and absorbing kernels.

Time is discrete, t = 0, 1, …, T, with x_0 the clean token and x_T (almost) a draw from the prior.
Matrices follow the row convention of the D3PM paper (Austin et al., 2021, "Structured Denoising
Diffusion Models in Discrete State-Spaces"), the same one as `transitions` (row i holds the
probabilities, or rates, of leaving state i):

    Q_t[i, j] = q(x_t = j | x_{t-1} = i)      (row-stochastic),    t = 1 … T
    Q̄_t = Q_1 Q_2 ⋯ Q_t,   Q̄_t[i, j] = q(x_t = j | x_0 = i),     Q̄_0 = I

Both kernels are rank-one perturbations of the identity with the same stationary distribution π
(uniform: π = 1/K over the K = vocab_size states; absorbing: π = e_m, the point mass on the mask):

    Q_t = (1 - β_t) I + β_t 1πᵀ,     Q̄_t = ᾱ_t I + (1 - ᾱ_t) 1πᵀ,     ᾱ_t = Π_{s ≤ t} (1 - β_s)

(the product closes because πᵀ1 = 1, so (1πᵀ)² = 1πᵀ). Every row, column and posterior below is
computed from these closed forms without an S×S matrix per token; `q_bar_by_product` multiplies the
dense Q_t out as an independent check. As in `transitions.Absorbing`, the absorbing process has
S = vocab_size + 1 states and the mask is state `mask_id = vocab_size`.

Schedules of β_t, t = 1 … T (arrays computed in float64 NumPy, cast at use):
  * "linear": β = linspace(beta_min, beta_max, T). Defaults beta_min = 0.02, beta_max = 1.0 (the
    D3PM paper's linear setting for the uniform kernel; β_T = 1 makes x_T exactly stationary).
    The D3PM image code's default 1e-4 … 0.02 is for its Gaussian kernel; pass it explicitly.
  * "cosine": f(s) = cos((s/T + 0.008)/1.008 · π/2) for s = 0 … T and β_t = 1 - f(t)/f(t-1),
    clipped to [0, 0.999] (both D3PM codebases use cos, not cos²; the paper's "+π/2" is a typo).
  * "jsd": β_t = 1/(T - t + 1). For absorbing this gives q(x_t = mask | x_0) = t/T exactly.
Default schedule when none is given: cosine for uniform, jsd for absorbing (the D3PM text setup).

Times: `t` is an int array whose shape is a prefix of the token array's shape — a scalar, one time
per sequence (B,) for tokens (B, L), or one per token (B, L) — padded with trailing singleton axes
and broadcast (so a (B,) time never aligns with L by accident). Times are not range-checked (they
may be traced): out-of-range steps give NaN probabilities (and NaN losses) instead of an error.
Valid ranges: [0, T] for `q_bar`, `q_xt_given_x0`, `likelihood`, `sample_xt` (which never moves a
token at a bad step); [1, T] for one-step quantities, posteriors and reverse steps.

x0-parameterisation of the reverse step, for a denoiser p̃(x_0 | x_t) (`reverse_log_probs`):
  * "mixture" (default):  p(x_{t-1} | x_t) = Σ_{x0} q(x_{t-1} | x_t, x0) p̃(x0 | x_t),
    restricted to the x0 that could have produced x_t (q(x_t | x0) > 0) and renormalised. With
    p̃ = the true q(x0 | x_t) this is exactly the true reverse q(x_{t-1} | x_t).
  * "joint" (the paper's Eq. 4):
        p(x_{t-1} | x_t) ∝ q(x_t | x_{t-1}) Σ_{x0} q(x_{t-1} | x0) p̃(x0 | x_t).
    It differs from the mixture by the factor q(x_t | x0) inside the sum: identical for absorbing
    (q(x_t | x0) is the same for every x0 consistent with x_t), different for uniform, where the
    optimal p̃ is ∝ q(x0 | x_t)/q(x_t | x0) rather than the true posterior.
Both are computed in log space from the denoiser's logits, so a confident model's tiny
probabilities keep their gradients; no epsilon is added anywhere in this module (zero
probabilities become -inf logs, and KL/cross-entropy code must treat 0·log 0 as 0).

Floats: float32 by default, float64 under `jax.enable_x64`; all functions are jit-able (the
process is a frozen, hashable dataclass and may be a static argument).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from dlm_jax.processes.transitions import default_float

KINDS = ("uniform", "absorbing")
SCHEDULES = ("linear", "cosine", "jsd")
PARAMETERIZATIONS = ("mixture", "joint")
DEFAULT_SCHEDULE = {"uniform": "cosine", "absorbing": "jsd"}
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def d3pm_betas(schedule: str, num_steps: int, beta_min: float = 0.02,
               beta_max: float = 1.0) -> np.ndarray:
    """β_1 … β_T of a named schedule as a float64 NumPy array of shape (T,).

    Args:
      schedule: "linear", "cosine" or "jsd" (see the module docstring).
      num_steps: T ≥ 1.
      beta_min, beta_max: endpoints of the linear schedule (ignored otherwise).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown D3PM schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    T = int(num_steps)
    if schedule == "linear":
        if not 0.0 <= beta_min <= beta_max <= 1.0:
            raise ValueError(f"linear D3PM schedule needs 0 <= beta_min <= beta_max <= 1, got "
                             f"beta_min={beta_min}, beta_max={beta_max}")
        return np.linspace(beta_min, beta_max, T, dtype=np.float64)
    if schedule == "cosine":
        s = np.arange(T + 1, dtype=np.float64)
        f = np.cos((s / T + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * np.pi / 2)
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, COSINE_MAX_BETA)
    # jsd: 1/T, 1/(T-1), …, 1/1
    return 1.0 / np.arange(T, 0, -1, dtype=np.float64)


def _expand_time(t, ndim: int, name: str = "t") -> Array:
    """An int time array whose shape is a prefix of a `ndim`-dim token shape, padded with
    trailing singleton axes so that it broadcasts against the tokens."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of D3PM steps, got dtype {t.dtype}")
    if t.ndim > ndim:
        raise ValueError(f"{name} of shape {t.shape} has more axes than the tokens ({ndim})")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def _log_or_neg_inf(p: Array) -> Array:
    """log p with log 0 = -inf, elementwise, same shape as p; no NaN/inf in gradients of the unused
    branch (NaN stays NaN)."""
    zero = p == 0
    return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, 1.0, p)))


@dataclasses.dataclass(frozen=True)
class D3PM:
    """Discrete-time uniform or absorbing diffusion over tokens (see the module docstring).

    Fields:
      kind: "uniform" (S = vocab_size states) or "absorbing" (S = vocab_size + 1 states, the
        mask being state vocab_size).
      vocab_size: number of real tokens K (≥ 2).
      num_steps: T ≥ 1.
      schedule: "linear", "cosine" or "jsd"; None picks cosine (uniform) / jsd (absorbing).
      beta_min, beta_max: linear-schedule endpoints, defaults 0.02 and 1.0.
    """

    kind: str
    vocab_size: int
    num_steps: int = 1000
    schedule: str | None = None
    beta_min: float = 0.02
    beta_max: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown D3PM kind {self.kind!r}; choose one of {list(KINDS)}")
        if int(self.vocab_size) != self.vocab_size or self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {self.vocab_size!r}")
        object.__setattr__(self, "vocab_size", int(self.vocab_size))
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        object.__setattr__(self, "num_steps", int(self.num_steps))
        if self.schedule is None:
            object.__setattr__(self, "schedule", DEFAULT_SCHEDULE[self.kind])
        d3pm_betas(self.schedule, self.num_steps, self.beta_min, self.beta_max)  # validates

    # --- static structure ---------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        """S: vocab_size for uniform, vocab_size + 1 for absorbing."""
        return self.vocab_size + (self.kind == "absorbing")

    @property
    def mask_id(self) -> int | None:
        """The absorbing state (vocab_size), or None for uniform."""
        return self.vocab_size if self.kind == "absorbing" else None

    @functools.cached_property
    def _tables(self) -> dict[str, np.ndarray]:
        """float64 tables indexed by t = 0 … T (entry 0 is the identity step)."""
        beta = np.concatenate([[0.0], d3pm_betas(self.schedule, self.num_steps, self.beta_min,
                                                 self.beta_max)])
        with np.errstate(divide="ignore"):
            log_keep = np.cumsum(np.log1p(-beta))  # log ᾱ_t, -inf once some β_s = 1
        alpha_bar, one_minus_alpha_bar = np.exp(log_keep), -np.expm1(log_keep)
        return {
            "beta": beta,
            "alpha_bar": alpha_bar,
            "one_minus_alpha_bar": one_minus_alpha_bar,
            # one (T+1, 4) table so that every look-up is a single gather
            "all": np.stack([1.0 - beta, beta, alpha_bar, one_minus_alpha_bar], axis=-1),
        }

    def _coefs(self, t: Array, cumulative: bool) -> tuple[Array, Array]:
        """(keep, move) at int steps t: (1-β_t, β_t), or (ᾱ_t, 1-ᾱ_t) if `cumulative`.

        NaN outside [0, T], so that bad times are visible rather than silently clamped.
        """
        tab = jnp.asarray(self._tables["all"], default_float())
        vals = tab[jnp.clip(t, 0, self.num_steps)]
        vals = jnp.where(((t >= 0) & (t <= self.num_steps))[..., None], vals, jnp.nan)
        i = 2 if cumulative else 0
        return vals[..., i], vals[..., i + 1]

    def prior_probs(self) -> Array:
        """π, the stationary / limit distribution and the prior p(x_T): (S,)."""
        if self.kind == "uniform":
            return jnp.full((self.num_states,), 1.0 / self.num_states, default_float())
        return jax.nn.one_hot(self.mask_id, self.num_states, dtype=default_float())

    def _pi_at(self, x: Array) -> Array:
        """π[x] for tokens x: same shape as x."""
        if self.kind == "uniform":
            return jnp.full(x.shape, 1.0 / self.num_states, default_float())
        return (x == self.mask_id).astype(default_float())

    # --- schedules ----------------------------------------------------------------------------
    def betas(self) -> Array:
        """β_1 … β_T: (T,), entry t-1 is β_t."""
        return jnp.asarray(self._tables["beta"][1:], default_float())

    def alpha_bars(self) -> Array:
        """ᾱ_0 … ᾱ_T: (T+1,), ᾱ_0 = 1 and ᾱ_t = Π_{s≤t} (1 - β_s)."""
        return jnp.asarray(self._tables["alpha_bar"], default_float())

    # --- matrices (dense; for tests and small vocabularies) -----------------------------------
    def _rank_one(self, keep: Array) -> Array:
        """keep·I + (1 - keep)·1πᵀ for every entry of `keep` (...): (..., S, S)."""
        keep = keep[..., None, None]
        eye = jnp.eye(self.num_states, dtype=keep.dtype)
        return keep * eye + (1.0 - keep) * self.prior_probs()[None, :]

    def q_one_step(self, t) -> Array:
        """Q_t = (1-β_t) I + β_t 1πᵀ for int t (...) in [1, T]: (..., S, S), rows sum to 1."""
        t = _expand_time(t, jnp.ndim(t))
        return self._rank_one(self._coefs(t, cumulative=False)[0])

    def q_bar(self, t) -> Array:
        """Q̄_t = Q_1⋯Q_t = ᾱ_t I + (1-ᾱ_t) 1πᵀ (closed form), int t (...) in [0, T]: (..., S, S)."""
        t = _expand_time(t, jnp.ndim(t))
        return self._rank_one(self._coefs(t, cumulative=True)[0])

    def q_bar_by_product(self) -> Array:
        """Q̄_0 … Q̄_T by explicit matrix products Q̄_t = Q̄_{t-1} Q_t: (T+1, S, S).

        An independent check of `q_bar` (lax.scan, HIGHEST-precision matmuls); O(T S³).
        """
        steps = self.q_one_step(jnp.arange(1, self.num_steps + 1))

        def body(qbar, q):
            nxt = jnp.matmul(qbar, q, precision=jax.lax.Precision.HIGHEST)
            return nxt, nxt

        eye = jnp.eye(self.num_states, dtype=steps.dtype)
        _, qbars = jax.lax.scan(body, eye, steps)
        return jnp.concatenate([eye[None], qbars], axis=0)

    # --- rows and columns, closed form --------------------------------------------------------
    def _row(self, x: Array, keep: Array, move: Array) -> Array:
        """keep·e_x + move·π: (..., S)."""
        hot = jax.nn.one_hot(x, self.num_states, dtype=default_float())
        return keep[..., None] * hot + move[..., None] * self.prior_probs()

    def _column(self, x: Array, keep: Array, move: Array) -> Array:
        """Column x of keep·I + move·1πᵀ: keep·e_x + move·π[x]·1, (..., S)."""
        hot = jax.nn.one_hot(x, self.num_states, dtype=default_float())
        return keep[..., None] * hot + (move * self._pi_at(x))[..., None]

    def q_xt_given_x0(self, x0: Array, t) -> Array:
        """q(x_t = · | x_0 = x0) = row x0 of Q̄_t = ᾱ_t e_{x0} + (1-ᾱ_t) π.

        Args: x0 (...) int tokens; t int, prefix-broadcast to x0 (see module docstring), in [0, T].
        Returns: (..., S) probabilities.
        """
        t = _expand_time(t, x0.ndim)
        return self._row(x0, *self._coefs(t, cumulative=True))

    def q_xt_given_xprev(self, xprev: Array, t) -> Array:
        """q(x_t = · | x_{t-1} = xprev) = row xprev of Q_t: (..., S); t in [1, T]."""
        t = _expand_time(t, xprev.ndim)
        return self._row(xprev, *self._coefs(t, cumulative=False))

    def forward_probs(self, x0_probs: Array, t) -> Array:
        """p Q̄_t for a distribution p over x_0 (..., S): ᾱ_t p + (1-ᾱ_t)(Σp) π, (..., S)."""
        t = _expand_time(t, x0_probs.ndim - 1)
        keep, move = (c[..., None] for c in self._coefs(t, cumulative=True))
        return keep * x0_probs + move * x0_probs.sum(-1, keepdims=True) * self.prior_probs()

    def likelihood(self, xt: Array, t) -> Array:
        """q(x_t = xt | x_0 = ·) = column xt of Q̄_t: (..., S); t in [0, T]."""
        t = _expand_time(t, xt.ndim)
        return self._column(xt, *self._coefs(t, cumulative=True))

    def likelihood_one_step(self, xt: Array, t) -> Array:
        """q(x_t = xt | x_{t-1} = ·) = column xt of Q_t: (..., S); t in [1, T]."""
        t = _expand_time(t, xt.ndim)
        return self._column(xt, *self._coefs(t, cumulative=False))

    # --- sampling -----------------------------------------------------------------------------
    def sample_xt(self, key: Array, x0: Array, t) -> Array:
        """Draw x_t ~ q(· | x0) per token: same shape and dtype as x0; t in [0, T].

        A token moves with probability 1 - ᾱ_t (exact comparison of a uniform draw, no Gumbel):
        to a uniformly drawn state (uniform; it may redraw x0) or to the mask (absorbing).
        """
        t = _expand_time(t, x0.ndim)
        move_prob = jnp.broadcast_to(self._coefs(t, cumulative=True)[1], x0.shape)
        k_move, k_tok = jax.random.split(key)
        move = jax.random.uniform(k_move, x0.shape, dtype=move_prob.dtype) < move_prob
        if self.kind == "uniform":
            new = jax.random.randint(k_tok, x0.shape, 0, self.num_states, dtype=x0.dtype)
        else:
            new = jnp.full(x0.shape, self.mask_id, x0.dtype)
        return jnp.where(move, new, x0)

    def sample_prior(self, key: Array, shape: tuple[int, ...]) -> Array:
        """Draw x_T ~ π: int32 array of `shape` (all-mask for absorbing)."""
        if self.kind == "uniform":
            return jax.random.randint(key, shape, 0, self.num_states, dtype=jnp.int32)
        return jnp.full(shape, self.mask_id, jnp.int32)

    # --- posteriors and the reverse step ------------------------------------------------------
    def x0_log_probs(self, logits: Array) -> Array:
        """log p̃(x_0 | x_t) from raw logits: log-softmax over the states, (..., S).

        For absorbing the mask entry is excluded (log-prob -inf); `logits` may then have either S
        or vocab_size entries on the last axis (a missing mask column is added as -inf).
        """
        logits = jnp.asarray(logits)
        if not jnp.issubdtype(logits.dtype, jnp.floating):
            raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
        logits = logits.astype(jnp.promote_types(logits.dtype, default_float()))
        n = logits.shape[-1] if logits.ndim else None
        if self.kind == "absorbing":
            if n == self.vocab_size:
                pad = jnp.full(logits.shape[:-1] + (1,), -jnp.inf, logits.dtype)
                logits = jnp.concatenate([logits, pad], axis=-1)
            elif n == self.num_states:
                is_mask = jnp.arange(self.num_states) == self.mask_id
                logits = jnp.where(is_mask, -jnp.inf, logits)
            else:
                raise ValueError(f"absorbing D3PM logits need a last axis of num_states="
                                 f"{self.num_states} or vocab_size={self.vocab_size}, got shape "
                                 f"{logits.shape}")
        elif n != self.num_states:
            raise ValueError(f"uniform D3PM logits need a last axis of num_states="
                             f"{self.num_states}, got shape {logits.shape}")
        return jax.nn.log_softmax(logits, axis=-1)

    def _log_column(self, x: Array, keep: Array, move: Array) -> Array:
        """log of `_column` (no parameters involved), -inf where 0: (..., S)."""
        return _log_or_neg_inf(self._column(x, keep, move))

    def _log_mix(self, log_w: Array, keep: Array, move: Array) -> Array:
        """log(w M) for M = keep·I + move·1πᵀ and unnormalised log-weights log_w (..., S).

        (w M)_j = keep·w_j + move·(Σw)·π_j. Where move·π_j > 0 the sum is formed in probability
        space after shifting by c = logsumexp(log_w) (no cancellation, both terms ≥ 0); where it
        is 0 the value is log keep + log w_j exactly, so tiny w_j keep their logs and gradients.
        """
        c = jax.nn.logsumexp(log_w, axis=-1, keepdims=True)
        c = jnp.where(jnp.isfinite(c), c, 0.0)
        w = jnp.exp(log_w - c)
        coef = move[..., None] * self.prior_probs()
        pos = coef > 0
        mixed = jnp.log(jnp.where(pos, keep[..., None] * w + coef, 1.0))
        direct = _log_or_neg_inf(keep)[..., None] + log_w - c
        return c + jnp.where(pos, mixed, direct)

    def reverse_log_probs(self, xt: Array, logits: Array, t, *,
                          parameterization: str = "mixture") -> Array:
        """log p_θ(x_{t-1} = · | x_t = xt) from a denoiser's logits of p̃(x_0 | x_t).

        Args:
          xt: (...) int tokens at step t.
          logits: (..., S) raw logits of p̃(x_0 | x_t) (absorbing: mask entry ignored; S or V
            entries, see `x0_log_probs`). Normalised log-probabilities work too.
          t: int steps in [1, T], prefix-broadcast to xt.
          parameterization: "mixture" (posterior mixture) or "joint" (paper Eq. 4).
        Returns:
          (..., S) normalised log-probabilities (-inf for impossible states). At t = 1 this is
          the decoder p_θ(x_0 | x_1).
        """
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown D3PM parameterization {parameterization!r}; choose one of "
                             f"{list(PARAMETERIZATIONS)}")
        log_p0 = self.x0_log_probs(logits)
        if log_p0.shape[:-1] != xt.shape:
            raise ValueError(f"logits shape {log_p0.shape[:-1]} + (S,) does not match xt shape "
                             f"{xt.shape}")
        t = _expand_time(t, xt.ndim)
        if parameterization == "mixture":
            # w(x0) = p̃(x0 | x_t) / q(x_t | x0), over the x0 that can produce x_t.
            lik = self.likelihood(xt, t)
            log_w = jnp.where(lik > 0, log_p0 - _log_or_neg_inf(lik), -jnp.inf)
        else:
            log_w = log_p0
        # Σ_{x0} w(x0) Q̄_{t-1}[x0, ·]  (a row mixture), then times the column Q_t[·, x_t].
        log_m = self._log_mix(log_w, *self._coefs(t - 1, cumulative=True))
        log_col = self._log_column(xt, *self._coefs(t, cumulative=False))
        un = log_col + log_m
        lse = jax.nn.logsumexp(un, axis=-1, keepdims=True)
        return un - jnp.where(jnp.isfinite(lse), lse, 0.0)

    def posterior(self, xt: Array, x0: Array, t, *, parameterization: str = "mixture") -> Array:
        """q(x_{t-1} | x_t, x_0) or its x0-parameterised mixture, as probabilities (..., S).

        Args:
          xt: (...) int tokens at step t.
          x0: either (...) int clean tokens — the exact posterior
                q(x_{t-1} | x_t, x0) = Q_t[·, x_t] ⊙ Q̄_{t-1}[x0, ·] / Q̄_t[x0, x_t]
              (all zeros when q(x_t | x0) = 0, an impossible pair) — or (..., S) probabilities
              p̃(x_0 | x_t), giving the reverse step of `reverse_log_probs` with the chosen
              `parameterization` (a one-hot p̃ gives the exact posterior in both forms).
          t: int steps in [1, T], prefix-broadcast to xt.
        """
        x0 = jnp.asarray(x0)
        if jnp.issubdtype(x0.dtype, jnp.integer):
            if x0.shape != xt.shape:
                raise ValueError(f"x0 shape {x0.shape} must equal xt shape {xt.shape}")
            t = _expand_time(t, xt.ndim)
            col = self.likelihood_one_step(xt, t)
            row = self._row(x0, *self._coefs(t - 1, cumulative=True))
            un = col * row
            total = un.sum(-1, keepdims=True)
            return jnp.where(total == 0, 0.0, un / jnp.where(total == 0, 1.0, total))
        return jnp.exp(self.reverse_log_probs(xt, _log_or_neg_inf(x0), t,
                                              parameterization=parameterization))

    def sample_reverse(self, key: Array, xt: Array, logits: Array, t, *,
                       parameterization: str = "mixture") -> Array:
        """Draw x_{t-1} ~ p_θ(· | x_t) from the denoiser's logits (..., S); same shape as xt."""
        log_p = self.reverse_log_probs(xt, logits, t, parameterization=parameterization)
        return jax.random.categorical(key, log_p).astype(xt.dtype)

    # --- prior ----------------------------------------------------------------------------------
    def prior_kl(self, x0: Array) -> Array:
        """KL(q(x_T | x0) ‖ π) per token: (...) for x0 (...).

        Uniform: with a = ᾱ_T, q = a e_{x0} + (1-a)/K, so
            KL = (a + (1-a)/K) log1p(a(K-1)) + (K-1)/K · (1-a) log(1-a).
        Absorbing: 0 if ᾱ_T = 0 (β_T = 1, e.g. jsd or linear up to 1) or x0 is the mask, +inf
        otherwise (q(x_T | x0) keeps mass on x0 where the all-mask prior has none).
        """
        a = self._tables["alpha_bar"][-1]
        b = self._tables["one_minus_alpha_bar"][-1]
        if self.kind == "uniform":
            k = self.num_states
            kl = (a + b / k) * math.log1p(a * (k - 1))
            if b > 0:
                kl += (k - 1) / k * b * math.log(b)
            return jnp.full(x0.shape, kl, default_float())
        if a == 0:
            return jnp.zeros(x0.shape, default_float())
        return jnp.where(x0 == self.mask_id, 0.0, jnp.inf).astype(default_float())
