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
        fail(str(cause).strip().splitlines()[0] if str(cause).strip() else str(e))


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
