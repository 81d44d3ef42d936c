"""Pure train / eval steps of an `Experiment`, their shardings and their jitted versions.

The model is rebuilt inside the step from its graph definition and the params pure dict
(`nnx.merge`), so the step is a pure function of (state, batch). Per-step randomness is
`fold_in(key(seed), step)`: a resumed run reproduces the keys of an uninterrupted one, and with
jax's partitionable threefry the draws do not depend on the mesh. The clip interval of the state
is passed to the loss as a traced value: a new interval from the clip search needs no recompile;
so is the step (attention-mask annealing widens with it).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlm_jax.checkpoint import abstract_with_shardings
from dlm_jax.config import OptimConfig
from dlm_jax.state import TrainState, ema_update, init_state, learning_rate


def make_train_step(method, graphdef, tx: optax.GradientTransformation, optim: OptimConfig, *,
                    total_steps: int, seed: int
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """(state, batch) -> (state, metrics); gradient accumulation by a scan over microbatches."""
    accum = optim.accum_steps
    lr_fn = learning_rate(optim, total_steps)

    def micro(params, batch, key, clip, step):
        return method.loss(nnx.merge(graphdef, params), batch, key, train=True, clip=clip,
                           step=step)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        if accum == 1:
            (loss, _), grads = grad_fn(state.params, batch, key, state.clip, state.step)
        else:
            micro_batches = jax.tree.map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, xs):
                g_sum, l_sum = carry
                mb, i = xs
                (l, _), g = grad_fn(state.params, mb, jax.random.fold_in(key, i), state.clip,
                                    state.step)
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
            ema = ema_update(ema, params, state.step, optim.ema_decay)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new_state, metrics

    return train_step


def make_eval_step(method, graphdef, seed: int, *, t_samples: int = 1,
                   times: str = "stratified") -> Callable[[Any, dict, jax.Array], dict]:
    """(params, batch, index) -> metrics, with the key fold_in(key(seed + 1), index).

    The method's per-sequence objective (`Method.sequence_loss`, `t_samples` draws of scheme
    `times`) reduced on device to "loss" (the batch's token-weighted mean) and the batch's
    moments (`evals.validation.batch_moments`: scalars, so one small transfer per batch, on any
    number of hosts) from which validation computes the standard error; the method's other
    scalar metrics pass through."""
    from dlm_jax.evals.validation import batch_moments

    def eval_step(params, batch: dict, index):
        key = jax.random.fold_in(jax.random.key(seed + 1), index)
        sums, tokens, metrics = method.sequence_loss(nnx.merge(graphdef, params), batch, key,
                                                     t_samples=t_samples, times=times)
        moments = batch_moments(sums, tokens)
        return {"loss": moments["mean"], **metrics, **moments}

    return eval_step


def state_shardings(state_like: TrainState, param_sh, tx, mesh) -> TrainState:
    """Shardings of a whole TrainState: optimizer moments and EMA follow the parameters."""
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, state_like.opt_state, param_sh,
        transform_non_params=lambda _: replicated)
    ema_sh = param_sh if state_like.ema_params is not None else None
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, ema_params=ema_sh,
                      clip=replicated)


class TrainProgram:
    """An experiment's optimizer, state layout and jitted steps (built once, compiled once).

    `init()` a fresh sharded state; `step(state, global_batch)` one donated train step;
    `eval_step(params, global_batch, index)` evaluation metrics; `abstract_state` the
    ShapeDtypeStructs with shardings that checkpoints restore into.
    """

    def __init__(self, exp, tx: optax.GradientTransformation):
        cfg = exp.cfg
        self.exp, self.tx = exp, tx
        self.clip = tuple(float(c) for c in cfg.diffusion.clip)
        abstract = jax.eval_shape(
            lambda p: init_state(p, tx, cfg.optim.ema_decay, self.clip), exp.abstract_params)
        self.state_shardings = state_shardings(abstract, exp.param_shardings, tx, exp.mesh)
        self.abstract_state = abstract_with_shardings(abstract, self.state_shardings)
        self.step = jax.jit(
            make_train_step(exp.method, exp.graphdef, tx, cfg.optim, total_steps=cfg.train.steps,
                            seed=cfg.train.seed),
            in_shardings=(self.state_shardings, exp.batch_sharding),
            out_shardings=(self.state_shardings, None), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(exp.method, exp.graphdef, cfg.train.seed,
                                                t_samples=cfg.train.eval_t_samples,
                                                times=cfg.train.eval_times),
                                 in_shardings=(exp.param_shardings, exp.batch_sharding, None))

    def init(self, params=None) -> TrainState:
        """A fresh state: parameters from the config's seed, or `params` (a pure dict laid out
        like `exp.abstract_params`, e.g. imported weights) with a fresh optimizer state."""
        exp, cfg = self.exp, self.exp.cfg
        if params is not None:
            return jax.jit(lambda p: init_state(p, self.tx, cfg.optim.ema_decay, self.clip),
                           in_shardings=(exp.param_shardings,),
                           out_shardings=self.state_shardings)(params)

        def init():
            params = nnx.to_pure_dict(nnx.split(exp.new_model(cfg.train.seed))[1])
            return init_state(params, self.tx, cfg.optim.ema_decay, self.clip)

        # No mesh context here: parameters are created unsharded and placed by out_shardings.
        return jax.jit(init, out_shardings=self.state_shardings)()
