"""Checkpoints: the only module that imports orbax.

Saves the train state and the data position together, so a restarted run resumes at the
exact step and the exact next batch. The data position is global (every host's iterator state
merged, written once as JSON by host 0), so a checkpoint restores onto any number of hosts.
Saves are asynchronous and atomic (orbax commits a step directory only once it is complete) and
the newest `keep` steps are preserved, so no run loses a checkpoint it already wrote. Restoring onto a different mesh works: pass an abstract state whose
leaves carry the new shardings.

A checkpoint may also hold parameters alone (`save_params`: what `dlm_jax.convert` writes for
imported weights): `is_params_only` tells them apart and `restore_params` reads them.

Layer layouts: the transformer blocks' parameters are unrolled (params["blocks"][i]) or stacked
(`model.scan_layers`: one tree with a leading depth axis; `models.layout`). Every restore reads
the stored layout from the checkpoint's tree metadata and, where it differs from the layout asked
for, restores in the stored layout and converts params, optimizer moments and EMA alike (placed
on the requested shardings), so `model.scan_layers` may change between runs of one workdir.

Faults: a newest checkpoint that cannot be restored (a truncated or corrupt file) is renamed
`<step>.unreadable` — kept, never deleted — and the next older one is tried, the reason in one
line (orbax's error and its root cause; the debris of orbax's abandoned reads is silenced,
`_silence_abandoned_io`); a save that fails
(disk full, a read-only directory) raises `CheckpointError` naming the step and the directory,
at the save itself or, for an asynchronous save, at the next `check()` (its abandoned writes'
debris silenced the same way).
"""
from __future__ import annotations

import json
import logging as py_logging
import os
import sys
import threading
import types
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dlm_jax.models.layout import find_layout, to_layout


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint could be restored; says which."""


class LayoutError(CheckpointError):
    """A checkpoint was read but its layer layout could not be converted to the one asked for
    (the checkpoint is fine: it is never set aside for this)."""


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message`, without tensorstore's trailing spec dump; for a
    wrapped error (`raise … from cause`), the root cause's line after it ("caused by")."""
    def line(x: BaseException) -> str:
        text = str(x).strip()
        first = text.splitlines()[0] if text else ""
        for dump in (" [tensorstore_spec", " See full TensorStore details"):
            first = first.split(dump)[0]
        return f"{type(x).__name__}: {first}".rstrip(": ")
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return line(e) if root is e else f"{line(e).rstrip('.')}; caused by {line(root)}"


def _is_abandoned_read(unraisable) -> bool:
    """Whether an unraisable error is the debris of a failed orbax restore: one of orbax's read
    coroutines, closed unfinished (it turns GeneratorExit into an Exception), or a tensorstore
    thread's read completing into orbax's already closed event loop."""
    obj, exc = unraisable.object, unraisable.exc_value
    if isinstance(obj, types.CoroutineType):
        return f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename
    return (obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and threading.current_thread().name.startswith("Dummy"))   # a thread not Python's


class _DropAbandonedOrbaxTasks(py_logging.Filter):
    """asyncio's log lines for the tasks of a failed orbax restore that nobody awaits."""

    def filter(self, record):
        text = record.getMessage()
        return not ("orbax" in text and ("exception was never retrieved" in text
                                         or "destroyed but it is pending" in text))


_debris_filters: list = []   # installed once per process, by the first failed restore or save


