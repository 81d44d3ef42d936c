"""Test-wide setup. Runs before any test module imports jax.

Eight fake CPU devices let sharding tests build (2, 2, 2) meshes on a laptop; the flag must be set
before the XLA backend starts, which is why it lives here and not in a fixture. Their collectives
get generous XLA:CPU rendezvous timeouts (`dlm_jax.cli.cpu_xla_flags`): with the defaults (a
thread aborts the process after 20 s + 40 s at a rendezvous) a loaded machine kills the test run. Subprocesses inherit both; those that train or
sample through the CLIs use 2 fake devices (`cpu_xla_flags(…, devices=2)`).
"""
import contextlib
import os

from dlm_jax.cli import FAKE_DEVICES_FLAG, cpu_xla_flags  # imports no jax

_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = cpu_xla_flags(_flags, devices=None if FAKE_DEVICES_FLAG in _flags else 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests run a tiny program a few times, so compiling it is most of their cost: XLA's backend
# at optimisation level 0 compiles about 40% faster and runs such programs about 3× slower; the
# cold suite took 13-14 instead of 18.4 min on 2 cores. HLO passes (fusion, layout) still run and
# results agree with an optimised build to float rounding. Subprocesses inherit it; tests whose
# run time dominates take the `optimized` fixture; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# For the same reason the train CLI's subprocesses keep glibc's malloc defaults: its setting for
# long runs (`dlm_jax.hostmem`) makes compiling ~20% slower, and these runs mostly compile.
# tests/test_hostmem.py checks the setting itself, with the variable removed.
os.environ.setdefault("DLM_JAX_MALLOC", "system")

import jax  # noqa: E402
import pytest  # noqa: E402

# (On an accelerator, JAX_PLATFORMS=cuda or tpu, the fake CPU devices are not the default ones.)
assert (jax.default_backend() != "cpu" or jax.device_count() >= 8
        or "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]), (
    "XLA_FLAGS was set after jax initialised its backend")

# Tests build the same tiny programs many times (several trainers per test, subprocesses);
# a compilation cache shared within the run turns the repeats into cache hits. It keeps every
# program, however quick to compile: CLI subprocesses start cold and re-run the same ones.
# One cache per pytest-xdist worker (`-n 2`): two processes never write the same entry.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
_cache_dir = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                          ".pytest_cache", "jax_compilation_cache",
                                          _worker or "main"))
if _worker:  # workers inherit the controller's environment: replace its value
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache_dir)  # subprocesses use it too
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@contextlib.contextmanager
def backend_optimisation(full: bool):
    """Compile the programs of this block at XLA's full backend optimisation (`full`) or at level 0,
    then restore the level before; jit caches are cleared on both sides, so no executable
    compiled at the other level is reused."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", not full)
    try:
        yield
    finally:
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized():
    """Full backend optimisation for this test (the suite's default is level 0, above): for
    tests that run many steps, where run time outweighs compile time."""
    with backend_optimisation(full=True):
        yield
