"""Metrics: host-0 JSONL (and TensorBoard when asked), progress lines, the matmul peak."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp


class MetricsWriter:
    """Appends one JSON object per call to `workdir/metrics.jsonl` on host 0 only."""

    def __init__(self, workdir: str, tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError as e:
                    raise ImportError("config.train.tensorboard=True needs the tensorboardX "
                                      "package: pip install -e '.[tb]'") from e
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _py(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float,
                  mfu: float | None, eta_s: float) -> str:
    mfu_txt = f" mfu {100 * mfu:5.1f}%" if mfu is not None else ""
    return (f"step {step:>6d}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s{mfu_txt} | eta {format_duration(eta_s)}")


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n×n float32 matmul on the default device (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
