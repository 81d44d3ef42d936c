"""The host-side training loop: init or restore, step, evaluate, checkpoint, log.

`Trainer(cfg, workdir)` resolves the config once (`registry.build`), compiles the steps
(`steps.TrainProgram`) and builds the evaluators (`evals`); `run()` trains to `cfg.train.steps`,
resuming from the newest checkpoint in `workdir/checkpoints` if there is one. The clip interval
chosen by the clip search is part of the train state, so it is checkpointed and restored with
it. A SIGTERM (preemption) saves a checkpoint and returns cleanly; a non-finite loss stops the
run with a message naming the step and the last good checkpoint.

Preemption and faults: a SIGTERM on any host stops every host at the same step (the hosts agree
through an all-gather of their stop flags every `train.stop_check_every` steps), which saves once
and returns; a resumed run checks its config against the run's config.json (fields that change
the model or the data's meaning are an error, anything else a warning, the previous file kept as
config.<step>.json) and drops metrics rows logged after the restored step; an unreadable newest
checkpoint is set aside and an older one used; a failed save stops the run at once.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dlm_jax import registry
from dlm_jax.checkpoint import Checkpointer
from dlm_jax.config import Config, ConfigError, config_changes
from dlm_jax.data.pipeline import to_global
from dlm_jax.evals import build_evaluators, run_evaluators
from dlm_jax.evals.validation import format_metrics
from dlm_jax.metrics import (MetricsWriter, combined_peak_flops, measure_peak_flops,
                             progress_line)
from dlm_jax.state import TrainState, make_optimizer
from dlm_jax.steps import TrainProgram


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def say(text: str, *, err: bool = False) -> None:
    """A line for the user, from host 0 only."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


