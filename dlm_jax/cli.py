"""Command-line plumbing shared by the CLIs: flag parsing that turns every bad input into one
`error: …` line (exit code 2) instead of a trace, and `--config_help`.

ml_collections parses `--config FILE[:ARG]` and `--config.section.key=value` during absl's flag
parsing, before `main` runs; its errors (an unknown key, a missing file, a `ConfigError` from
`get_config`) would surface as traces. `parse_flags` checks the override keys against the schema
first (naming the closest valid key) and reports any other parsing failure by its message.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys

from absl import flags

from dlm_jax.config import Config


def fail(message: str, code: int = 2):
    """Print `error: message` to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _fields(kind) -> dict:
    return {f.name: f for f in dataclasses.fields(kind)}


def check_override(key: str) -> None:
    """`key` like "train.steps" must name a field of `Config`; else fail with the closest one."""
    kind, path = Config, []
    for part in key.split("."):
        fields = _fields(kind)
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean config.{'.'.join(path + close)}?)" if close else ""
            fail(f"--config.{key}: config.{'.'.join(path + [part])} is not a known key{hint}; "
                 f"see --config_help")
        path.append(part)
        default = fields[part].default_factory() if fields[part].default_factory \
            is not dataclasses.MISSING else fields[part].default
        kind = type(default) if dataclasses.is_dataclass(default) else None
        if kind is None and part != key.split(".")[-1]:
            fail(f"--config.{key}: config.{'.'.join(path)} is not a section")


def config_help() -> str:
    """Every config field with its default, one per line."""
    lines = ["config fields (override with --config.<section>.<key>=<value>):"]
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(default):
            lines.append(f"  {section.name} = {default!r}")
            continue
        for f in dataclasses.fields(default):
            lines.append(f"  {section.name}.{f.name} = {getattr(default, f.name)!r}")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser with one-line errors (use as `app.run(main, flags_parser=…)`)."""
    if "--config_help" in argv[1:]:
        print(config_help())
        raise SystemExit(0)
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config."):
            check_override(arg[len("--config."):].split("=", 1)[0])
            continue
        if arg.startswith("--config="):
            value = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            fail(f"--config {path}: no such config file")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else str(e)
        head = str(e).split(": ", 1)[0]  # "flag --platform=ipu" for a bad value of a plain flag
        if cause is not e and head.startswith("flag --") and not head.startswith("flag --config"):
            text = f"{head[len('flag '):]}: {text}"
        fail(text)


# XLA:CPU runs the collectives of a mesh of fake CPU devices (`--xla_force_host_platform_device_
# count`) as rendezvous of one thread per device. A thread still waiting after the stuck-warning
# timeout and then the termination timeout (20 s + 40 s by default in jaxlib 0.10.2) aborts the
# whole process ("Termination timeout for `all reduce …` … Exiting to ensure a consistent program
# state"): on a loaded machine with more fake devices than cores that is a slow machine, not a
# deadlock.
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
CPU_COLLECTIVE_TIMEOUTS = (("--xla_cpu_collective_call_terminate_timeout_seconds", 600),
                           ("--xla_cpu_collective_call_warn_stuck_timeout_seconds", 120))


def cpu_xla_flags(flags: str, *, devices: int | None = None) -> str:
    """`flags` (an XLA_FLAGS value) with `devices` fake CPU devices (replacing any count given;
    None: keep it) and, when there are fake devices, generous XLA:CPU collective timeouts
    (`CPU_COLLECTIVE_TIMEOUTS`, seconds) unless `flags` sets them. Returns the new value."""
    parts = flags.split()
    if devices is not None:
        parts = [p for p in parts if not p.startswith(FAKE_DEVICES_FLAG + "=")]
        parts.append(f"{FAKE_DEVICES_FLAG}={int(devices)}")
    if any(p.startswith(FAKE_DEVICES_FLAG + "=") for p in parts):
        for name, seconds in CPU_COLLECTIVE_TIMEOUTS:
            if not any(p.startswith(name + "=") for p in parts):
                parts.append(f"{name}={seconds}")
    return " ".join(parts)


def set_cpu_xla_flags(devices: int | None = None) -> None:
    """Apply `cpu_xla_flags` to the XLA_FLAGS environment variable; effective only before jax
    starts its backends (the CLIs call it first thing in `main`)."""
    os.environ["XLA_FLAGS"] = cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), devices=devices)


class _BackgroundErrorFilter:
    """Drops the error records of orbax's writer threads and of asyncio (a failed asynchronous
    save logs every failed write with its traceback); counted, so the CLI can say how many."""

    def __init__(self):
        self.dropped = 0

    def filter(self, record) -> bool:
        import logging
        background = record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname
        if background and record.levelno >= logging.ERROR:
            self.dropped += 1
            return False
        return True


def quiet_background_errors() -> _BackgroundErrorFilter:
    """Keep a failed asynchronous checkpoint save to the one `error:` line of the run's own
    `CheckpointError` (which names the step and directory and chains the first cause).

    Without this, orbax's threads and asyncio log each failed array write with a traceback, and
    tensorstore callbacks that fire after orbax closed its event loop print `Event loop is
    closed` tracebacks as unraisable exceptions: hundreds of lines for one full disk. Records
    and exceptions of any other origin pass through unchanged. Returns the filter (its
    `dropped` count)."""
    from absl import logging as absl_logging
    errors = _BackgroundErrorFilter()
    absl_logging.get_absl_handler().addFilter(errors)
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            errors.dropped += 1
            return
        previous(unraisable)

    sys.unraisablehook = hook
    return errors
