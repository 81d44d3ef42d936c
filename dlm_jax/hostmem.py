"""Host memory: keep freed memory for reuse instead of faulting fresh pages in at every step.

XLA:CPU allocates one buffer for all of a compiled program's temporaries at every call and frees
it when the call returns (for the bench-size MDLM train step, L 256, batch 8: 293 MiB). glibc's
malloc serves a block that large with a fresh `mmap` and returns it with `munmap`: above its
mmap threshold (at most 32 MiB), and always when the allocating thread uses one of glibc's
secondary arenas, whose heaps hold at most 64 MiB. So every step touches ~75,000 new 4 KiB pages
and the kernel zeroes each one on its first write. Measured on a 2-core AMD EPYC (family 25
model 17), bench size: ~80,000 minor page faults and 0.13–0.19 s of kernel time per MDLM step;
without them the train step at L 256, batch 8 is 1.20–1.33× faster across the families and
the CPU quickstart 1.24× (at L 1024, batch 2: 1.00–1.10×, within the machine's noise);
losses are bit for bit the same (`benchmarks/README.md`, "Host memory").

`retain_freed_memory` tells glibc to serve every thread from the main arena (`M_ARENA_MAX` 1),
from its heap rather than from fresh mappings (`M_MMAP_MAX` 0), and to keep up to 2 GiB of
free memory at the heap's top instead of returning it (`M_TRIM_THRESHOLD`): the next step's
temporaries reuse the pages of the last.

The costs, measured side by side: XLA's threads share one arena's lock, so compiling is slower
(the bench-size MDLM train step: 4.7–5.0 s against 3.9–4.0 s), and so are programs that loop
over many small steps (likely their per-iteration runtime allocations meeting at that lock):
sampling at L 128, batch 8, AR with its KV cache 0.48–0.52 s against 0.31–0.41 s, MDLM
ancestral 7.2–7.3 s against 6.1–6.9 s. And the heap settles at a few temporaries, not one
(glibc cannot always fit XLA's aligned block into the hole the last one left): for the bench
MDLM step 3 (908 MiB; peak RSS 1848 MiB against 1077 MiB with glibc's defaults). So it is set
where one large program runs many times: `python -m dlm_jax.train` (not with `--compile_only`)
and `benchmarks/bench.py`, where jax will run on the CPU. `sample`, `evaluate`, `convert`, the
sampling benchmarks, `perf_table.py` (which also samples) and the test suite keep glibc's
defaults. A CPU run short of memory can set `DLM_JAX_MALLOC=system`.

It must run before the threads that allocate exist: before jax is imported (its threads
attach to arenas on their first allocation; set later, it takes partly), ideally before
numpy. A script of your own can call it first thing, or start Python with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
`DLM_JAX_MALLOC=system` leaves glibc's defaults. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

OPT_OUT_ENV = "DLM_JAX_MALLOC"  # "system": keep the C library's defaults

# glibc's mallopt parameters (<malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB − 1, the most it can say

# PJRT plugins and packages that give jax an accelerator backend (cuda, rocm, tpu).
ACCELERATOR_MODULES = ("jax_plugins", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                       "jax_rocm60_plugin", "jax_rocm7_plugin")

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))

# Whether `retain_freed_memory` set them in this process: a fact about the process-wide
# allocator, which benchmarks record beside their figures.
_applied = False


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (whose `mallopt` these settings are for)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        return False


def cpu_backend_expected() -> bool:
    """Whether jax will run on the CPU: JAX_PLATFORMS names only cpu, or it is unset and no
    accelerator plugin is installed. Decided without importing jax."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES)


def retain_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (module docstring). Returns whether it did:
    not with ``DLM_JAX_MALLOC=system``, on another C library, or where jax will run on an
    accelerator (its temporaries live in device memory; the setting would only slow
    compiling). Call it before importing jax."""
    if (os.environ.get(OPT_OUT_ENV, "").lower() == "system" or not is_glibc()
            or not cpu_backend_expected()):
        return False
    global _applied
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def malloc_mode() -> str:
    """"retained" once `retain_freed_memory` has set glibc's malloc in this process, else
    "system" (the C library's defaults)."""
    return "retained" if _applied else "system"
