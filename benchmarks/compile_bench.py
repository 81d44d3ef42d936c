"""Compile-time benchmark: the train step of the DiT, blocks unrolled vs scanned
(`model.scan_layers`), at several depths.

    python benchmarks/compile_bench.py [--depths 4 12 24] [--family mdlm] [--remat none]
        [--steps 3] [--out benchmarks/results_compile_cpu.json]

For each depth and layout the trainer's jitted step (`steps.TrainProgram`: loss, gradients,
AdamW, EMA) is lowered from abstract inputs and compiled ahead of time
(as `compile_check.compile_train_step`, the `--compile_only` path), each in a fresh `Experiment`,
with the persistent compilation cache off, so every figure is a cold compile. `--steps N` also
times N executions of the compiled step on a fresh state (median seconds per step). Model: the
"bench" preset (width 256, 4 heads, cond_dim 128) at the given depth. Prints a markdown table;
`--out` writes the rows and the machine as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_info  # noqa: E402


def bench_config(family: str, depth: int, scan: bool, *, remat: str, seq_len: int, batch: int):
    """The benchmark's Config: `family` (`registry.FAMILIES`, e.g. "mdlm" or "bd3lm,block=16")
    on the Markov source, the "bench" model preset at `depth`."""
    from dlm_jax.config import Config
    from dlm_jax.registry import apply_family
    name, _, opt = family.partition(",")
    block = int(opt.split("=", 1)[1]) if opt.startswith("block=") else 0
    cfg = Config(name=f"compile-{name}-{depth}")
    apply_family(cfg, name, block=block)
    cfg.data.source, cfg.data.markov_vocab, cfg.data.seq_len = "markov", 64, seq_len
    cfg.model.size, cfg.model.depth = "bench", depth
    cfg.model.remat, cfg.model.scan_layers = remat, scan
    cfg.train.batch_size = batch
    cfg.mesh.shape = (1, 1, 1)
    return cfg


def measure(cfg, steps: int) -> dict:
    """Seconds to build, lower and compile the train step of `cfg` (and to run it)."""
    import jax
    import numpy as np

    from dlm_jax import registry
    from dlm_jax.compile_check import abstract_batch
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram
    t0 = time.perf_counter()
    exp = registry.build(cfg, jax.devices()[:1])
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    t1 = time.perf_counter()
    with jax.set_mesh(exp.mesh):  # as compile_check.compile_train_step, timed in two parts
        lowered = program.step.lower(program.abstract_state,
                                     abstract_batch(exp, cfg.train.batch_size))
        t2 = time.perf_counter()
        compiled = lowered.compile()
    t3 = time.perf_counter()
    row = {"build_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2,
           "lower_compile_s": t3 - t1, "params": exp.num_params}
    if steps:
        state = program.init()
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps):
            batch = {"tokens": rng.integers(0, cfg.data.markov_vocab,
                                            (cfg.train.batch_size, cfg.data.seq_len),
                                            dtype=np.int32)}
            batch = jax.device_put(batch, exp.batch_sharding)
            s = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - s)
        row["step_s"] = statistics.median(times)
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per depth, unrolled vs scanned compile seconds and their ratio."""
    by = {(r["depth"], r["scan_layers"]): r for r in rows}
    steps = any("step_s" in r for r in rows)
    head = "| depth | params | compile unrolled (s) | compile scanned (s) | unrolled / scanned |"
    sep = "|---:|---:|---:|---:|---:|"
    if steps:
        head += " step unrolled (s) | step scanned (s) |"
        sep += "---:|---:|"
    lines = [head, sep]
    for depth in sorted({r["depth"] for r in rows}):
        u, s = by.get((depth, False)), by.get((depth, True))
        cu = u["lower_compile_s"] if u else float("nan")
        cs = s["lower_compile_s"] if s else float("nan")
        params = (u or s)["params"]
        line = f"| {depth} | {params / 1e6:.1f}M | {cu:.1f} | {cs:.1f} | {cu / cs:.1f}× |"
        if steps:
            line += (f" {u.get('step_s', float('nan')):.3f} |"
                     f" {s.get('step_s', float('nan')):.3f} |") if u and s else " | |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24])
    ap.add_argument("--family", default="mdlm", help='e.g. mdlm, sedd, ar, "bd3lm,block=16"')
    ap.add_argument("--remat", default="none", choices=["none", "block", "dots"])
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="also time N executions of each step")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # cold compiles only
    rows = []
    for depth in args.depths:
        for scan in (False, True):
            cfg = bench_config(args.family, depth, scan, remat=args.remat, seq_len=args.seq_len,
                               batch=args.batch)
            row = {"depth": depth, "scan_layers": scan, **measure(cfg, args.steps)}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"family": args.family, "remat": args.remat, "seq_len": args.seq_len,
                       "batch": args.batch, "width": 256, "heads": 4, "rows": rows,
                       "machine": machine_info()}, f, indent=1)


if __name__ == "__main__":
    main()
