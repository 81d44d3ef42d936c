"""The host-side training loop: init or restore, step, evaluate, checkpoint, log.

`Trainer(cfg, workdir)` builds everything from the config (through `registry`); `run()` trains to
`cfg.train.steps`, resuming from the newest checkpoint in `workdir/checkpoints` if there is one.
A SIGTERM (preemption) saves a checkpoint and returns cleanly; a non-finite loss stops the run
with a message naming the step and the last good checkpoint.
"""
from __future__ import annotations

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dlm_jax import losses, registry, sharding
from dlm_jax.checkpoint import Checkpointer, abstract_with_shardings
from dlm_jax.config import Config, ConfigError, block_size, validate
from dlm_jax.metrics import (MetricsWriter, measure_peak_flops, progress_line,
                             transformer_train_flops_per_token)
from dlm_jax.state import TrainState, init_state, make_optimizer
from dlm_jax.steps import abstract_state, make_eval_step, make_train_step, state_shardings


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


class Trainer:
    """Builds model, data, optimizer and jitted steps for `cfg`; `run()` trains."""

    def __init__(self, cfg: Config, workdir: str, *, devices=None, measure_mfu: bool = True):
        self.cfg = validate(cfg)
        self.workdir = os.path.abspath(workdir)
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        self.rules = tuple(cfg.mesh.rules)
        self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        shards = sharding.batch_divisor(self.mesh, self.rules)
        if cfg.train.batch_size % (shards * cfg.optim.accum_steps):
            raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} must be divisible by "
                              f"the batch shards ({shards}) × config.optim.accum_steps "
                              f"({cfg.optim.accum_steps})")
        if cfg.data.mode == "pack" and cfg.diffusion.objective != "ar":
            raise ConfigError("config.data.mode='pack' is supported for objective 'ar' only; "
                              "diffusion objectives train on wrapped sequences (mode='wrap')")

        self.tokenizer = registry.build_tokenizer(cfg)
        self.token_vocab = registry.token_vocab_size(cfg, self.tokenizer)
        self.process = registry.build_process(cfg, self.token_vocab)
        continuous = cfg.diffusion.objective in ("nelbo", "score_entropy")
        self.schedule = registry.build_schedule(cfg) if continuous else None

        seed = cfg.train.seed
        abstract_model = nnx.eval_shape(
            lambda: registry.build_model(cfg, self.token_vocab, nnx.Rngs(seed)))
        self.graphdef, abstract_params = nnx.split(abstract_model)
        self.param_sh = sharding.param_shardings(abstract_params, self.mesh, self.rules)
        self.num_params = sum(math.prod(x.shape) for x in
                              jax.tree.leaves(nnx.to_pure_dict(abstract_params)))
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)
        abstract = abstract_state(nnx.to_pure_dict(abstract_params), self.tx, cfg.optim.ema_decay)
        self.state_sh = state_shardings(abstract, self.param_sh, self.tx, self.mesh)
        self.abstract_state = abstract_with_shardings(abstract, self.state_sh)

        self.loss_fn = losses.make_loss_fn(cfg, self.process, self.schedule)
        self._train_step = jax.jit(make_train_step(cfg, self.graphdef, self.loss_fn, self.tx),
                                   in_shardings=(self.state_sh, self.batch_sh),
                                   out_shardings=(self.state_sh, None), donate_argnums=0)
        self._eval_step = jax.jit(make_eval_step(self.graphdef, self.loss_fn, seed),
                                  in_shardings=(self.param_sh, self.batch_sh, None))
        self.peak_flops = measure_peak_flops() * jax.device_count() if measure_mfu else None
        self.metrics = MetricsWriter(self.workdir, cfg.train.tensorboard)
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep,
                                 async_save=cfg.train.async_checkpoint)
        self._stop_requested = False

    # -- state ----------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        cfg = self.cfg

        def init():
            model = registry.build_model(cfg, self.token_vocab, nnx.Rngs(cfg.train.seed))
            params = nnx.to_pure_dict(nnx.split(model)[1])
            return init_state(params, self.tx, cfg.optim.ema_decay)

        # No mesh context here: parameters are created unsharded and placed by out_shardings.
        return jax.jit(init, out_shardings=self.state_sh)()

    def train_iterator(self):
        ds = registry.build_dataset(self.cfg, self.tokenizer, "train",
                                    global_batch=self.cfg.train.batch_size, repeat=True,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
        return iter(ds)

    def restore_or_init(self, data_iter) -> TrainState:
        """The newest checkpoint's state (moving `data_iter` to its position), else a fresh one."""
        if self.ckpt.latest_step() is None:
            return self.init_state()
        step, state = self.ckpt.restore(self.abstract_state, data_iter)
        logging.info("restored step %d from %s", step, self.ckpt.directory)
        return state

    # -- one step / evaluation ------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self._train_step(state, sharding.to_global(batch, self.batch_sh))

    def eval_params(self, state: TrainState):
        return state.ema_params if state.ema_params is not None else state.params

    def evaluate(self, state: TrainState) -> dict:
        """Validation loss over `train.eval_batches` fixed batches: nats/token, bpb, perplexity."""
        cfg = self.cfg
        ds = registry.build_dataset(cfg, self.tokenizer, "validation",
                                    global_batch=cfg.train.batch_size, repeat=True, shuffle=False,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
        it = iter(ds)
        params = self.eval_params(state)
        total = []
        with jax.set_mesh(self.mesh):
            for i in range(cfg.train.eval_batches):
                batch = sharding.to_global(next(it), self.batch_sh)
                total.append(self._eval_step(params, batch, i)["loss"])
        nats = float(np.mean(jax.device_get(total)))
        out = {"val/loss": nats, "val/ppl": float(math.exp(min(nats, 50.0)))}
        if cfg.data.source != "markov" and cfg.data.tokenizer == "byte":
            out["val/bpb"] = nats / math.log(2.0)
        if cfg.diffusion.var_min and self.schedule is not None:
            out.update(self.clip_search(params, it))
        return out

    def clip_search(self, params, it) -> dict:
        """BD3-LM: pick the clipping interval minimising Var(per-block NELBO) on val batches."""
        cfg = self.cfg
        cands = losses.clip_search_candidates(cfg)
        fn = jax.jit(losses.make_block_nelbo_fn(cfg, self.graphdef, self.process, self.schedule),
                     in_shardings=(self.param_sh, self.batch_sh, None, None))
        batches = [sharding.to_global(next(it), self.batch_sh)
                   for _ in range(cfg.diffusion.clip_search_batches)]
        scores = []
        with jax.set_mesh(self.mesh):
            for lo, hi in cands:
                var = [jnp.var(fn(params, b, jnp.asarray([lo, hi], jnp.float32), j))
                       for j, b in enumerate(batches)]
                scores.append(jnp.sum(jnp.stack(var)))
        scores = np.asarray(jax.device_get(scores))
        best = int(np.argmin(scores))
        lo, hi = cands[best]
        if (lo, hi) != tuple(cfg.diffusion.clip):
            cfg.diffusion.clip = (lo, hi)
            self.schedule = registry.build_schedule(cfg)
            self.loss_fn = losses.make_loss_fn(cfg, self.process, self.schedule)
            self._train_step = jax.jit(make_train_step(cfg, self.graphdef, self.loss_fn, self.tx),
                                       in_shardings=(self.state_sh, self.batch_sh),
                                       out_shardings=(self.state_sh, None), donate_argnums=0)
        return {"clip/beta_l": lo, "clip/beta_u": hi,
                "clip/var": float(scores[best]) / len(batches)}

    # -- the loop -------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._stop_requested = True

    def flops_per_token(self) -> float:
        cfg = self.cfg
        dims = registry.model_dims(cfg)
        L, bs = cfg.data.seq_len, block_size(cfg)
        two_pass = cfg.diffusion.objective in ("nelbo", "score_entropy") and bs < L
        attended = L / 2 if cfg.diffusion.objective == "ar" else L
        flops = transformer_train_flops_per_token(self.num_params, dims["depth"], dims["width"],
                                                  attended)
        return 2 * flops if two_pass else flops

    def run(self) -> dict:
        """Train to cfg.train.steps; returns a summary dict (steps, last losses, paths)."""
        cfg, t = self.cfg, self.cfg.train
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(cfg.to_json())
        data_iter = self.train_iterator()
        state = self.restore_or_init(data_iter)
        start = int(jax.device_get(state.step))
        last_good = self.ckpt.latest_step()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        tokens_per_step = t.batch_size * cfg.data.seq_len
        flops_per_token = self.flops_per_token()
        summary = {"start_step": start, "workdir": self.workdir}
        window_t0, window_steps = time.perf_counter(), 0
        try:
            for step in range(start, t.steps):
                if self._stop_requested:
                    logging.warning("SIGTERM: saving step %d and exiting", step)
                    self._save(step, state, data_iter, force=True)
                    summary["preempted_at"] = step
                    break
                if t.profile_steps and step == t.profile_steps[0]:
                    jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
                state, metrics = self.train_step(state, next(data_iter))
                if step == start:  # keep compilation out of the throughput figures
                    jax.block_until_ready(metrics)
                    window_t0, window_steps = time.perf_counter(), -1
                if t.profile_steps and step + 1 == t.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                window_steps += 1
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    values = jax.device_get(metrics)
                    loss = float(values["loss"])
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"training loss is {loss} at step {done} (finite at step "
                            f"{summary.get('last_logged_step', start)}); last good checkpoint: "
                            f"{self._ckpt_path(last_good)}")
                    elapsed = max(time.perf_counter() - window_t0, 1e-9)
                    window_steps = max(window_steps, 1)
                    tok_s = window_steps * tokens_per_step / elapsed
                    mfu = (tok_s * flops_per_token / self.peak_flops) if self.peak_flops else None
                    eta = (t.steps - done) * elapsed / window_steps
                    line = progress_line(done, t.steps, loss, float(values["lr"]), tok_s, mfu, eta)
                    if jax.process_index() == 0:
                        print(line, flush=True)
                    row = {"train/loss": loss, "train/grad_norm": float(values["grad_norm"]),
                           "train/lr": float(values["lr"]), "perf/tokens_per_s": tok_s}
                    if mfu is not None:
                        row["perf/mfu"] = mfu
                    self.metrics.write(done, row)
                    summary["last_logged_step"], summary["train_loss"] = done, loss
                    window_t0, window_steps = time.perf_counter(), 0
                if done % t.eval_every == 0 or done == t.steps:
                    ev = self.evaluate(state)
                    self.metrics.write(done, ev)
                    summary.update(ev)
                    if jax.process_index() == 0:
                        print("  eval " + " | ".join(f"{k} {v:.4g}" for k, v in ev.items()),
                              flush=True)
                    window_t0, window_steps = time.perf_counter(), 0
                if done % t.ckpt_every == 0 or done == t.steps:
                    self._check_finite(state, done, last_good)
                    self._save(done, state, data_iter, force=done == t.steps)
                    last_good = done
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.ckpt.wait()
        summary["final_step"] = int(jax.device_get(state.step))
        summary["checkpoint"] = self._ckpt_path(self.ckpt.latest_step())
        summary["metrics"] = self.metrics.path
        self.state = state
        return summary

    def _ckpt_path(self, step) -> str:
        return "none" if step is None else os.path.join(self.ckpt.directory, str(step))

    def _check_finite(self, state: TrainState, step: int, last_good) -> None:
        finite = jax.device_get(jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)])))
        if not finite:
            raise NonFiniteLossError(f"parameters are not finite at step {step}; not saving. Last "
                                     f"good checkpoint: {self._ckpt_path(last_good)}")

    def _save(self, step: int, state: TrainState, data_iter, *, force: bool) -> None:
        self.ckpt.save(step, state, data_iter, force=force)

    def close(self) -> None:
        self.ckpt.close()
        self.metrics.close()
