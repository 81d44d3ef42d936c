"""AR → diffusion adaptation and joint training at small scale, on the embedded corpus.

    python benchmarks/adapt_bench.py --ar runs/small/ar --steps 600 --eval_every 50 \
        --out benchmarks/results_adapt_cpu.json

1. Steps to a validation NELBO: MDLM (and, with `--bd3lm`, BD3-LM block 4) trained from the AR
   run's weights (`configs/small.py:<family>,adapt=AR,anneal=N`: shift + attention-mask
   annealing) against the same model from scratch, same data order and optimiser; validation
   NELBO every `--eval_every` steps (the trainer's evaluation: fixed batches, EMA parameters)
   and at step 0 (the initial parameters, evaluated the same way). Reports how many steps the
   adapted run needs to reach the scratch run's final NELBO.
2. Joint training (`configs/small.py:mdlm,joint=W`): one network trained on NELBO + W × AR NLL;
   its validation NELBO and AR NLL against the single-objective runs of the same config and
   steps (the MDLM scratch run above, and an AR run trained here).

One training process per run (`python -m dlm_jax.train`); a run already at its last step is
not trained again. Prints markdown tables and writes every number to `--out`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_info  # noqa: E402
from results_table import _trained_steps  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, arg: str, steps: int) -> float | None:
    """Train `configs/small.py:arg` into workdir; seconds (None when already trained)."""
    if _trained_steps(workdir) >= steps:
        return None
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dlm_jax.train", f"--config=configs/small.py:{arg}",
           f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def curve(workdir: str) -> dict[int, dict]:
    """step -> the validation metrics the trainer logged (val/loss, val/ar_nll, …)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "val/loss" in row:
                out[row["step"]] = {k: v for k, v in row.items() if k.startswith("val/")}
    return out


def initial_validation(arg: str) -> dict:
    """The trainer's validation of a run's initial parameters (step 0), in this process."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import small  # noqa: E402

    from dlm_jax import registry
    from dlm_jax.evals import initial_params, run_evaluators, Validation
    from dlm_jax.state import make_optimizer
    from dlm_jax.steps import TrainProgram
    cfg = small.get_config(arg)
    exp = registry.build(cfg)
    program = TrainProgram(exp, make_optimizer(cfg.optim, cfg.train.steps))
    params = (initial_params(cfg.train.init_from, exp) if cfg.train.init_from else None)
    state = program.init(params) if params is not None else program.init()
    evaluator = Validation(exp, program.eval_step, cfg.train.eval_batches)
    return run_evaluators([evaluator], exp, state)[0]


def steps_to_reach(values: dict[int, float], target: float) -> int | None:
    """The first logged step whose value is ≤ target."""
    return next((s for s in sorted(values) if values[s] <= target), None)


def adaptation(args, family: str, arg: str, results: dict) -> None:
    common = f"steps={args.steps},eval_every={args.eval_every}"
    runs = {"scratch": f"{arg},{common}",
            "from_ar": f"{arg},{common},adapt={args.ar},anneal={args.anneal}"}
    rows = {}
    for kind, run_arg in runs.items():
        workdir = os.path.join(args.root, f"{family}-{kind}")
        seconds = train(workdir, run_arg, args.steps)
        values = {s: m["val/loss"] for s, m in curve(workdir).items()}
        values[0] = initial_validation(run_arg)["val/loss"]
        rows[kind] = {"arg": run_arg, "train_seconds": seconds,
                      "val_nelbo": {str(s): values[s] for s in sorted(values)}}
        print(f"{family} {kind}: " + ", ".join(f"{s}: {values[s]:.3f}" for s in sorted(values)),
              flush=True)
    final = rows["scratch"]["val_nelbo"][str(args.steps)]
    adapted = {int(s): v for s, v in rows["from_ar"]["val_nelbo"].items()}
    reach = steps_to_reach(adapted, final)
    rows["scratch_final"] = final
    rows["from_ar_steps_to_scratch_final"] = reach
    rows["steps_ratio"] = None if reach is None else args.steps / max(reach, 1)
    results[family] = rows


def joint(args, results: dict) -> None:
    """The joint run against an AR run and the MDLM scratch run of the same steps and config."""
    steps, common = args.steps, f"steps={args.steps},eval_every={args.eval_every}"
    runs = {"joint": f"mdlm,joint={args.joint_weight},{common}", "ar": f"ar,{common}"}
    seconds = {}
    for name, arg in runs.items():
        seconds[name] = train(os.path.join(args.root, name), arg, steps)
    m = curve(os.path.join(args.root, "joint"))
    ar = curve(os.path.join(args.root, "ar"))
    mdlm = curve(os.path.join(args.root, "mdlm-scratch"))
    results["joint"] = {
        "weight": args.joint_weight, "steps": steps, "train_seconds": seconds,
        "val_nelbo": {str(s): m[s]["val/nelbo"] for s in sorted(m)},
        "val_ar_nll": {str(s): m[s]["val/ar_nll"] for s in sorted(m)},
        "ar_run_val_nll": {str(s): ar[s]["val/loss"] for s in sorted(ar)},
        "mdlm_run_val_nelbo": {str(s): mdlm[s]["val/loss"] for s in sorted(mdlm)}}
    j = results["joint"]
    print(f"joint at {steps}: NELBO {j['val_nelbo'][str(steps)]:.3f} (MDLM "
          f"{j['mdlm_run_val_nelbo'][str(steps)]:.3f}), AR NLL {j['val_ar_nll'][str(steps)]:.3f} "
          f"(AR {j['ar_run_val_nll'][str(steps)]:.3f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ar", default="runs/small/ar", help="the trained AR run adapted from")
    parser.add_argument("--root", default="runs/adapt")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--anneal", type=int, default=100)
    parser.add_argument("--bd3lm", action="store_true", help="also BD3-LM block 4")
    parser.add_argument("--joint_weight", type=float, default=1.0)
    parser.add_argument("--skip_joint", action="store_true")
    parser.add_argument("--out", default="benchmarks/results_adapt_cpu.json")
    args = parser.parse_args()
    results = {"machine": machine_info(), "args": vars(args)}
    adaptation(args, "mdlm", "mdlm", results)
    if not args.skip_joint:
        joint(args, results)
    if args.bd3lm:
        adaptation(args, "bd3lm-4", "bd3lm,block=4", results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
