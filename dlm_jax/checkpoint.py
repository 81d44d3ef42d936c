"""Checkpoints: the only module that imports orbax.

Saves the train state and the grain data iterator together, so a restarted run resumes at the
exact step and the exact next batch. Saves are asynchronous and atomic (orbax commits a step
directory only once it is complete) and the newest `keep` steps are preserved, so no run loses a
checkpoint it already wrote. Restoring onto a different mesh works: pass an abstract state whose
leaves carry the new shardings.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` for (state, data iterator) pairs."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        """Start saving `state` (and the iterator position) as `step`; returns whether it did."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, data_iter=None, step: int | None = None):
        """Restore `step` (default: latest) into the shapes/shardings of `abstract_state`.

        `data_iter`, if given, is moved to the saved position in place. Returns (step, state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return step, restored.state

    def restore_state_only(self, abstract_state: Any, step: int | None = None):
        """Restore only the train state (evaluation, sampling); returns (step, state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return step, restored.state

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore onto any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
