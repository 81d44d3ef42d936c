"""Noise schedules for continuous-time discrete diffusion, t ∈ [0, 1].

Every schedule gives the integrated noise `sigma_bar(t) = ∫_0^t sigma(s) ds` and its derivative
`sigma(t)`. For masking processes the keep probability is `alpha(t) = exp(-sigma_bar(t))`, with
derivative `dalpha(t) = -sigma(t) · alpha(t)`. Schedules whose alpha has a simple closed form
override `alpha`, `dalpha` and `move_prob` so that nothing is computed as a difference of nearly
equal numbers.

`nelbo_weight(t) = -alpha'(t) / (1 - alpha(t)) = sigma(t) / expm1(sigma_bar(t))` is the weight of
the continuous-time masked NELBO (MDLM) and the total mass of the true ratios of an absorbing
process (SEDD); it is 1/t for the log-linear schedule.

All methods accept float arrays of any shape and return arrays of the same shape and dtype
(float32 by default, float64 under `jax.enable_x64`). Schedules are frozen dataclasses, hence
hashable and usable as static arguments of `jax.jit`.

How each schedule behaves as t → 1 (the prior term of the NELBO):
  * LogLinear(eps): alpha(1) = eps, so a fraction eps of tokens is still clean at t = 1 and the
    prior KL against an all-mask limit is infinite; against the process's own marginal at t = 1 it
    is 0. eps = 0 gives alpha(1) = 0 exactly (sigma_bar(1) = inf): the BD3-LM convention.
  * Geometric(sigma_min, sigma_max): sigma_bar(1) = sigma_max, prior KL ~ exp(-sigma_max).
  * Linear(sigma_min, sigma_max): sigma_bar(1) = sigma_max, likewise.
  * Cosine(eps): alpha(1) = eps, like LogLinear.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import Array


def _as_float(t) -> Array:
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


class Schedule:
    """Base class: subclasses define `sigma_bar` and `sigma`; the rest follows."""

    def sigma_bar(self, t) -> Array:
        raise NotImplementedError

    def sigma(self, t) -> Array:
        raise NotImplementedError

    def alpha(self, t) -> Array:
        """Keep probability exp(-sigma_bar(t)); same shape as t."""
        return jnp.exp(-self.sigma_bar(t))

    def dalpha(self, t) -> Array:
        """d alpha / dt = -sigma(t) alpha(t); same shape as t."""
        return -self.sigma(t) * self.alpha(t)

    def move_prob(self, t) -> Array:
        """1 - alpha(t), computed without cancellation; same shape as t."""
        return -jnp.expm1(-self.sigma_bar(t))

    def nelbo_weight(self, t) -> Array:
        """-alpha'(t) / (1 - alpha(t)) ≥ 0; same shape as t."""
        return -self.dalpha(t) / self.move_prob(t)


@dataclasses.dataclass(frozen=True)
class LogLinear(Schedule):
    """alpha(t) = 1 - (1 - eps) t, i.e. sigma_bar(t) = -log1p(-(1 - eps) t).

    The default of SEDD-absorb, MDLM (eps = 1e-3) and BD3-LM (eps = 0, move chance exactly t).
    """

    eps: float = 1e-3

    def sigma_bar(self, t) -> Array:
        return -jnp.log1p(-(1.0 - self.eps) * _as_float(t))

    def sigma(self, t) -> Array:
        t = _as_float(t)
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def alpha(self, t) -> Array:
        return 1.0 - (1.0 - self.eps) * _as_float(t)

    def dalpha(self, t) -> Array:
        t = _as_float(t)
        return jnp.full_like(t, -(1.0 - self.eps))

    def move_prob(self, t) -> Array:
        return (1.0 - self.eps) * _as_float(t)

    def nelbo_weight(self, t) -> Array:
        return 1.0 / _as_float(t)


@dataclasses.dataclass(frozen=True)
class Geometric(Schedule):
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (SEDD-uniform's default; config 1e-4 … 20)."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"Geometric schedule needs 0 < sigma_min < sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    def sigma_bar(self, t) -> Array:
        t = _as_float(t)
        return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

    def sigma(self, t) -> Array:
        return self.sigma_bar(t) * math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
    """sigma_bar(t) = sigma_min + t (sigma_max - sigma_min) (MDLM's `linear`: 1e-3 … 7)."""

    sigma_min: float = 1e-3
    sigma_max: float = 7.0

    def __post_init__(self):
        if not 0 <= self.sigma_min < self.sigma_max:
            raise ValueError(f"Linear schedule needs 0 <= sigma_min < sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    def sigma_bar(self, t) -> Array:
        return self.sigma_min + _as_float(t) * (self.sigma_max - self.sigma_min)

    def sigma(self, t) -> Array:
        return jnp.full_like(_as_float(t), self.sigma_max - self.sigma_min)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2), sigma_bar = -log alpha (MDLM's `cosine`)."""

    eps: float = 1e-3

    def alpha(self, t) -> Array:
        return self.eps + (1.0 - self.eps) * jnp.cos(0.5 * jnp.pi * _as_float(t))

    def dalpha(self, t) -> Array:
        return -(1.0 - self.eps) * 0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * _as_float(t))

    def move_prob(self, t) -> Array:
        # 1 - cos(x) = 2 sin^2(x / 2): no cancellation near t = 0.
        half = 0.25 * jnp.pi * _as_float(t)
        return (1.0 - self.eps) * 2.0 * jnp.sin(half) ** 2

    def sigma_bar(self, t) -> Array:
        return -jnp.log(self.alpha(t))

    def sigma(self, t) -> Array:
        return -self.dalpha(t) / self.alpha(t)


@dataclasses.dataclass(frozen=True)
class Clipped(Schedule):
    """A schedule whose training times are drawn from [beta_l, beta_u] ⊂ [0, 1] (BD3-LM).

    The noise functions are the base schedule's: only where t is sampled changes, so a clipped
    run's NELBO weight stays -alpha'/(1-alpha). Read the bounds with `time_bounds`.
    """

    base: Schedule
    beta_l: float = 1e-3
    beta_u: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.beta_l <= self.beta_u <= 1.0:
            raise ValueError(f"Clipped schedule needs 0 <= beta_l <= beta_u <= 1, got "
                             f"beta_l={self.beta_l}, beta_u={self.beta_u}")

    def sigma_bar(self, t):
        return self.base.sigma_bar(t)

    def sigma(self, t):
        return self.base.sigma(t)

    def alpha(self, t):
        return self.base.alpha(t)

    def dalpha(self, t):
        return self.base.dalpha(t)

    def move_prob(self, t):
        return self.base.move_prob(t)

    def nelbo_weight(self, t):
        return self.base.nelbo_weight(t)


def time_bounds(schedule: Schedule, sampling_eps: float = 1e-3) -> tuple[float, float]:
    """The interval training times are drawn from: [beta_l, beta_u] if clipped, else [eps, 1]."""
    if isinstance(schedule, Clipped):
        return schedule.beta_l, schedule.beta_u
    return sampling_eps, 1.0


SCHEDULES = {"loglinear": LogLinear, "geometric": Geometric, "linear": Linear, "cosine": Cosine}


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name ("loglinear", "geometric", "linear", "cosine")."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
