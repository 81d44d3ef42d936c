"""`dlm_jax.hostmem`: glibc's malloc set to reuse freed memory, so that XLA:CPU's per-call
temporaries stop faulting fresh pages in at every call; and the train CLI sets it before jax
starts.

Each check runs in a fresh interpreter: the settings are process-wide and must precede jax's
threads, and the test process's own allocator stays as it is.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dlm_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(not hostmem.is_glibc(), reason="the settings are glibc's")

# A program with a 64 MiB temporary (a reversed copy XLA cannot fuse away), called until the
# heap has grown to what the calls need (glibc does not always fit XLA's aligned block into the
# hole the last call left: the heap settles at a few temporaries), then 20 more times with the
# minor page faults counted.
FAULTS = """
import json, resource
from dlm_jax.hostmem import malloc_mode, retain_freed_memory
applied = retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
step = jax.jit(lambda x: ((x * 2.0)[::-1] * jnp.exp(x)).sum()).lower(x).compile()
for _ in range(60):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step(x).block_until_ready()
print(json.dumps({"applied": applied, "mode": malloc_mode(),
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "temp_pages": step.memory_analysis().temp_size_in_bytes / 4096}))
"""


def _run(code: str, env_extra: dict | None = None, args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != hostmem.OPT_OUT_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@glibc_only
def test_retained_malloc_stops_faulting_in_each_calls_temporaries():
    """With glibc's defaults every call maps its 64 MiB temporary afresh (one fault per 4 KiB
    page); with `retain_freed_memory` the pages of earlier calls are reused."""
    out = {}
    one_device = {"XLA_FLAGS": ""}  # not the suite's 8 fake devices: one program, one device
    for mode, env in (("retained", one_device),
                      ("system", {**one_device, hostmem.OPT_OUT_ENV: "system"})):
        proc = _run(FAULTS, env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    retained, system = out["retained"], out["system"]
    assert retained["temp_pages"] >= 16384 and system["temp_pages"] == retained["temp_pages"]
    assert (retained["applied"], retained["mode"]) == (True, "retained")
    assert (system["applied"], system["mode"]) == (False, "system")
    # The baseline shows what is fixed: about one fault per page of the temporary, every call
    # (20 calls); retained, the pages are reused (a late growth of the heap may fault one
    # temporary's worth in now and then).
    assert system["faults"] >= 0.5 * 20 * system["temp_pages"], out
    assert retained["faults"] <= 3 * retained["temp_pages"], out


# Replaces `retain_freed_memory` by a probe that reports whether numpy or jax was already
# imported, then stops the CLI: it must run before jax (and its threads) start.
PROBE = """
import runpy, sys
import dlm_jax.hostmem as hostmem
def probe():
    print("PROBE", sorted(m for m in ("jax", "jaxlib", "numpy") if m in sys.modules), flush=True)
    raise SystemExit(0)
hostmem.retain_freed_memory = probe
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_train_cli_sets_malloc_before_jax_starts():
    """Before the flags are parsed: loading the --config file imports jax."""
    args = ["dlm_jax.train", "--config", "configs/tiny.py:mdlm", "--workdir", "unused"]
    proc = _run(PROBE, None, args)
    probes = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")]
    assert proc.returncode == 0 and probes == ["PROBE []"], (proc.stdout, proc.stderr[-2000:])


def test_compile_only_keeps_the_default_malloc():
    """`--compile_only` only compiles, which the setting slows down: it is left out."""
    args = ["dlm_jax.train", "--config", "configs/tiny.py:mdlm", "--compile_only"]
    proc = _run(PROBE, None, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PROBE" not in proc.stdout and "compiled train step" in proc.stdout, proc.stdout


@pytest.mark.parametrize("platforms, plugin, expected", [
    ("cpu", None, True), ("", None, True), ("cuda", None, False), ("tpu,cpu", None, False),
    ("", "libtpu", False), ("", "jax_plugins", False), ("cpu", "jax_plugins", True)])
def test_only_a_cpu_backend_gets_the_setting(monkeypatch, platforms, plugin, expected):
    """On an accelerator the temporaries live in device memory: nothing to gain there."""
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == plugin else found(name, *a))
    assert hostmem.cpu_backend_expected() is expected


def test_retain_freed_memory_leaves_other_c_libraries_alone(monkeypatch):
    """Off glibc (musl, macOS) nothing is called: `mallopt`'s parameters are glibc's."""
    def not_glibc(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "confstr", not_glibc)
    assert not hostmem.is_glibc()
    assert hostmem.retain_freed_memory() is False
    assert hostmem.malloc_mode() == "system"
