"""Run `python -m dlm_jax.train` with one injected fault (used by test_faults.py).

    python tests/fault_run.py KIND:WHERE:STEP [train flags…]

KIND is `kill` (SIGKILL: the process dies at once) or `term` (SIGTERM: a preemption notice).
WHERE/STEP say when: `step:N` right after train step N, `eval:N` in the middle of the
evaluation at step N (after the validation loss, before the clip search), `save:N` right after
the asynchronous save of step N started (its files are still being written). `none` injects
nothing.
"""
import os
import signal
import sys

from absl import app

from dlm_jax import evals, train
from dlm_jax.checkpoint import Checkpointer
from dlm_jax.trainer import Trainer


def install(spec: str) -> None:
    if spec == "none":
        return
    kind, where, step = spec.split(":")
    sig, step = {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind], int(step)
    fire = lambda: os.kill(os.getpid(), sig)  # noqa: E731
    now = {"step": None}

    if where == "step":
        original = Trainer.train_step

        def train_step(self, state, batch):
            out = original(self, state, batch)
            if int(out[0].step) == step:
                fire()
            return out
        Trainer.train_step = train_step
    elif where == "eval":
        evaluate, validation = Trainer.evaluate, evals.Validation.__call__

        def trainer_evaluate(self, state):
            now["step"] = int(state.step)
            return evaluate(self, state)

        def validation_call(self, params, batches):
            out = validation(self, params, batches)
            if now["step"] == step:
                fire()
            return out
        Trainer.evaluate, evals.Validation.__call__ = trainer_evaluate, validation_call
    elif where == "save":
        save = Checkpointer.save

        def checkpoint_save(self, at, *args, **kwargs):
            out = save(self, at, *args, **kwargs)
            if at == step:
                fire()
            return out
        Checkpointer.save = checkpoint_save
    else:
        raise SystemExit(f"unknown fault place {where!r}")


if __name__ == "__main__":
    install(sys.argv.pop(1))
    app.run(lambda argv: sys.exit(train.main(argv)), flags_parser=train.parse_flags)
