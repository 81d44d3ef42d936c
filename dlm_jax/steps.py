"""Pure train / eval steps and their jitted, sharded versions.

The model is rebuilt inside the step from its graph definition and the params pure dict
(`nnx.merge`), so the step is a pure function of (state, batch). Per-step randomness is
`fold_in(key(seed), step)`: a resumed run reproduces the keys of an uninterrupted one, and with
jax's partitionable threefry the draws do not depend on the mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlm_jax.config import Config
from dlm_jax.state import TrainState, ema_update, init_state, learning_rate


def make_train_step(cfg: Config, graphdef, loss_fn, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """(state, batch) -> (state, metrics); gradient accumulation by a scan over microbatches."""
    accum = cfg.optim.accum_steps
    lr_fn = learning_rate(cfg.optim, cfg.train.steps)
    seed = cfg.train.seed

    def micro(params, batch, key):
        model = nnx.merge(graphdef, params)
        return loss_fn(model, batch, key, train=True)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        if accum == 1:
            (loss, _), grads = grad_fn(state.params, batch, key)
        else:
            micro_batches = jax.tree.map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, xs):
                g_sum, l_sum = carry
                mb, i = xs
                (l, _), g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                            (micro_batches, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, state.step, cfg.optim.ema_decay)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, loss_fn, seed: int) -> Callable[[Any, dict, jax.Array], dict]:
    """(params, batch, index) -> metrics, with the key fold_in(key(seed + 1), index)."""

    def eval_step(params, batch: dict, index):
        key = jax.random.fold_in(jax.random.key(seed + 1), index)
        model = nnx.merge(graphdef, params)
        loss, metrics = loss_fn(model, batch, key, train=False)
        return metrics

    return eval_step


def state_shardings(state_like: TrainState, param_sh, tx, mesh) -> TrainState:
    """Shardings of a whole TrainState: optimizer moments and EMA follow the parameters."""
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, state_like.opt_state, param_sh,
        transform_non_params=lambda _: replicated)
    ema_sh = param_sh if state_like.ema_params is not None else None
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, ema_params=ema_sh)


def abstract_state(params_abstract, tx, ema_decay: float) -> TrainState:
    """ShapeDtypeStructs of a fresh TrainState, without allocating it."""
    return jax.eval_shape(lambda p: init_state(p, tx, ema_decay), params_abstract)
