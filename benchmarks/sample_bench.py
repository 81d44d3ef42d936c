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
  * MDLM ancestral with L steps, and AR token by token with its KV cache (and recomputed), and
    AR by Jacobi iteration in windows of 16 through the cache, at the first length.
Each case is compiled ahead of time (reported), then run `--repeats` times per pass; passes
interleave the cases so the machine's drift hits all alike. tokens/s = batch · L / median seconds.
`--per_call` lengths: one denoising call with the cache (the first half of L committed) against
one recomputed call (the whole L), timed alone — NFE times that is what a whole generation costs,
so the ratio at L 1024 stands in for a 25-minute recomputed generation.
On a CPU model the PyTorch reference was measured on (`bench.REFERENCES`), the BD3-LM cases it
has rows for (L 256, block 16: ancestral 16 steps per block at batch 8 with and without the KV
cache, first-hitting at batch 1) also print its tokens/s and our ratio.
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

from bench import (_cpu_family_model, machine_info, make_config, reference_for,  # noqa: E402
                   reference_sampling_row)


def _case(family, length, batch, *, sampler, cached, steps=0, block=16, size="bench",
          window=0, fields=(), **config):
    """One compiled sampler case; `fields` (dotted name, value) pairs and `config` (keywords of
    `make_config`, e.g. dtype) adjust the model's config."""
    from dlm_jax import registry
    from dlm_jax.generation import AR_SAMPLERS, make_generator, sample_keys
    # BD3-LM models of context 1024 (the papers'); longer generations slide the cache window.
    cfg = make_config(family, size=size, seq_len=min(length, 1024) if family == "bd3lm"
                      else length, batch=batch, block=block, **config)
    registry.set_fields(cfg, fields)
    cfg.sampling.sampler, cfg.sampling.steps, cfg.sampling.length = sampler, steps, length
    cfg.sampling.kv_cache, cfg.sampling.skip_unchanged = cached, False
    cfg.sampling.window = window
    exp = registry.build(cfg)
    from flax import nnx
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    gen = make_generator(exp, cfg.sampling)
    keys = sample_keys(0, 0, batch)
    prompt = (jax.numpy.zeros((batch, 1), jax.numpy.int32) if gen.sampler in AR_SAMPLERS
              else None)
    t0 = time.perf_counter()
    compiled = gen.run.lower(params, keys, prompt).compile()
    compile_s = time.perf_counter() - t0
    return {"family": family, "length": length, "batch": batch, "sampler": gen.sampler,
            "cached": cached, "steps": gen.steps, "block": gen.block_len, "window": window,
            "compile_s": compile_s, "fn": lambda: jax.block_until_ready(
                compiled(params, keys, prompt)), "times": []}


def per_call_seconds(length, batch, *, cached, block=16, size="bench", calls=8, repeats=3):
    """Seconds per denoising call of the BD3-LM block decoder for the block in the middle of
    `length` (the cache holds the first half; the recomputed twin runs the whole length, as it
    does at every call): the cost that NFE multiplies. Median of `repeats` runs of `calls`."""
    import jax.numpy as jnp
    from flax import nnx

    from dlm_jax import registry
    cfg = make_config("bd3lm", size=size, seq_len=length, batch=batch, block=block)
    exp = registry.build(cfg)
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    prefix = jnp.zeros((batch, length // 2), jnp.int32)

    def decoder(params):
        return exp.method.block_decoder(exp.model(params), length, cached=cached)

    @jax.jit
    def prepare(params, prefix):  # the committed first half
        dec = decoder(params)
        cache = dec.init(batch)
        for b in range(prefix.shape[1] // block):
            cache = dec.commit(prefix[:, b * block:(b + 1) * block], cache)[1]
        return cache

    @jax.jit
    def run(params, cache):
        dec, blk = decoder(params), jnp.full((batch, block), exp.method.process.mask_id)
        # Each call sees other tokens, so XLA cannot hoist one call out of the loop.
        return jax.lax.fori_loop(0, calls, lambda i, acc: acc + dec.log_probs(
            blk.at[:, 0].set(i % 256), jnp.full((batch,), 1.0, jnp.float32),
            cache)[:, 1, 0].sum(), 0.0)

    cache = jax.block_until_ready(prepare(params, prefix))
    run(params, cache).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(params, cache).block_until_ready()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def attach_reference(rows: list[dict], ref: dict | None, size: str) -> list[dict]:
    """Rows with the PyTorch reference's tokens/s and our ratio where `ref` (the entry for this
    CPU model, `bench.reference_for`) measured the same case at the bench size, block 16."""
    for row in rows:
        match = (reference_sampling_row(ref, row) if size == "bench" and row.get("block") == 16
                 else None)
        if match:
            row.update(reference_tokens_per_s=match["tokens_per_s"],
                       ratio_tokens_per_s=row["tokens_per_s"] / match["tokens_per_s"])
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--recompute_max", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="bench")
    ap.add_argument("--per_call", default="256,1024",
                    help="lengths at which one cached and one recomputed call are timed")
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
    cases.append(case("ar", L0, B, sampler="jacobi", cached=True, window=16))
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
    ref = reference_for(_cpu_family_model())
    for row in attach_reference(rows, ref, args.size):
        if "reference_tokens_per_s" in row:
            print(f"  reference ({ref['cpu']}) {row['family']} {row['sampler']} "
                  f"B={row['batch']} cached={row['cached']}: {row['reference_tokens_per_s']:.0f} "
                  f"tok/s; ours {row['ratio_tokens_per_s']:.2f}x", flush=True)
    per_call = []
    for L in [int(x) for x in args.per_call.split(",") if x]:
        cached_s, full_s = (per_call_seconds(L, B, cached=c, size=args.size) for c in (True, False))
        per_call.append({"length": L, "cached_s": cached_s, "recompute_s": full_s,
                         "ratio": full_s / cached_s})
        print(f"per call at L={L}: cached {cached_s * 1e3:.1f} ms, recomputed "
              f"{full_s * 1e3:.1f} ms: {full_s / cached_s:.1f}x", flush=True)
    result = {"machine": machine_info(), "rows": rows, "per_call": per_call, "args": vars(args),
              "reference": ref}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
