"""The small-scale results table: every family trained on the same tokens, then evaluated.

    python benchmarks/results_table.py --steps 1000 --out benchmarks/results_small_cpu.json

Trains AR, MDLM, BD3-LM (block 4, 8, 16), SEDD (absorbing, uniform) and D3PM with
`configs/small.py` (one size, same data order) under `--root`, one process per run, then
`python -m dlm_jax.evaluate` on each: validation NLL/NELBO (nats/token, bits per byte) over
`--batches` batches, and the generative perplexity of `--samples` samples of length 128 under
the AR run with their unigram entropy. A run whose checkpoint is already at its last step is not
trained again, so an interrupted table resumes. Prints a markdown table and writes every
number to `--out`.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (  # name, configs/small.py arg
    ("ar", "ar"),
    ("mdlm", "mdlm"),
    ("bd3lm-4", "bd3lm,block=4"),
    ("bd3lm-8", "bd3lm,block=8"),
    ("bd3lm-16", "bd3lm,block=16"),
    ("sedd-absorbing", "sedd"),
    ("sedd-uniform", "sedd,process=uniform"),
    ("d3pm-absorbing", "d3pm"),
)


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _trained_steps(workdir: str) -> int:
    ckpts = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    return max(steps, default=0)


def train(name: str, arg: str, steps: int, root: str) -> tuple[str, float | None]:
    workdir = os.path.join(root, name)
    if _trained_steps(workdir) >= steps:
        return workdir, None
    start = time.perf_counter()
    _run([sys.executable, "-m", "dlm_jax.train", f"--config=configs/small.py:{arg},steps={steps}",
          f"--workdir={workdir}"])
    return workdir, time.perf_counter() - start


def evaluate(workdir: str, judge: str, batches: int, samples: int) -> dict:
    out = _run([sys.executable, "-m", "dlm_jax.evaluate", f"--workdir={workdir}",
                f"--batches={batches}", f"--samples={samples}", f"--evaluator={judge}"])
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| run | validation nats/token | bpb | PPL (bound) | gen PPL under AR | "
             "sample entropy | sampler, NFE | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        nats = m["val/loss"]
        lines.append(
            f"| {r['name']} | {nats:.3f} | {nats / math.log(2):.3f} | {math.exp(nats):.2f} | "
            f"{m['gen/gen_ppl']:.2f} | {m['gen/entropy']:.2f} | {m['gen/sampler']}, "
            f"{m['gen/nfe_per_batch']} | "
            f"{'–' if r['train_s'] is None else round(r['train_s'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--root", default="runs/small")
    parser.add_argument("--batches", type=int, default=32, help="validation batches")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", default="benchmarks/results_small_cpu.json")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",") or c[0] == "ar"]
    rows, judge = [], None
    for name, arg in cases:
        workdir, seconds = train(name, arg, args.steps, args.root)
        judge = judge or workdir  # the AR run comes first and judges every run's samples
        metrics = evaluate(workdir, judge, args.batches, args.samples)
        rows.append({"name": name, "config": f"configs/small.py:{arg},steps={args.steps}",
                     "train_s": seconds, "metrics": metrics})
        print(f"{name}: {json.dumps(metrics)}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "batches": args.batches, "samples": args.samples,
                   "machine": machine_info(), "rows": rows}, f, indent=1)
    print(table(rows))



if __name__ == "__main__":
    main()
