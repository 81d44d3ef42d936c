"""AR2Diff benchmark: parallel decoding of a trained AR model, measured side by side in one process.

    python benchmarks/ar2diff_bench.py --root runs/small --out benchmarks/results_ar2diff_cpu.json

The runs under `--root` are `configs/small.py` trainings (`benchmarks/results_table.py`): `ar`
(the target and the generative-perplexity judge) and the masked-diffusion runs `mdlm`,
`bd3lm-4`, `bd3lm-8`, `bd3lm-16` (drafters and MH proposals). Nothing is trained or written
there. Every generation starts at the document boundary (`generation.encode_prompt`) or
`--prompt`, uses the keys `generation.sample_keys(seed, 0, batch)`, and is one compiled program.

Cases (all compiled first, then a warm-up call whose outputs give the statistics, then
`--repeats` timed passes that interleave every case, `block_until_ready`; medians reported):
  * pass cost: one AR pass over a block of w tokens against a cached prefix of L/2 tokens
    (`Autoregressive.block_decoder(...).log_probs`) for w = 1 … L/2, and one uncached causal pass
    over all L: what a parallel decoder pays per iteration, relative to a sequential step;
  * Jacobi (`sampling.sampler="jacobi"`, windows `--windows`, 0 = the whole length uncached)
    against sequential KV-cached AR decoding (`sampler="ar"`), greedy (temperature 0) and sampled
    (temperature 1, the noise of every position drawn up front): AR passes per token, seconds,
    tokens/s, speed relative to sequential, and whether the tokens equal the sequential ones;
  * speculative sampling (`samplers.speculative.speculative_sample`, called as the `speculative`
    generator calls it) with each drafter and each `--spec` pair k:steps (k draft tokens revealed
    left to right in `steps` drafter calls): acceptance, tokens per AR pass, drafter passes, AR
    plus drafter passes per token (the drafters are as large as the target), seconds and speed
    relative to sequential AR sampling (temperature 1);
  * Metropolis–Hastings (`samplers.mh.mh_sample` from one full draft of `--mh_drafter`, as the `mh`
    generator starts): the masked proposal (`--mh_masked` positions re-drawn by the drafter) and
    uniform single-site, for each of `--mh_steps` (0 = the initial draft itself): acceptance,
    generative perplexity under the AR run (`evals.generative.generative_perplexity`, the
    `evaluate` convention: each sample's tokens with its prompt) and unigram entropy, against the
    AR run's own ancestral samples (the reference rows).
Speed figures are only comparable within one run (the benchmark machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import machine_info  # noqa: E402


def _np(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


class Case:
    """One compiled program: `call()` runs it to completion; `times` collects timed runs."""

    def __init__(self, part: str, name: str, compiled, *args, **info):
        self.part, self.name, self.info = part, name, info
        self._compiled, self._args = compiled, args
        self.times: list[float] = []
        self.out = None

    def call(self):
        return jax.block_until_ready(self._compiled(*self._args))

    def seconds(self) -> float:
        return float(np.median(self.times))

    def spread(self) -> dict:
        return {"seconds_min": float(np.min(self.times)), "seconds_max": float(np.max(self.times))}


def _compile(fn, *args):
    t0 = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------

def pass_cost_cases(exp, params, batch: int, length: int, widths, calls: int) -> list[Case]:
    """ms per AR pass: a block of w tokens scored against a cached prefix of L/2 tokens, and the
    uncached causal pass over all L tokens. Each case runs `calls` passes in a fori_loop whose
    input changes every call (so nothing is hoisted)."""
    method, half = exp.method, length // 2
    prefix = jnp.full((batch, half), 32, jnp.int32)

    @jax.jit
    def prepare(params, prefix):
        dec = method.block_decoder(exp.model(params), length, window=length)
        return dec.commit(prefix, dec.init(batch))[1]

    cache = jax.block_until_ready(prepare(params, prefix))
    cases = []
    for w in widths:
        def run(params, cache, w=w):
            dec = method.block_decoder(exp.model(params), length, window=length)
            blk = jnp.full((batch, w), 101, jnp.int32)
            return jax.lax.fori_loop(0, calls, lambda i, acc: acc + dec.log_probs(
                blk.at[:, 0].set(i % 256), None, cache)[:, -1, 0].sum(), 0.0)
        compiled, cs = _compile(run, params, cache)
        cases.append(Case("pass", f"cached, block of {w}", compiled, params, cache, tokens=w,
                          cached=True, calls=calls, compile_s=cs))

    def full(params):
        fn = method.denoiser(exp.model(params)).fn
        x = jnp.full((batch, length), 101, jnp.int32)
        return jax.lax.fori_loop(0, calls, lambda i, acc: acc + fn(
            x.at[:, 0].set(i % 256))[:, -1, 0].sum(), 0.0)
    compiled, cs = _compile(full, params)
    cases.append(Case("pass", f"uncached, all {length}", compiled, params, tokens=length,
                      cached=False, calls=calls, compile_s=cs))
    return cases


def generator_case(part, name, exp, params, sampling, keys, prompt, **info) -> Case:
    from dlm_jax.generation import make_generator
    gen = make_generator(exp, sampling)
    p = gen.params(params)
    compiled, cs = _compile(gen.run, p, keys, prompt)
    return Case(part, name, compiled, p, keys, prompt, sampler=gen.sampler, compile_s=cs, **info)


def jacobi_cases(exp, params, base, keys, prompt, windows) -> list[Case]:
    cases = []
    for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
        sm = dataclasses.replace(base, sampler="ar", temperature=temp)
        cases.append(generator_case("jacobi", f"sequential {mode}", exp, params, sm, keys,
                                    prompt, mode=mode, window=None))
        for w in windows:
            sm = dataclasses.replace(base, sampler="jacobi", temperature=temp, window=w)
            label = f"jacobi {mode}, window {w}" if w else f"jacobi {mode}, whole length uncached"
            cases.append(generator_case("jacobi", label, exp, params, sm, keys, prompt,
                                        mode=mode, window=w))
    return cases


def speculative_cases(exp, params, drafters: dict, pairs, keys, prompt, length) -> list[Case]:
    from dlm_jax.samplers import speculative
    cases = []
    for dname, (d_exp, d_params) in drafters.items():
        for k, steps in pairs:
            def run(params, d_params, keys, prompt, k=k, steps=steps, d_exp=d_exp):
                d_method = d_exp.method
                return speculative.speculative_sample(
                    exp.method.denoiser(exp.model(params)),
                    d_method.denoiser(d_exp.model(d_params)), keys, prompt, length=length,
                    draft_len=k, mask_id=d_method.process.mask_id, draft_steps=steps,
                    schedule=d_method.schedule)
            compiled, cs = _compile(run, params, d_params, keys, prompt)
            cases.append(Case("speculative", f"{dname}, k {k}, {steps} step(s)", compiled,
                              params, d_params, keys, prompt, drafter=dname, draft_tokens=k,
                              draft_steps=steps, compile_s=cs))
    return cases


def mh_cases(exp, params, drafter, dname, masked, steps_list, keys, prompt, length
             ) -> list[Case]:
    """The init (one full draft of the drafter, keys fold_in(key, 2^31 − 1), as the `mh`
    generator draws it), then the chains."""
    from dlm_jax.samplers import mh
    d_exp, d_params = drafter
    d_method, P = d_exp.method, prompt.shape[1]

    def init(d_params, keys, prompt):
        x = jnp.zeros((keys.shape[0], length), jnp.int32).at[:, :P].set(prompt)
        init_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 2**31 - 1))(keys)
        return mh.propose_masked(init_keys, x, d_method.denoiser(d_exp.model(d_params)),
                                 prompt_len=P, num_masked=length - P, vocab=exp.token_vocab,
                                 mask_id=d_method.process.mask_id, schedule=d_method.schedule)[0]

    compiled, cs = _compile(init, d_params, keys, prompt)
    cases = [Case("mh", f"{dname} one-shot draft (0 steps)", compiled, d_params, keys, prompt,
                  proposal="init", steps=0, num_masked=length - P, compile_s=cs)]
    x0 = jax.block_until_ready(compiled(d_params, keys, prompt))
    proposals = [("masked", m) for m in masked] + [("uniform", 1)]
    for steps in [s for s in steps_list if s > 0]:
        for proposal, m in proposals:
            def run(params, d_params, keys, x0, proposal=proposal, m=m, steps=steps):
                return mh.mh_sample(exp.method.denoiser(exp.model(params)), keys, x0,
                                    steps=steps, prompt_len=P, proposal=proposal,
                                    denoiser=d_method.denoiser(d_exp.model(d_params)),
                                    mask_id=d_method.process.mask_id, num_masked=m,
                                    schedule=d_method.schedule)
            compiled, cs = _compile(run, params, d_params, keys, x0)
            label = (f"masked ({dname}, {m} position{'s' if m > 1 else ''})"
                     if proposal == "masked" else "uniform single-site")
            cases.append(Case("mh", f"{label}, {steps} steps", compiled, params, d_params, keys,
                              x0, proposal=proposal, steps=steps, num_masked=m, compile_s=cs))
    return cases


# ---------------------------------------------------------------------------------------------
# statistics of a case's (warm-up) outputs
# ---------------------------------------------------------------------------------------------

def _rows(exp, tokens) -> list[dict]:
    tok = exp.tokenizer
    return [{"tokens": t.tolist(), "text": tok.decode(t) if tok is not None else None}
            for t in np.asarray(tokens)]


def quality(exp, params, tokens) -> dict:
    from dlm_jax.evals.generative import generative_perplexity
    g = generative_perplexity(exp, params, _rows(exp, tokens), same_tokenizer=True)
    return {"gen_ppl": g["gen_ppl"], "gen_ppl_mean": g["gen_ppl_mean"], "entropy": g["entropy"]}


def pass_row(case) -> dict:
    ms = case.seconds() / case.info["calls"] * 1e3
    return {"case": case.name, **case.info, "ms_per_pass": ms,
            "ms_min": min(case.times) / case.info["calls"] * 1e3,
            "ms_max": max(case.times) / case.info["calls"] * 1e3}


def jacobi_row(case, seq_case, new_tokens: int, batch: int) -> dict:
    out, ref = case.out, seq_case.out
    sec = case.seconds()
    row = {"case": case.name, **case.info, "seconds": sec, **case.spread(),
           "tokens_per_s": batch * new_tokens / sec,
           "speed_vs_sequential": seq_case.seconds() / sec,
           "batched_passes": int(out["nfe"]),
           "batched_passes_per_token": int(out["nfe"]) / new_tokens}
    if "iterations" in out:          # Jacobi: a row's passes are its iterations plus the commits
        per_row = np.asarray(out["iterations"]) + int(out.get("commits", 0))
        diff = np.asarray(out["tokens"]) != np.asarray(ref["tokens"])
        row.update(converged=bool(np.all(out["converged"])),
                   identical_to_sequential=not bool(diff.any()),
                   differing_tokens=int(diff.sum()), commits=int(out.get("commits", 0)))
    else:
        per_row = np.full((batch,), new_tokens)
    row.update(passes_per_row=per_row.tolist(),
               passes_per_token=float(per_row.mean()) / new_tokens,
               tokens_per_pass=float(np.mean(new_tokens / per_row)))
    return row


def _sequential_passes(ar_passes, draft_passes, new_tokens: int) -> float:
    """AR plus drafter passes per token of a batch-1 run of each row, averaged over the rows:
    what the wall time follows where a pass costs the same for 1 or k tokens and the drafter
    is as large as the target (as here)."""
    return float(np.mean(np.asarray(ar_passes) + np.asarray(draft_passes))) / new_tokens


def speculative_row(case, ar_case, new_tokens: int, batch: int, q: dict) -> dict:
    out, sec = case.out, case.seconds()
    return {"case": case.name, **case.info, "seconds": sec, **case.spread(),
            "tokens_per_s": batch * new_tokens / sec,
            "speed_vs_ar": ar_case.seconds() / sec,
            "acceptance": float(out["acceptance"]),
            "accepted_per_row": np.asarray(out["accepted"]).tolist(),
            "tested_per_row": np.asarray(out["tested"]).tolist(),
            "ar_passes_per_row": np.asarray(out["ar_passes"]).tolist(),
            "draft_passes_per_row": np.asarray(out["draft_passes"]).tolist(),
            "tokens_per_pass": float(np.mean(out["tokens_per_pass"])),
            "draft_passes_per_token": float(np.mean(out["draft_passes"])) / new_tokens,
            "sequential_passes_per_token": _sequential_passes(out["ar_passes"],
                                                              out["draft_passes"], new_tokens),
            "batched_rounds": int(out["rounds"]), "batched_draft_calls": int(out["draft_nfe"]),
            **q}


def mh_row(case, q: dict) -> dict:
    out, sec = case.out, case.seconds()
    row = {"case": case.name, **case.info, "seconds": sec, **case.spread(), **q}
    if isinstance(out, dict):
        row.update(acceptance=float(out["acceptance"]),
                   accept_rate_per_chain=np.asarray(out["accept_rate"]).tolist(),
                   ar_passes=int(out["ar_nfe"]), drafter_passes=int(out["denoiser_nfe"]) + 1)
    else:
        row.update(acceptance=None, ar_passes=0, drafter_passes=1)
    return row


# ---------------------------------------------------------------------------------------------
# markdown tables of a result
# ---------------------------------------------------------------------------------------------

def tables(res: dict) -> str:
    L, P = res["setup"]["length"], res["setup"]["prompt_tokens"]
    seq = next(r for r in res["jacobi"] if r["case"] == "sequential greedy")
    step_ms = seq["seconds"] / (L - P) * 1e3      # one step of sequential cached decoding
    out = [f"Pass cost (batch {res['setup']['batch']}, prefix of {L // 2} cached; a step of "
           f"sequential decoding: {step_ms:.2f} ms):", "",
           "| AR pass | ms | × a pass over 1 token | × a sequential step |", "|---|---|---|---|"]
    one = next(r["ms_per_pass"] for r in res["pass_cost"] if r["cached"] and r["tokens"] == 1)
    for r in res["pass_cost"]:
        out.append(f"| {r['case']} | {r['ms_per_pass']:.2f} | {r['ms_per_pass'] / one:.1f} | "
                   f"{r['ms_per_pass'] / step_ms:.1f} |")
    out += ["", f"Jacobi vs sequential ({L - P} new tokens per row):", "",
            "| case | AR passes per token (per row) | tokens per pass | batched passes | "
            "seconds | tokens/s | speed vs sequential | identical tokens |",
            "|---|---|---|---|---|---|---|---|"]
    for r in res["jacobi"]:
        ident = "—" if "identical_to_sequential" not in r else (
            "yes" if r["identical_to_sequential"] else f"no ({r['differing_tokens']})")
        out.append(f"| {r['case']} | {r['passes_per_token']:.3f} | {r['tokens_per_pass']:.2f} "
                   f"| {r['batched_passes']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['speed_vs_sequential']:.2f}× | {ident} |")
    out += ["", "Speculative sampling (temperature 1):", "",
            "| drafter, k, drafter steps | acceptance | tokens per AR pass | drafter passes per "
            "token | AR + drafter passes per token | batched rounds | seconds | speed vs AR "
            "sampling | gen PPL | entropy |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["speculative"]:
        both = _sequential_passes(r["ar_passes_per_row"], r["draft_passes_per_row"], L - P)
        out.append(f"| {r['case']} | {r['acceptance']:.3f} | {r['tokens_per_pass']:.2f} | "
                   f"{r['draft_passes_per_token']:.2f} | {both:.2f} | {r['batched_rounds']} | "
                   f"{r['seconds']:.2f} | {r['speed_vs_ar']:.3f}× | {r['gen_ppl']:.2f} | "
                   f"{r['entropy']:.2f} |")
    out += ["", "Metropolis–Hastings toward the AR model (quality judged by the AR run):", "",
            "| chain | acceptance | AR passes | drafter passes | seconds | gen PPL | "
            "gen PPL (per-sample mean) | entropy |", "|---|---|---|---|---|---|---|---|"]
    for r in res["reference"] + res["mh"]:
        acc = "—" if r.get("acceptance") is None else f"{r['acceptance']:.3f}"
        sec = "—" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        out.append(f"| {r['case']} | {acc} | {r.get('ar_passes', '—')} | "
                   f"{r.get('drafter_passes', '—')} | {sec} | {r['gen_ppl']:.2f} | "
                   f"{r['gen_ppl_mean']:.2f} | {r['entropy']:.2f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/small")
    ap.add_argument("--out", default="benchmarks/results_ar2diff_cpu.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over all cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="", help="text every sample starts with (default: the "
                    "document boundary)")
    ap.add_argument("--windows", default="8,16,32,64,0", help="Jacobi windows; 0 = the whole "
                    "length, uncached")
    ap.add_argument("--pass_widths", default="1,8,16,32,64")
    ap.add_argument("--pass_calls", type=int, default=64)
    ap.add_argument("--drafters", default="mdlm,bd3lm-4,bd3lm-8,bd3lm-16")
    ap.add_argument("--spec", default="2:1,4:1,8:1,4:4,8:8",
                    help="speculative k:steps pairs (k draft tokens in `steps` drafter calls)")
    ap.add_argument("--mh_drafter", default="mdlm")
    ap.add_argument("--mh_masked", default="1,4", help="positions per masked MH proposal")
    ap.add_argument("--mh_steps", default="0,16,64,256")
    ap.add_argument("--ref_batches", type=int, default=8,
                    help="batches of AR ancestral samples for the larger reference row")
    ap.add_argument("--tables_from", default="", help="print the tables of a result JSON")
    args = ap.parse_args(argv)
    if args.tables_from:
        with open(args.tables_from) as f:
            print(tables(json.load(f)))
        return {}

    from dlm_jax.evals import restore_run
    from dlm_jax.generation import encode_prompt, load_drafter, sample_keys

    start = time.perf_counter()
    B, L = args.batch, args.length
    exp, _, step, state = restore_run(os.path.join(args.root, "ar"))
    params = state.eval_params
    base = dataclasses.replace(exp.cfg.sampling, length=L, batch_size=B, kv_cache=True,
                               stop_at_eos=False, top_k=0, top_p=1.0, seed=args.seed)
    keys = sample_keys(args.seed, 0, B)
    prompt = encode_prompt(exp, args.prompt or None, B, "ar")
    P = int(prompt.shape[1])
    new = L - P
    drafters = {}
    for name in dict.fromkeys([n for n in args.drafters.split(",") if n] + [args.mh_drafter]):
        sm = dataclasses.replace(base, drafter=os.path.join(args.root, name))
        drafters[name] = load_drafter(exp, sm)
    print(f"restored {args.root}/ar (step {step}) and drafters {list(drafters)} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)

    pairs = [tuple(int(v) for v in p.split(":")) for p in args.spec.split(",") if p]
    cases = pass_cost_cases(exp, params, B, L, _ints(args.pass_widths), args.pass_calls)
    cases += jacobi_cases(exp, params, base, keys, prompt, _ints(args.windows))
    spec_drafters = {n: drafters[n] for n in args.drafters.split(",") if n}
    cases += speculative_cases(exp, params, spec_drafters, pairs, keys, prompt, L)
    cases += mh_cases(exp, params, drafters[args.mh_drafter], args.mh_drafter,
                      _ints(args.mh_masked), _ints(args.mh_steps), keys, prompt, L)
    print(f"{len(cases)} cases compiled ({sum(c.info['compile_s'] for c in cases):.0f}s of "
          f"compilation; {time.perf_counter() - start:.0f}s so far)", flush=True)

    for case in cases:                                    # warm-up: the outputs are the stats
        t0 = time.perf_counter()
        case.out = _np(case.call())
        case.info["warmup_s"] = time.perf_counter() - t0
    print(f"warm-up done ({time.perf_counter() - start:.0f}s)", flush=True)
    for rep in range(args.repeats):                       # interleaved timed passes
        for case in cases:
            t0 = time.perf_counter()
            case.call()
            case.times.append(time.perf_counter() - t0)
        print(f"pass {rep + 1}/{args.repeats} done ({time.perf_counter() - start:.0f}s)",
              flush=True)

    by = {c.name: c for c in cases}
    jac = [c for c in cases if c.part == "jacobi"]
    res_pass = [pass_row(c) for c in cases if c.part == "pass"]
    res_jac = [jacobi_row(c, by[f"sequential {c.info['mode']}"], new, B) for c in jac]
    ar_case = by["sequential sampled"]
    res_spec = [speculative_row(c, ar_case, new, B, quality(exp, params, c.out["tokens"]))
                for c in cases if c.part == "speculative"]
    res_mh = []
    for c in (c for c in cases if c.part == "mh"):
        tokens = c.out["tokens"] if isinstance(c.out, dict) else c.out
        res_mh.append(mh_row(c, quality(exp, params, tokens)))

    # The reference: the AR run's own ancestral samples, the same keys, then more of them.
    ref = [{"case": f"AR ancestral samples ({B}, the same keys)",
            **quality(exp, params, ar_case.out["tokens"]), "seconds": ar_case.seconds(),
            "ar_passes": new}]
    if args.ref_batches > 1:
        more = [ar_case.out["tokens"]]
        for i in range(1, args.ref_batches):
            more.append(np.asarray(ar_case._compiled(ar_case._args[0],
                                                     sample_keys(args.seed, i * B, B),
                                                     prompt)["tokens"]))
        ref.append({"case": f"AR ancestral samples ({B * args.ref_batches})",
                    **quality(exp, params, np.concatenate(more))})
    greedy = by["sequential greedy"].out["tokens"][0]
    sampled = ar_case.out["tokens"][0]
    result = {
        "setup": {"ar_run": os.path.join(args.root, "ar"), "ar_step": step,
                  "drafters": {n: d[0].cfg.name for n, d in drafters.items()},
                  "batch": B, "length": L, "prompt_tokens": P, "new_tokens_per_row": new,
                  "repeats": args.repeats, "seed": args.seed,
                  "greedy_sample_0": exp.tokenizer.decode(greedy),
                  "sampled_sample_0": exp.tokenizer.decode(sampled)},
        "pass_cost": res_pass, "jacobi": res_jac, "speculative": res_spec,
        "mh": res_mh, "reference": ref,
        "compile_s": {c.name: c.info["compile_s"] for c in cases},
        "times": {c.name: c.times for c in cases},
        "machine": machine_info(), "args": vars(args),
        "total_s": time.perf_counter() - start}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(tables(result))
    print(f"total {result['total_s']:.0f}s" + (f"; wrote {args.out}" if args.out else ""))
    return result


if __name__ == "__main__":
    main()
