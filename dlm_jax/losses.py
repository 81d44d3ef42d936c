"""One loss function for every family: forward process × objective × block size.

`make_loss_fn(cfg, ...)` returns `loss_fn(model, batch, key, *, train) -> (loss, metrics)` where
`loss` is the mean per-token objective in nats/token over the batch's tokens (the BD3-LM/MDLM
reduction: the denominator counts every token, masked or not), and `metrics` holds scalars.

Continuous-time diffusion (objectives "nelbo" and "score_entropy"):
  1. one time per (sequence, block), stratified over batch × blocks; block size L is one time per
     sequence (MDLM/SEDD), smaller blocks are BD3-LM;
  2. x_t from the process at those times (BD3-LM's `resample` rule when enabled);
  3. the DiT on x_t (block size L) or the two-pass [x_t ⊕ x_0] forward (block size < L),
     conditioned on σ̄ (per sequence, or per token with blocks; zeroed unless time_conditioning);
  4. masked NELBO on SUBS log-probabilities, or score entropy on log-scores.
Training draws times from the (possibly clipped) schedule; evaluation always from the unclipped
[sampling_eps, 1], whose estimate is an unbiased NELBO (a clipped one is not a likelihood bound).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.config import Config, block_size
from dlm_jax.objectives.ar import ar_nll
from dlm_jax.objectives.nelbo import mdlm_loss
from dlm_jax.models.heads import sedd_log_score
from dlm_jax.objectives.score_entropy import score_entropy
from dlm_jax.processes import corruption, schedules

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def _token_weights(batch: dict) -> Array:
    """(B, L) float32: 1 on real tokens, 0 on padding (packed batches carry segment_ids)."""
    tokens = batch["tokens"]
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.ones(tokens.shape, jnp.float32)


def diffusion_forward(model, xt: Array, x0: Array, sigma: Array, block: int, *,
                      deterministic: bool, rngs) -> Array:
    """Raw outputs (B, L, S) on x_t: plain call for one block, two-pass [x_t ⊕ x_0] otherwise."""
    if block == xt.shape[1]:
        return model(xt, sigma, deterministic=deterministic, rngs=rngs)
    return model.two_pass(xt, x0, sigma, block, deterministic=deterministic, rngs=rngs)


def continuous_terms(cfg: Config, model, process, schedule: schedules.Schedule, x0: Array,
                     key: Array, *, train: bool, resample: bool,
                     bounds: tuple[float, float] | None = None) -> tuple[Array, Array, dict]:
    """Per-token NELBO / score-entropy values for one draw of times and x_t.

    `bounds`, if given, overrides the schedule's time interval (and the resample bounds); it may
    be traced. Returns (per_token (B, L), t_blocks (B, K), aux scalars).
    """
    df = cfg.diffusion
    B, L = x0.shape
    block = block_size(cfg)
    k_t, k_x, k_drop = jax.random.split(key, 3)
    if bounds is None:
        t_blocks = corruption.sample_block_times(k_t, B, L, block, schedule, df.sampling_eps,
                                                 df.antithetic)
    else:  # explicit (possibly traced) clipping interval: the clip search
        t_blocks = corruption.sample_times(k_t, (B, L // block), t_min=bounds[0],
                                           t_max=bounds[1], antithetic=df.antithetic)
    xt = corruption.corrupt_blocks(k_x, x0, t_blocks, block, process, schedule,
                                   resample=resample, bounds=bounds,
                                   sampling_eps=df.sampling_eps)
    t = corruption.block_times(t_blocks, block)
    # One σ̄ per sequence (one block: SEDD's conditioning), per token with several blocks; the
    # model averages a per-token σ̄ unless model.token_conditioning is on.
    sigma_cond = schedule.sigma_bar(t_blocks[:, 0] if block == L else t)
    raw = diffusion_forward(model, xt, x0, sigma_cond, block, deterministic=not train,
                            rngs=k_drop if train else None)
    if df.objective == "nelbo":
        per_token, aux = mdlm_loss(raw, x0, xt, t, schedule, process.mask_id)
    else:
        sigma_bar = schedule.sigma_bar(t)
        scale = cfg.model.scale_by_sigma and getattr(process, "mask_id", None) is not None
        log_score = sedd_log_score(raw, xt, sigma_bar, scale_by_sigma=scale)
        per_token, aux = score_entropy(process, log_score, xt, x0, sigma_bar, schedule.sigma(t))
    return per_token, t_blocks, aux


def make_loss_fn(cfg: Config, process, schedule: schedules.Schedule | None) -> LossFn:
    """`loss_fn(model, batch, key, *, train) -> (loss scalar, metrics dict)` for this config."""
    df = cfg.diffusion
    eval_schedule = schedule.base if isinstance(schedule, schedules.Clipped) else schedule

    def loss_fn(model, batch: dict, key: Array, *, train: bool):
        x0 = batch["tokens"]
        weights = _token_weights(batch)
        if df.objective == "ar":
            k_drop = key if train else None
            logits = model(x0, None, deterministic=not train, rngs=k_drop)
            per_token, aux = ar_nll(logits, x0, segment_ids=batch.get("segment_ids"))
            loss = aux["nll_sum"] / jnp.maximum(aux["num_targets"], 1.0)
            return loss, {"loss": loss}
        if df.objective == "d3pm":
            return _d3pm_loss(cfg, model, process, batch, key, train=train)
        sched = schedule if train else eval_schedule
        per_token, _, aux = continuous_terms(cfg, model, process, sched, x0, key, train=train,
                                             resample=df.resample and train)
        loss = (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
        return loss, {"loss": loss}

    return loss_fn


def _d3pm_loss(cfg: Config, model, process, batch: dict, key: Array, *, train: bool):
    """D3PM: uniform t ∈ {1..T}, x_t ~ q(x_t|x_0), VLB term (scaled by T) + λ·CE.

    At evaluation the hybrid CE is left out and the prior term KL(q(x_T|x0) ‖ prior) is added, so
    the value is an unbiased estimate of the discrete-time NELBO.
    """
    from dlm_jax.objectives.d3pm import d3pm_loss, d3pm_prior_term
    x0 = batch["tokens"]
    weights = _token_weights(batch)
    B = x0.shape[0]
    k_t, k_x, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (B,), 1, process.num_steps + 1)
    xt = process.sample_xt(k_x, x0, t)
    logits = model(xt, t.astype(jnp.float32), deterministic=not train,
                   rngs=k_drop if train else None)
    lam = cfg.diffusion.hybrid_lambda if train else 0.0
    per_token, _ = d3pm_loss(logits, x0, xt, t, process, hybrid_lambda=lam)
    if not train:
        prior = d3pm_prior_term(x0, process)
        per_token = per_token + prior
    loss = (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    return loss, {"loss": loss}


def clip_search_candidates(cfg: Config) -> list[tuple[float, float]]:
    """BD3-LM's candidate clipping intervals: (eps, 1) and, per width w, (i, i + w) on a δ grid.

    For block size 1 the candidates are {(eps, 1), (1, 1)} (the latter is exactly AR).
    """
    df = cfg.diffusion
    eps = df.sampling_eps
    if block_size(cfg) == 1:
        return [(eps, 1.0), (1.0, 1.0)]
    out = [(eps, 1.0)]
    for w in df.clip_search_widths:
        n = int(round((1.0 - w) / df.clip_search_delta))
        for i in range(n + 1):  # integer grid: no float-arange endpoint surprises
            lo = i * df.clip_search_delta
            out.append((max(round(lo, 6), eps), max(round(lo + w, 6), eps)))
    return out


def make_block_nelbo_fn(cfg: Config, graphdef, process, schedule: schedules.Schedule):
    """`fn(params, batch, bounds (2,), index) -> (B, K)` per-block mean NELBO (clip search).

    Times are drawn from [bounds[0], bounds[1]] with BD3-LM's resample rule, the model runs in
    evaluation mode; the variance of the result over batch × blocks is the search's score.
    """
    from flax import nnx
    base = schedule.base if isinstance(schedule, schedules.Clipped) else schedule
    block = block_size(cfg)
    seed = cfg.train.seed

    def fn(params, batch: dict, bounds: Array, index):
        model = nnx.merge(graphdef, params)
        key = jax.random.fold_in(jax.random.key(seed + 2), index)
        x0 = batch["tokens"]
        per_token, _, _ = continuous_terms(cfg, model, process, base, x0, key, train=False,
                                           resample=True, bounds=(bounds[0], bounds[1]))
        B, L = x0.shape
        return per_token.reshape(B, L // block, block).mean(-1)

    return fn