def _silence_abandoned_io() -> None:
    """When an orbax restore fails (a truncated file, say), orbax closes its event loop with the
    reads of the other arrays still pending (a failed save likewise leaves its writes): as
    tensorstore finishes them and the garbage collector meets them, seconds later, each prints a
    traceback with a tensorstore spec, thousands of lines for one bad file. We report the
    failure once, in one line; this drops that debris (`_is_abandoned_read`,
    `_DropAbandonedOrbaxTasks`, orbax coroutines never awaited) for the rest of the process.
    Every other unraisable error, asyncio message and warning reaches its usual handler."""
    if _debris_filters:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)
    sys.unraisablehook = hook
    quiet = _DropAbandonedOrbaxTasks()
    py_logging.getLogger("asyncio").addFilter(quiet)
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"coroutine '(_read_array_index_and_device_put|"
                                    r"_read_and_create_array|async_deserialize|"
                                    r"async_serialize_from_host\.<locals>\.write_fragment)' "
                                    r"was never awaited")
    _debris_filters.extend((hook, quiet))


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` for (state, data iterator) pairs.

    `create=False` (evaluation, sampling) never creates the directory.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(directory)
        self.skipped: list[tuple[int, str]] = []  # (step, reason) of unreadable checkpoints
        self._pending: int | None = None            # the step an async save is writing
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def path(self, step: int | None) -> str:
        return "none" if step is None else os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        """Start saving `state` (and the iterator position) as `step`; returns whether it did."""
        if self._pending is not None:  # orbax waits for it anyway; a failure names its step
            self.wait()
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = ocp.args.JsonSave(global_data_state(data_iter))
        try:
            saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 - re-raised with the step and the directory
            _silence_abandoned_io()   # the failed save's pending writes
            raise CheckpointError(f"saving step {step} to {self.directory} failed: "
                                  f"{_first_line(e)}") from e
        if saved:
            self._pending = step
        return saved

    def check(self) -> None:
        """Raise CheckpointError if an asynchronous save has failed. Cheap: once the pending save
        is no longer in progress, collecting its outcome does not wait."""
        if self._pending is not None and not self._mngr.is_saving_in_progress():
            self.wait()

    def stored_layout(self, step: int, item: str = "state") -> bool | None:
        """Whether checkpoint `step`'s `item` ("state" or, for `save_params`, "params") holds
        stacked blocks (True), unrolled ones (False), or no params dict / no readable metadata
        (None: restore as asked, and let that fail with its own error)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            meta = handler.metadata(epath.Path(self.directory) / str(step) / item)
        except Exception:  # noqa: BLE001 - missing or unreadable: the restore will say so
            return None
        finally:
            handler.close()
        return find_layout(getattr(meta, "tree", meta))

    def _relayout(self, step: int, item: str, abstract: Any, restore):
        """`restore(abstract_in_stored_layout)`, then converted to `abstract`'s layout and
        shardings; just `restore(abstract)` when the layouts agree (`stored_layout`)."""
        try:
            return self._relayout_unguarded(step, item, abstract, restore)
        except Exception:
            _silence_abandoned_io()   # a failed read leaves orbax's debris behind
            raise

    def _relayout_unguarded(self, step: int, item: str, abstract: Any, restore):
        want = find_layout(abstract)
        stored = self.stored_layout(step, item) if want is not None else None
        if stored is None or stored == want:
            return restore(abstract)
        logging.info("checkpoint %s holds %s blocks; converting to %s", self.path(step),
                     *(("stacked", "unrolled") if stored else ("unrolled", "stacked")))
        try:
            source = to_layout(abstract, stored)
        except ValueError as e:
            raise LayoutError(f"checkpoint {self.path(step)}: cannot describe the requested "
                              f"state in the stored layer layout: {e}") from e
        restored = restore(source)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        try:
            return jax.jit(lambda t: to_layout(t, want), out_shardings=shardings)(restored)
        except ValueError as e:
            raise LayoutError(f"checkpoint {self.path(step)}: converting its "
                              f"{'stacked' if stored else 'unrolled'} blocks (model.scan_layers) "
                              f"failed: {e}") from e

    def _restore(self, step: int, abstract_state: Any, data: bool):
        def restore(abstract):
            args = {"state": ocp.args.StandardRestore(abstract)}
            if data:
                args["data"] = ocp.args.JsonRestore()
            restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
            out[0] = restored.data if data else None
            return restored.state
        out = [None]
        state = self._relayout(step, "state", abstract_state, restore)
        return state, out[0]

    def restore(self, abstract_state: Any, data_iter=None, step: int | None = None):
        """Restore `step` (default: the newest restorable) into `abstract_state`'s layout
        (converting the blocks' layer layout if the checkpoint has the other one).

        `data_iter`, if given, is moved to the saved position in place (its `set_state` raises
        ValueError when the position does not fit the pipeline, e.g. other data streams; that is
        not a fallback). Without `step`, an unreadable checkpoint is renamed `<step>.unreadable`,
        recorded in `skipped` and logged, and the next older one is tried. Returns (step, state).
        """
        with_data = data_iter is not None
        found = None
        if step is not None:
            found = step, *self._restore(step, abstract_state, with_data)
        else:
            for candidate in sorted(self.all_steps(), reverse=True):
                try:
                    found = candidate, *self._restore(candidate, abstract_state, with_data)
                    break
                except LayoutError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure: fall back to an older step
                    reason = _first_line(e)
                    self.skipped.append((candidate, reason))
                    self._set_aside(candidate)
                    logging.warning("checkpoint %s is unreadable (%s); trying an older one",
                                    self.path(candidate), reason)
        if found is not None:
            step, state, data_state = found
            if with_data:
                data_iter.set_state(data_state)
            return step, state
        if self.skipped:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored: "
                                  + "; ".join(f"step {s}: {r}" for s, r in self.skipped))
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable step directory so it is kept but no longer a checkpoint."""
        if jax.process_index() == 0:
            src = self.path(step)
            dst = f"{src}.unreadable"
            n = 1
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.unreadable{n}"
            os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"dlm_jax_set_aside_{step}")
        self._mngr.reload()

    def restore_state_only(self, abstract_state: Any, step: int | None = None):
        """Restore only the train state (evaluation, sampling); returns (step, state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step, self._restore(step, abstract_state, data=False)[0]

    def is_params_only(self, step: int) -> bool:
        """Whether checkpoint `step` holds parameters alone (`save_params`), no train state."""
        path = os.path.join(self.directory, str(step))
        return (os.path.isdir(os.path.join(path, "params"))
                and not os.path.isdir(os.path.join(path, "state")))

    def restore_params(self, abstract_params: Any, step: int | None = None):
        """Restore a `save_params` checkpoint into `abstract_params`' layout: (step, params)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        def restore(abstract):
            return self._mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract))).params
        return step, self._relayout(step, "params", abstract_params, restore)

    def wait(self) -> None:
        """Wait for the pending save; CheckpointError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            _silence_abandoned_io()   # the failed save's pending writes
            what = f"step {step}" if step is not None else "a checkpoint"
            raise CheckpointError(f"saving {what} to {self.directory} failed: "
                                  f"{_first_line(e)}") from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()


def save_params(directory: str, step: int, params: Any, *, in_flight_gb: float = 0.0625) -> None:
    """Write `params` (a pytree of arrays) alone as checkpoint `step` of `directory`,
    synchronously: no optimizer state, no data position. At most `in_flight_gb` of arrays are
    being copied for writing at once, so a large import needs little memory beyond `params`."""
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=in_flight_gb,
                                          use_ocdbt=False)
    mngr = ocp.CheckpointManager(
        os.path.abspath(directory), item_handlers={"params": handler},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    # The in-flight limit applies to jax arrays (numpy leaves would all be copied at once);
    # callers that hold numpy should convert leaf by leaf first (`interop.to_device_leafwise`).
    params = jax.tree.map(jax.device_put, params)
    try:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)))
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - re-raised with the directory
        _silence_abandoned_io()   # the failed save's pending writes
        raise CheckpointError(f"saving parameters to {directory} failed: {_first_line(e)}") from e
    finally:
        mngr.close()


def global_data_state(data_iter) -> dict:
    """The data position over all hosts: each host's `get_state()`, merged by
    `data.pipeline.merge_states` (a collective when there are several hosts)."""
    from dlm_jax.data.pipeline import merge_states
    local = data_iter.get_state()
    if jax.process_count() == 1:
        return merge_states([local]) if "streams" in local else local
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
    padded = np.zeros(size, np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return merge_states([json.loads(bytes(r).rstrip(b"\0")) for r in rows])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore onto any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
