"""Generation benchmark: tokens/s and NFE per sampler, measured side by side in one process.

    python benchmarks/sample_bench.py [--lengths 256,1024,2048] [--recompute_max 1024]
                                      [--repeats 3] [--batch 8] [--out FILE.json]

Setup (the trainer benchmark's "bench" size, `bench.make_config`): DiT width 256, depth 4,
4 heads, the byte vocabulary, float32, batch 8, random parameters (the speed of a fixed-NFE
sampler does not depend on the weights; `skip_unchanged` is off so every step calls the network).
Cases:
  * BD3-LM, block 16, 16 ancestral steps per block, at each length: with the KV cache, and with
    the prefix recomputed (the uncached twin: the whole length under the block-causal mask at
    every step) up to `--recompute_max`;
  * BD3-LM first-hitting (one token per call) at batch 1 and at `--batch`;
  * MDLM ancestral with L steps, and AR token by token with its KV cache, at the first length.
Each case is compiled ahead of time (reported), then run `--repeats` times per pass; passes
interleave the cases so the machine's drift hits all alike. tokens/s = batch · L / median seconds.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import machine_info, make_config  # noqa: E402


def _case(family, length, batch, *, sampler, cached, steps=0, block=16, size="bench"):
    from dlm_jax import registry
    from dlm_jax.generation import make_generator, sample_keys
    # BD3-LM models of context 1024 (the papers'); longer generations slide the cache window.
    cfg = make_config(family, size=size, seq_len=min(length, 1024) if family == "bd3lm"
                      else length, batch=batch, block=block)
    cfg.sampling.sampler, cfg.sampling.steps, cfg.sampling.length = sampler, steps, length
    cfg.sampling.kv_cache, cfg.sampling.skip_unchanged = cached, False
    exp = registry.build(cfg)
    from flax import nnx
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    gen = make_generator(exp, cfg.sampling)
    keys = sample_keys(0, 0, batch)
    prompt = (jax.numpy.zeros((batch, 1), jax.numpy.int32) if gen.sampler == "ar" else None)
    t0 = time.perf_counter()
    compiled = gen.run.lower(params, keys, prompt).compile()
    compile_s = time.perf_counter() - t0
    return {"family": family, "length": length, "batch": batch, "sampler": gen.sampler,
            "cached": cached, "steps": gen.steps, "block": gen.block_len,
            "compile_s": compile_s, "fn": lambda: jax.block_until_ready(
                compiled(params, keys, prompt)), "times": []}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--recompute_max", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="bench")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    B = args.batch
    cases = []
    case = functools.partial(_case, size=args.size)
    for L in lengths:
        cases.append(case("bd3lm", L, B, sampler="ancestral", cached=True, steps=16))
        if L <= args.recompute_max:
            cases.append(case("bd3lm", L, B, sampler="ancestral", cached=False, steps=16))
    L0 = lengths[0]
    for b in (1, B):
        cases.append(case("bd3lm", L0, b, sampler="first_hitting", cached=True))
    cases.append(case("mdlm", L0, B, sampler="ancestral", cached=True, steps=L0))
    cases.append(case("ar", L0, B, sampler="ar", cached=True))
    cases.append(case("ar", L0, B, sampler="ar", cached=False))
    for p in range(args.passes):   # compiled ahead of time: the first run is already warm
        for case in cases:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                case["nfe"] = int(case["fn"]()["nfe"])
                case["times"].append(time.perf_counter() - t0)
            print(f"pass {p + 1}: {case['family']} {case['sampler']} L={case['length']} "
                  f"B={case['batch']} cached={case['cached']}: {case['times'][-1]:.2f}s",
                  flush=True)
    rows = []
    for case in cases:
        med = float(np.median(case["times"]))
        row = {k: v for k, v in case.items() if k != "fn"}
        row.update(seconds=med, tokens_per_s=case["batch"] * case["length"] / med,
                   s_per_token=med / (case["batch"] * case["length"]))
        rows.append(row)
        print(f"{row['family']:6s} {row['sampler']:13s} L={row['length']:5d} B={row['batch']} "
              f"{'cache ' if row['cached'] else 'recompute'} steps={row['steps']} "
              f"NFE={row['nfe']:5d} {med:8.3f}s {row['tokens_per_s']:9.0f} tok/s "
              f"(compile {row['compile_s']:.1f}s)", flush=True)
    result = {"machine": machine_info(), "rows": rows, "args": vars(args)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