class Trainer:
    """The loop around an `Experiment` and its `TrainProgram`; `run()` trains.

    Building a Trainer writes nothing: the workdir is created by `run()`.
    """

    def __init__(self, cfg: Config, workdir: str, *, devices=None, measure_mfu: bool = True):
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir)
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ConfigError(f"--workdir {workdir} exists and is not a directory")
        self.exp = registry.build(cfg, devices)
        self.program = TrainProgram(self.exp, make_optimizer(cfg.optim, cfg.train.steps))
        self.evaluators = build_evaluators(self.exp, self.program)
        self.peak_flops = combined_peak_flops(
            measure_peak_flops(dtype=cfg.model.compute_dtype),
            self.exp.mesh.devices.flat) if measure_mfu else None
        self.metrics = MetricsWriter(self.workdir, cfg.train.tensorboard)
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep,
                                 async_save=cfg.train.async_checkpoint, create=False)
        self._stop_requested = False

    # -- state and data -------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """A fresh state; with `train.init_from`, its parameters come from that run."""
        if self.cfg.train.init_from:
            from dlm_jax.evals import initial_params
            return self.program.init(initial_params(self.cfg.train.init_from, self.exp))
        return self.program.init()

    def train_iterator(self):
        return iter(self.exp.dataset("train", global_batch=self.cfg.train.batch_size,
                                     repeat=True))

    def restore_or_init(self, data_iter) -> TrainState:
        """The newest restorable checkpoint's state (moving `data_iter` to its position), else a
        fresh one."""
        if self.ckpt.latest_step() is None:
            return self.init_state()
        try:
            step, state = self.ckpt.restore(self.program.abstract_state, data_iter)
        except ValueError as e:  # the saved data position does not fit this data config
            raise ConfigError(f"cannot resume the data of {self.ckpt.directory}: {e}") from e
        logging.info("restored step %d from %s", step, self.ckpt.directory)
        return state

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One step on a host-local numpy batch."""
        with jax.set_mesh(self.exp.mesh):
            return self.program.step(state, to_global(batch, self.exp.batch_sharding))

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state: TrainState) -> tuple[dict, TrainState]:
        """Run every evaluator on the (EMA) parameters; returns (metrics, updated state)."""
        metrics, updates = run_evaluators(self.evaluators, self.exp, state)
        if updates:
            sh = self.program.state_shardings
            state = state.replace(**{k: jax.device_put(v, getattr(sh, k))
                                     for k, v in updates.items()})
        return metrics, state

    # -- preemption -----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._stop_requested = True

    def _stop_agreed(self, done: int) -> bool:
        """Whether every host stops after step `done`: the local flag on one host; on several,
        every `stop_check_every` steps, whether any host has been asked to stop."""
        if jax.process_count() == 1:
            return self._stop_requested
        if done % self.cfg.train.stop_check_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self._stop_requested))
        return bool(np.asarray(flags).max())

    # -- resuming -------------------------------------------------------------------------------
    def _check_resumed_config(self, step: int) -> None:
        """Compare with the run's config.json: fixed fields are an error, others a warning."""
        path = os.path.join(self.workdir, "config.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            old = json.load(f)
        fixed, allowed = config_changes(old, self.cfg.to_dict())
        if fixed:
            raise ConfigError(
                f"the run in {self.workdir} (checkpoint step {step}) was trained with another "
                f"model or data setup; these fields cannot change on resume: " + "; ".join(fixed)
                + " (use a new --workdir)")
        if allowed:
            say(f"warning: resuming step {step} with a changed config: " + "; ".join(allowed)
                 + f" (the previous config is kept as config.{step}.json)", err=True)
            if jax.process_index() == 0:
                os.replace(path, os.path.join(self.workdir, f"config.{step}.json"))

    # -- the loop -------------------------------------------------------------------------------
    def run(self, data_iter=None) -> dict:
        """Train to cfg.train.steps (on `data_iter`, default a new `train_iterator()`); returns a
        summary dict (steps, last losses, paths)."""
        cfg, t = self.cfg, self.cfg.train
        data_iter = self.train_iterator() if data_iter is None else data_iter
        latest = self.ckpt.latest_step()
        if latest is not None:
            self._check_resumed_config(latest)
        if jax.process_index() == 0:
            os.makedirs(self.ckpt.directory, exist_ok=True)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(cfg.to_json())
        state = self.restore_or_init(data_iter)
        start = int(jax.device_get(state.step))
        for bad, reason in self.ckpt.skipped:
            say(f"warning: checkpoint {self.ckpt.path(bad)} is unreadable ({reason}); kept as "
                 f"{self.ckpt.path(bad)}.unreadable", err=True)
        if start:
            say(f"resumed from step {start}: {self.ckpt.path(start)}")
        self.metrics.truncate_after(start)
        summary = {"start_step": start, "workdir": self.workdir}
        if start >= t.steps:
            say(f"already complete: step {start} of train.steps={t.steps}; nothing to train")
            return self._finish(summary, state)
        last_good = self.ckpt.latest_step()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        tokens_per_step = t.batch_size * cfg.data.seq_len
        flops_per_token = self.exp.flops_per_token()
        first_loss = None
        window_t0, window_steps = time.perf_counter(), 0

        def restart_window():  # after compile, eval or a save: time only training steps
            nonlocal window_t0, window_steps
            jax.block_until_ready(state)
            window_t0, window_steps = time.perf_counter(), 0

        try:
            for step in range(start, t.steps):
                if t.profile_steps and step == t.profile_steps[0]:
                    jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
                state, metrics = self.train_step(state, next(data_iter))
                if t.profile_steps and step + 1 == t.profile_steps[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                done = step + 1
                if step == start:  # the first step carries the compilation
                    restart_window()
                else:
                    window_steps += 1
                if done % t.log_every == 0 or done == t.steps:
                    values = jax.device_get(metrics)
                    loss = float(values["loss"])
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"training loss is {loss} at step {done} (finite at step "
                            f"{summary.get('last_logged_step', start)}); last good checkpoint: "
                            f"{self.ckpt.path(last_good)}")
                    if first_loss is None:
                        first_loss = (done, loss)
                    elif abs(loss) > 100 * max(abs(first_loss[1]), 1.0) and \
                            "loss_grew" not in summary:
                        summary["loss_grew"] = done
                        say(f"warning: the training loss grew from {first_loss[1]:.4g} (step "
                             f"{first_loss[0]}) to {loss:.4g} (step {done}); is optim.lr "
                             f"({cfg.optim.lr:g}) too large?", err=True)
                    row = {"train/loss": loss, "train/grad_norm": float(values["grad_norm"]),
                           "train/lr": float(values["lr"])}
                    tok_s = mfu = None
                    if window_steps:
                        elapsed = max(time.perf_counter() - window_t0, 1e-9)
                        tok_s = window_steps * tokens_per_step / elapsed
                        mfu = tok_s * flops_per_token / self.peak_flops if self.peak_flops \
                            else None
                        row["perf/tokens_per_s"] = tok_s
                        if mfu is not None:
                            row["perf/mfu"] = mfu
                        eta = (t.steps - done) * elapsed / window_steps
                    else:
                        eta = float("nan")
                    say(progress_line(done, t.steps, loss, float(values["lr"]), tok_s, mfu, eta))
                    self.metrics.write(done, row)
                    summary["last_logged_step"], summary["train_loss"] = done, loss
                    restart_window()
                if done % t.eval_every == 0 or done == t.steps:
                    ev, state = self.evaluate(state)
                    self.metrics.write(done, ev)
                    summary.update(ev)
                    say("  eval " + format_metrics(ev))
                    restart_window()
                saved = False
                if done % t.ckpt_every == 0 or done == t.steps:
                    self._check_finite(state, done, last_good)
                    self.ckpt.save(done, state, data_iter, force=done == t.steps)
                    saved, last_good = True, done
                    restart_window()
                self.ckpt.check()
                if done < t.steps and self._stop_agreed(done):
                    logging.warning("SIGTERM: saving step %d and exiting", done)
                    if not saved:
                        self.ckpt.save(done, state, data_iter, force=True)
                    summary["preempted_at"] = done
                    say(f"stopped by SIGTERM: step {done} saved to {self.ckpt.path(done)}")
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.ckpt.wait()
        return self._finish(summary, state)

    def _finish(self, summary: dict, state: TrainState) -> dict:
        summary["final_step"] = int(jax.device_get(state.step))
        summary["checkpoint"] = self.ckpt.path(self.ckpt.latest_step())
        summary["metrics"] = self.metrics.path
        self.state = state
        return summary

    def _check_finite(self, state: TrainState, step: int, last_good) -> None:
        finite = jax.device_get(jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)])))
        if not finite:
            raise NonFiniteLossError(f"parameters are not finite at step {step}; not saving. Last "
                                     f"good checkpoint: {self.ckpt.path(last_good)}")

    def close(self) -> None:
        self.ckpt.close()
        self.metrics.close()
