"""Metrics: host-0 JSONL (and TensorBoard when asked), progress lines, the matmul peak."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp


class MetricsWriter:
    """Appends one JSON object per call to `workdir/metrics.jsonl` on host 0 only.

    Nothing is created until the first write. `truncate_after(step)` drops rows of later steps
    (a run resumed from `step` after a crash would otherwise log those steps twice).
    """

    def __init__(self, workdir: str, tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = tensorboard
        self._tb = None
        if self.active and tensorboard:
            try:
                import tensorboardX  # noqa: F401
            except ImportError as e:
                raise ImportError("config.train.tensorboard=True needs the tensorboardX "
                                  "package: pip install -e '.[tb]'") from e

    def truncate_after(self, step: int) -> int:
        """Remove rows with a step above `step`; returns how many were removed."""
        if not self.active or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if int(json.loads(ln)["step"]) <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                pass  # a row cut off by a crash
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        return len(lines) - len(keep)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        row = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard:
            if self._tb is None:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
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


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float | None,
                  mfu: float | None, eta_s: float) -> str:
    """One progress line; tokens/s (and MFU) are left out when no step was timed."""
    mfu_txt = f" mfu {100 * mfu:5.1f}%" if mfu is not None else ""
    speed = f"{tokens_per_s:,.0f} tok/s{mfu_txt}" if tokens_per_s is not None else "– tok/s"
    return (f"step {step:>6d}/{total} | loss {loss:.4f} | lr {lr:.2e} | {speed} | "
            f"eta {format_duration(eta_s)}")


def measure_peak_flops(n: int | None = None, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of an n×n matmul in `dtype` (the model's compute dtype: bf16 runs ~2× f32 on
    accelerators) on the default device, best of `repeats`; n defaults to 1024 on CPU and 8192
    elsewhere (a 1024² matmul is launch-bound on a GPU or TPU, which would understate its peak)."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def combined_peak_flops(per_device: float, devices) -> float:
    """The peak of `devices` together, from one device's measured peak. Accelerators add up;
    CPU devices of one process (e.g. `--xla_force_host_platform_device_count` fakes) share that
    host's cores, which one device's matmul already uses, so each CPU host counts once."""
    devices = list(devices)
    if devices and all(d.platform == "cpu" for d in devices):
        return per_device * len({d.process_index for d in devices})
    return per_device * len(devices)
