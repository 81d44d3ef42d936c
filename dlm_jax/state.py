"""The train state pytree, the optimizer and the EMA update.

Parameters live as a pure nested dict (`nnx.to_pure_dict(state)`), so the state is a plain
pytree: optax, orbax and sharding see arrays, and renaming a module class never breaks an old
checkpoint. The model is rebuilt inside jitted code with `nnx.merge(graphdef, params)`.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dlm_jax.config import OptimConfig


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params / ema_params: pure dicts of float32 arrays; opt_state: optax;
    clip: float32 (2,), the training time interval [β_l, β_u] of the clipped schedule (BD3-LM),
    state rather than config because the clip search changes it during training."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    clip: jax.Array

    @property
    def eval_params(self) -> Any:
        """What evaluation and sampling use: the EMA parameters when kept, else the params."""
        return self.ema_params if self.ema_params is not None else self.params


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr` (counting steps from 1, as SEDD), then constant or cosine decay."""
    warm = max(cfg.warmup_steps, 1)

    def schedule(count):
        step = count + 1
        warmup = cfg.lr * jnp.minimum(step / warm, 1.0)
        if cfg.decay == "constant":
            return warmup
        frac = jnp.clip((step - warm) / max(total_steps - warm, 1), 0.0, 1.0)
        floor = cfg.min_lr_ratio
        cosine = cfg.lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        return jnp.where(step <= warm, warmup, cosine)

    return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the schedule above."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def ema_update(ema_params, params, step: jax.Array, decay: float):
    """EMA with SEDD's warm-up: effective decay min(decay, (1 + n) / (10 + n)), n = updates so far."""
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def init_state(params, tx: optax.GradientTransformation, ema_decay: float,
               clip: tuple[float, float] = (1e-3, 1.0)) -> TrainState:
    """A fresh state at step 0 (EMA starts at the parameters; None when disabled)."""
    ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=ema, clip=jnp.asarray(clip, jnp.float32))
