"""`dlm_jax.hostmem`: glibc's malloc set to reuse freed memory, so that XLA:CPU's per-call
temporaries stop faulting fresh pages in at every call; and the CLIs set it before jax starts.

Each check runs in a fresh interpreter: the settings are process-wide and must precede jax's
threads, and the test process's own allocator stays as it is.
"""
import json
import os
import subprocess
import sys

import pytest

from dlm_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(not hostmem.is_glibc(), reason="the settings are glibc's")

# A program with a 64 MiB temporary (a reversed copy XLA cannot fuse away), called until the
# allocator's state is steady, then three times with the minor page faults counted.
FAULTS_PER_CALL = """
import json, resource
from dlm_jax.hostmem import malloc_mode, retain_freed_memory
applied = retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
step = jax.jit(lambda x: ((x * 2.0)[::-1] * jnp.exp(x)).sum()).lower(x).compile()
for _ in range(4):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": applied, "mode": malloc_mode(), "faults_per_call": faults,
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
    page); with `retain_freed_memory` the pages of the last call are reused: no faults."""
    out = {}
    for mode, env in (("retained", None), ("system", {hostmem.OPT_OUT_ENV: "system"})):
        proc = _run(FAULTS_PER_CALL, env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    retained, system = out["retained"], out["system"]
    assert retained["temp_pages"] >= 16384 and system["temp_pages"] == retained["temp_pages"]
    assert (retained["applied"], retained["mode"]) == (True, "retained")
    assert (system["applied"], system["mode"]) == (False, "system")
    # The baseline shows what is fixed: about one fault per page of the temporary, every call.
    assert system["faults_per_call"] >= 0.5 * system["temp_pages"], out
    assert retained["faults_per_call"] <= 0.01 * retained["temp_pages"], out


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


@pytest.mark.parametrize("module, args", [
    ("dlm_jax.train", ["--config", "configs/tiny.py:mdlm", "--workdir", "unused"]),
    ("dlm_jax.sample", ["--workdir", "unused"]),
    ("dlm_jax.evaluate", ["--workdir", "unused"]),
])
def test_clis_set_malloc_before_jax_starts(module, args):
    proc = _run(PROBE, None, [module, *args])
    probes = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")]
    assert proc.returncode == 0 and probes == ["PROBE []"], (proc.stdout, proc.stderr[-2000:])


def test_retain_freed_memory_leaves_other_c_libraries_alone(monkeypatch):
    """Off glibc (musl, macOS) nothing is called: `mallopt`'s parameters are glibc's."""
    def not_glibc(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "confstr", not_glibc)
    assert not hostmem.is_glibc()
    assert hostmem.retain_freed_memory() is False
    assert hostmem.malloc_mode() == "system"
