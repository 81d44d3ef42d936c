"""Conversion benchmark: seconds and peak host memory of `python -m dlm_jax.convert` on a
GPT-2-small-sized checkpoint (124M parameters, float32) that this script writes itself.

    python benchmarks/convert_bench.py [--out benchmarks/results_convert_cpu.json]

The checkpoint is a hub-style directory (config.json + model.safetensors, random weights). The
conversion runs in a fresh process; its peak resident memory (ru_maxrss) is compared with a
process that only imports jax and dlm_jax (the fixed cost) and with the checkpoint's size: a
streaming conversion needs about one copy of the parameters above the fixed cost.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_SMALL = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
              "n_head": 12, "layer_norm_epsilon": 1e-5, "model_type": "gpt2"}


def write_checkpoint(directory: str, config: dict, seed: int = 0) -> int:
    """A random GPT-2 checkpoint in the hub layout; returns its parameter count."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    V, P, D = config["vocab_size"], config["n_positions"], config["n_embd"]

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
    sd = {"wte.weight": w(V, D), "wpe.weight": w(P, D), "ln_f.weight": np.ones(D, np.float32),
          "ln_f.bias": np.zeros(D, np.float32)}
    for i in range(config["n_layer"]):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": np.ones(D, np.float32), p + "ln_1.bias": w(D),
                   p + "attn.c_attn.weight": w(D, 3 * D), p + "attn.c_attn.bias": w(3 * D),
                   p + "attn.c_proj.weight": w(D, D), p + "attn.c_proj.bias": w(D),
                   p + "ln_2.weight": np.ones(D, np.float32), p + "ln_2.bias": w(D),
                   p + "mlp.c_fc.weight": w(D, 4 * D), p + "mlp.c_fc.bias": w(4 * D),
                   p + "mlp.c_proj.weight": w(4 * D, D), p + "mlp.c_proj.bias": w(D)})
    save_file(sd, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(a.size for a in sd.values())


def _child_peak(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of a command run alone in a child process."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    # Each measurement in its own grandchild so ru_maxrss (a maximum over children) is its own.
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "dt = time.perf_counter() - t; "
             "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode); "
             "print(p.stdout[-2000:]); print(p.stderr[-2000:], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    first, _, rest = out.stdout.partition("\n")
    seconds, kib, code = first.split()
    if int(code):
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return float(seconds), int(kib) / 1024, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "runs") if os.path.isdir(
            os.path.join(ROOT, "runs")) else None) as tmp:
        ckpt = os.path.join(tmp, "gpt2-small")
        os.makedirs(ckpt)
        t0 = time.perf_counter()
        n = write_checkpoint(ckpt, GPT2_SMALL)
        write_s = time.perf_counter() - t0
        size_mib = os.path.getsize(os.path.join(ckpt, "model.safetensors")) / 2 ** 20
        _, base_mib, _ = _child_peak([sys.executable, "-c", "import jax, dlm_jax.interop, "
                                      "dlm_jax.models.gpt2, dlm_jax.checkpoint; "
                                      "jax.numpy.zeros(1).block_until_ready()"])
        seconds, peak_mib, stdout = _child_peak(
            [sys.executable, "-m", "dlm_jax.convert", "--from", "gpt2", "--checkpoint", ckpt,
             "--out", os.path.join(tmp, "run"), "--set", "data.source=markov",
             "--set", "data.markov_vocab=50257"])
        summary = json.loads(stdout.strip().splitlines()[-1])
    result = {"params": n, "checkpoint_mib": round(size_mib, 1), "write_s": round(write_s, 1),
              "convert_s": round(seconds, 1), "convert_inner_s": summary["seconds"],
              "peak_rss_mib": round(peak_mib), "import_only_rss_mib": round(base_mib),
              "above_import_per_checkpoint": round((peak_mib - base_mib) / size_mib, 2),
              "machine": machine_info()}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)



if __name__ == "__main__":
    main()
