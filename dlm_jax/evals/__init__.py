"""Evaluators the trainer runs every `train.eval_every` steps (and `dlm_jax.evaluate` once).

An evaluator is called as `evaluator(params, batches) -> (metrics, updates)`: `batches` an
iterator of global validation batches (shared, in order, by the evaluators of one evaluation),
`metrics` a dict of floats, `updates` TrainState fields to replace (the clip search sets
`clip`; evaluation alone ignores them).
"""
from __future__ import annotations

import jax

from dlm_jax.evals.clip_search import ClipSearch, clip_candidates
from dlm_jax.evals.validation import Validation

EVALUATORS = {"validation": Validation, "clip_search": ClipSearch}


def validation_batches(exp, repeat: bool = True):
    """Global validation batches of `train.batch_size` rows, the same sequence every call
    (`repeat=False`: one pass over the split, so no sequence counts twice)."""
    from dlm_jax.data.pipeline import to_global
    ds = exp.dataset("validation", global_batch=exp.cfg.train.batch_size, repeat=repeat,
                     shuffle=False)
    return (to_global(b, exp.batch_sharding) for b in ds)


def run_evaluators(evaluators, exp, state, *, repeat: bool = True) -> tuple[dict, dict]:
    """Run `evaluators` in order on the state's EMA parameters (its parameters without EMA),
    sharing one pass over the validation batches (`validation_batches(exp, repeat)`); returns
    (metrics, state updates)."""
    params = state.eval_params
    batches = validation_batches(exp, repeat)
    metrics, updates = {}, {}
    for evaluator in evaluators:
        m, u = evaluator(params, batches)
        metrics.update(m)
        updates.update(u)
    return metrics, updates


def build_evaluators(exp, program, *, batches: int | None = None, clip_search: bool | None = None,
                     target_se: float | None = None, max_batches: int | None = None) -> list:
    """The evaluators a run of `exp` uses: validation, then (when `diffusion.var_min` is on and
    the method has one) the clip search. `batches` overrides `train.eval_batches`; `target_se`
    and `max_batches` size validation to a standard error (`Validation`)."""
    cfg = exp.cfg
    out = [Validation(exp, program.eval_step, batches or cfg.train.eval_batches,
                      target_se=target_se, max_batches=max_batches)]
    search = cfg.diffusion.var_min if clip_search is None else clip_search
    if search and exp.method.clip_search:
        out.append(ClipSearch(exp, cfg.diffusion.clip_search_batches))
    return out


__all__ = ["ClipSearch", "EVALUATORS", "Validation", "build_evaluators", "clip_candidates",
           "run_evaluators", "validation_batches"]


def restore_run(workdir: str, overrides=None):
    """(exp, program, step, state) of the newest checkpoint in a training run's directory, built
    from the run's config.json (`overrides(cfg)` may edit it first, e.g. the sampling section).
    Creates nothing. FileNotFoundError names what is missing."""
    import json
    import os

    from dlm_jax import registry
    from dlm_jax.checkpoint import Checkpointer, abstract_with_shardings
    from dlm_jax.config import Config
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a dlm_jax training run?")
    with open(path) as f:
        cfg = Config.from_dict(json.load(f))
    if overrides is not None:
        overrides(cfg)
    exp = registry.build(cfg)
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} not found: the run has no checkpoint yet")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep, async_save=False, create=False)
    try:
        latest = ckpt.latest_step()
        if latest is not None and ckpt.is_params_only(latest):  # imported weights
            step, params = ckpt.restore_params(
                abstract_with_shardings(exp.abstract_params, exp.param_shardings), latest)
            state = program.init(params)
        else:
            step, state = ckpt.restore_state_only(program.abstract_state)
    finally:
        ckpt.close()
    return exp, program, step, state


def initial_params(workdir: str, exp):
    """The (EMA) parameters of the newest checkpoint of run `workdir` (`train.init_from`), placed
    on `exp`'s parameter shardings and in its layer layout (`model.scan_layers`: the blocks
    stacked or not, whatever the source run used). An AR run (causal DiT) starting a
    diffusion model is adapted (`models.adapt.ar_to_diffusion`: the AR function, adaLN at
    identity, extra mask state).
    ConfigError lists every parameter that does not fit `exp`'s model (missing, extra or
    another shape)."""
    from dlm_jax.config import ConfigError
    try:
        src, _, step, state = restore_run(workdir)
    except FileNotFoundError as e:
        raise ConfigError(f"config.train.init_from={workdir!r}: {e}") from None
    from dlm_jax.models.convert import shape_problems
    from dlm_jax.models.layout import find_layout, to_layout
    params = jax.device_get(state.eval_params)
    if src.method.causal and not exp.method.causal:
        params = _adapted(workdir, src, params, exp)
    # The source run's layer layout (model.scan_layers) need not be this run's.
    params = to_layout(params, bool(find_layout(exp.abstract_params)))
    problems = shape_problems(params, exp.abstract_params)
    if problems:
        raise ConfigError(f"config.train.init_from={workdir!r} (step {step}): its parameters do "
                          f"not fit this model: " + "; ".join(problems[:8])
                          + (f"; … {len(problems) - 8} more" if len(problems) > 8 else ""))
    return jax.device_put(params, exp.param_shardings)


def _adapted(workdir: str, src, params, exp):
    """AR params of run `src` as the starting point of the diffusion model of `exp`."""
    from flax import nnx

    from dlm_jax.config import ConfigError
    from dlm_jax.models.adapt import ar_to_diffusion
    where = f"config.train.init_from={workdir!r}"
    if src.cfg.model.arch != exp.cfg.model.arch:
        raise ConfigError(f"{where} is a model.arch={src.cfg.model.arch!r} AR run, this run "
                          f"model.arch={exp.cfg.model.arch!r}: adaptation keeps the "
                          f"architecture (registry.apply_adaptation copies it from the run)")
    if src.token_vocab != exp.token_vocab:
        raise ConfigError(f"{where} has {src.token_vocab} tokens, this run {exp.token_vocab}: "
                          f"adaptation needs the same tokenizer")
    init = nnx.to_pure_dict(nnx.state(exp.new_model(exp.cfg.train.seed)))
    try:
        return ar_to_diffusion(params, init)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
