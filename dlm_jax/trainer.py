"""The host-side training loop: init or restore, step, evaluate, checkpoint, log.

`Trainer(cfg, workdir)` resolves the config once (`registry.build`), compiles the steps
(`steps.TrainProgram`) and builds the evaluators (`evals`); `run()` trains to `cfg.train.steps`,
resuming from the newest checkpoint in `workdir/checkpoints` if there is one. The clip interval
chosen by the clip search is part of the train state, so it is checkpointed and restored with
it. A SIGTERM (preemption) saves a checkpoint and returns cleanly; a non-finite loss stops the
run with a message naming the step and the last good checkpoint.
"""
from __future__ import annotations

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
from absl import logging

from dlm_jax import registry
from dlm_jax.checkpoint import Checkpointer
from dlm_jax.config import Config
from dlm_jax.data.pipeline import to_global
from dlm_jax.evals import build_evaluators, validation_batches
from dlm_jax.metrics import MetricsWriter, measure_peak_flops, progress_line
from dlm_jax.state import TrainState, make_optimizer
from dlm_jax.steps import TrainProgram


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


class Trainer:
    """The loop around an `Experiment` and its `TrainProgram`; `run()` trains."""

    def __init__(self, cfg: Config, workdir: str, *, devices=None, measure_mfu: bool = True):
        self.cfg = cfg
        self.exp = registry.build(cfg, devices)
        self.workdir = os.path.abspath(workdir)
        self.program = TrainProgram(self.exp, make_optimizer(cfg.optim, cfg.train.steps))
        self.evaluators = build_evaluators(self.exp, self.program)
        self.peak_flops = measure_peak_flops() * jax.device_count() if measure_mfu else None
        self.metrics = MetricsWriter(self.workdir, cfg.train.tensorboard)
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep,
                                 async_save=cfg.train.async_checkpoint)
        self._stop_requested = False

    # -- state and data -------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        return self.program.init()

    def train_iterator(self):
        return iter(self.exp.dataset("train", global_batch=self.cfg.train.batch_size,
                                     repeat=True))

    def restore_or_init(self, data_iter) -> TrainState:
        """The newest checkpoint's state (moving `data_iter` to its position), else a fresh one."""
        if self.ckpt.latest_step() is None:
            return self.init_state()
        step, state = self.ckpt.restore(self.program.abstract_state, data_iter)
        logging.info("restored step %d from %s", step, self.ckpt.directory)
        return state

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One step on a host-local numpy batch."""
        with jax.set_mesh(self.exp.mesh):
            return self.program.step(state, to_global(batch, self.exp.batch_sharding))

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state: TrainState) -> tuple[dict, TrainState]:
        """Run every evaluator on the (EMA) parameters; returns (metrics, updated state)."""
        params = state.ema_params if state.ema_params is not None else state.params
        batches = validation_batches(self.exp)
        metrics, updates = {}, {}
        for evaluator in self.evaluators:
            m, u = evaluator(params, batches)
            metrics.update(m)
            updates.update(u)
        if updates:
            sh = self.program.state_shardings
            state = state.replace(**{k: jax.device_put(v, getattr(sh, k))
                                     for k, v in updates.items()})
        return metrics, state

    # -- the loop -------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._stop_requested = True

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
        flops_per_token = self.exp.flops_per_token()
        summary = {"start_step": start, "workdir": self.workdir}
        window_t0, window_steps = time.perf_counter(), 0
        try:
            for step in range(start, t.steps):
                if self._stop_requested:
                    logging.warning("SIGTERM: saving step %d and exiting", step)
                    self.ckpt.save(step, state, data_iter, force=True)
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
                    ev, state = self.evaluate(state)
                    self.metrics.write(done, ev)
                    summary.update(ev)
                    if jax.process_index() == 0:
                        print("  eval " + " | ".join(f"{k} {v:.4g}" for k, v in ev.items()),
                              flush=True)
                    window_t0, window_steps = time.perf_counter(), 0
                if done % t.ckpt_every == 0 or done == t.steps:
                    self._check_finite(state, done, last_good)
                    self.ckpt.save(done, state, data_iter, force=done == t.steps)
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

    def close(self) -> None:
        self.ckpt.close()
        self.metrics.close()
