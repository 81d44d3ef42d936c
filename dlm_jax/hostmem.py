"""Host memory: keep freed memory for reuse instead of faulting fresh pages in at every step.

XLA:CPU allocates one buffer for all of a compiled program's temporaries at every call and frees
it when the call returns (for the bench-size MDLM train step, L 256, batch 8: 308 MB). glibc's
malloc serves a block that large with a fresh `mmap` and returns it with `munmap`: above its
mmap threshold (at most 32 MiB), and always when the allocating thread uses one of glibc's
secondary arenas, whose heaps hold at most 64 MiB. So every step touches ~75,000 new 4 KiB pages,
and the kernel zeroes each one on its first write. Measured on a 2-core AMD EPYC (family 25
model 17): ~80,000 minor page faults and 0.13–0.19 s of kernel time per MDLM step of
0.45–0.53 s, and the step 1.1–1.3× faster without them (`benchmarks/README.md`, "Host memory").

`retain_freed_memory` tells glibc to serve every thread from the main arena (`M_ARENA_MAX` 1),
from its heap rather than from fresh mappings (`M_MMAP_MAX` 0), and to keep up to 2 GiB of
free memory at the heap's top instead of returning it (`M_TRIM_THRESHOLD`): the next step's
temporaries reuse the pages of the last. The cost: the process keeps its peak heap (the peak
is what a training run needs anyway), and one arena for all threads (XLA's host threads
allocate a few large blocks per program; nothing here allocates in a hot loop).

It must run before the threads that allocate exist: before jax starts (its thread pools attach
to arenas on their first allocation), ideally before numpy is imported. The CLIs
(`dlm_jax.train`, `.sample`, `.evaluate`) and the benchmarks call it first thing; a script of
your own can do the same, or start Python with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
`DLM_JAX_MALLOC=system` leaves glibc's defaults. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import os

OPT_OUT_ENV = "DLM_JAX_MALLOC"  # "system": keep the C library's defaults

# glibc's mallopt parameters (<malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB − 1, the most it can say

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


def retain_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory (module docstring). Returns whether it did:
    False on another C library or with ``DLM_JAX_MALLOC=system``. Call it before importing jax."""
    if os.environ.get(OPT_OUT_ENV, "").lower() == "system" or not is_glibc():
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
