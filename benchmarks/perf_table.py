"""The performance table: one command, one process, written into README.md.

    python benchmarks/perf_table.py [--quick] [--out benchmarks/results_perf_<machine>.json]
                                    [--readme README.md]

On whatever machine it runs (`jax.default_backend()`: float32 on CPU, bfloat16 on accelerators)
it measures, side by side in one process (the machine's speed drifts, so only figures measured
together are compared):
  1. the matmul peak through jax (2048² on CPU, 8192² on accelerators), at the start, between
     the groups below and at the end; MFU divides by the median of these;
  2. training tokens/s and MFU per family (`bench.CASES`) in groups — the bench size (width
     256, depth 4, 4 heads, bytes) at L 256 batch 8 and L 1024 batch 2, and the `small` preset
     at L 1024 — with the families of a group interleaved pass by pass (`bench.Case`). FLOPs per
     token are `Experiment.flops_per_token()`: they count the attention the configured backend
     computes (`methods.base.score_pairs`). The L 1024 bench group also runs every family with
     `model.attention="dense"`: the train-step speed-up of the flash backend;
  3. sampling tokens/s per sampler at L 128, batch 8, random parameters (`sample_bench._case`),
     and the BD3-LM (and AR) KV-cache speed-up over the uncached twin;
  4. fwd+bwd of `attention.attend` per pattern, length and backend (dense, xla, and splash on
     TPU / cudnn on GPU): the speed-up over dense masked attention.
`--quick`: training at L 256 with the xla backend only, 2 timed steps × 2 passes; one sampler
per family at L 64; attention at L 256 — a few minutes on a 2-core CPU. Ratios to the PyTorch
reference are shown only on a CPU model it was measured on (`bench.REFERENCES`), for the
families and (L, batch) it has rows for, against twins of our rows run at its dropout (0.1),
interleaved with the rest of their group.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import bench  # noqa: E402

MARK_START, MARK_END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
README_INTRO = ("`python benchmarks/perf_table.py` (`--quick` for a short run) measures the "
                "table below in one process on the machine it runs on and rewrites it here:")
# MFU the issue targets on an H100 / H200 / TPU v5 at the small size, L 1024.
MFU_TARGETS = {"ar": 0.45, "mdlm": 0.45, "bd3lm": 0.40}
TARGET_SIZE = ("small", 1024)
PATTERNS = ("full", "causal", "block_causal", "two_pass")
PARTS = ("train", "sampling", "attention")
ATTN_SHAPE = {"batch": 2, "heads": 4, "head_dim": 64, "block": 16}


# ---------------------------------------------------------------------------------------------
# Plan: what runs where
# ---------------------------------------------------------------------------------------------

def platform_settings(backend: str) -> dict:
    """Dtype, peak size, small-size batch and attention backends for a jax platform."""
    accel = backend != "cpu"
    # cudnn_mask: measured only (not a `model.attention` backend), see masked_cudnn_attention
    extra = {"tpu": ("splash",), "gpu": ("cudnn", "cudnn_mask")}.get(backend, ())
    return {"backend": backend, "accelerator": accel,
            "dtype": "bfloat16" if accel else "float32",
            "peak_n": 8192 if accel else 2048,
            "small_batch": 16 if accel else 1,
            "attention_backends": ("dense", "xla") + extra}


def model_kernels(settings: dict) -> tuple[str, ...]:
    """The platform's kernel backends a model can be configured with (`model.attention`):
    the attention backends but dense, xla and the measured-only cudnn_mask."""
    return tuple(b for b in settings["attention_backends"]
                 if b not in ("dense", "xla", "cudnn_mask"))


def train_groups(quick: bool, small_batch: int, reference: dict | None = None,
                 kernels: tuple = ()) -> list[dict]:
    """The training groups, each named `<size>-L<seq_len>`: families interleaved within each;
    `backends` per family (the xla/dense twins at L 1024, where flash skips the most tiles; at
    the small size, xla and the platform's `kernels`, splash or cudnn: the MFU target's rows);
    `max_steps` caps the timed steps per pass on CPU. With a `reference` entry
    (`bench.reference_for`), a bench-size group it has rows for also runs `reference_twins`:
    those families at the reference's dropout."""
    groups = [{"size": "bench", "seq_len": 256, "batch": 8, "backends": ("xla",)}]
    if not quick:
        groups += [{"size": "bench", "seq_len": 1024, "batch": 2, "backends": ("xla", "dense")},
                   # A small-size step is seconds to minutes on CPU: 2 timed steps per pass.
                   {"size": "small", "seq_len": 1024, "batch": small_batch,
                    "backends": ("xla",) + tuple(kernels), "max_steps": 2}]
    for g in groups:
        g["name"] = f"{g['size']}-L{g['seq_len']}"
        own = tuple(f for f in bench.FAMILIES
                    if (row := bench.reference_row(reference, f, g["seq_len"], g["batch"]))
                    and row["reference_family"] == f)
        if g["size"] == "bench" and own:
            g["reference_twins"] = {"dropout": reference["dropout"], "families": own}
    return groups


def group_names(quick: bool = False) -> tuple[str, ...]:
    """The names of the training groups a run plans (`train_groups`), for `--groups`."""
    return tuple(g["name"] for g in train_groups(quick, small_batch=1))


def sampling_specs(length: int, quick: bool = False) -> list[dict]:
    """Sampler cases at `length` (random parameters; D3PM with T = length steps, so its NFE
    matches the other whole-sequence samplers); `quick` drops the second sampler of a family."""
    specs = [
        {"family": "ar", "sampler": "ar", "cached": True},
        {"family": "ar", "sampler": "ar", "cached": False},
        {"family": "ar", "sampler": "jacobi", "cached": True, "window": 16},
        {"family": "mdlm", "sampler": "ancestral", "cached": True, "steps": length},
        {"family": "mdlm", "sampler": "first_hitting", "cached": True},
        {"family": "sedd", "sampler": "analytic", "cached": True, "steps": length},
        {"family": "d3pm", "sampler": "ancestral", "cached": True,
         "fields": (("diffusion.d3pm_steps", length),)},
        {"family": "bd3lm", "sampler": "ancestral", "cached": True, "steps": 16},
        {"family": "bd3lm", "sampler": "ancestral", "cached": False, "steps": 16},
        {"family": "bd3lm", "sampler": "first_hitting", "cached": True},
    ]
    seconds = ("jacobi", "first_hitting")
    return [s for s in specs if not (quick and s["sampler"] in seconds)]


# Dense bf16 matmul peak per chip, TFLOP/s, from the vendors' datasheets, matched as a substring
# of jax's `device_kind`, most specific first. MFU as papers report it divides by these; the
# measured matmul peak is lower (about 800 of an H100 SXM's 989), so MFU against it reads higher.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                         ("H200", 989.4), ("A100", 312.0), ("TPU v5 lite", 197.0),
                         ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
                         ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v4", 275.0))


def datasheet_peak_gflops(device_kind: str | None) -> float | None:
    """The datasheet bf16 peak (GFLOP/s) of the chip jax names `device_kind`, else None."""
    for name, tflops in DATASHEET_BF16_TFLOPS:
        if device_kind and name in device_kind:
            return 1e3 * tflops
    return None


def mfu_target(family: str, size: str, seq_len: int, accelerator: bool) -> float | None:
    """The issue's MFU target for this row, on accelerators only."""
    if not accelerator or (size, seq_len) != TARGET_SIZE:
        return None
    return MFU_TARGETS.get(family)


def machine_reference(cpu_family_model, backend: str) -> dict | None:
    """The PyTorch-reference entry measured on this CPU model (`bench.REFERENCES`), else None:
    its ratios mean nothing on another CPU model or platform."""
    return bench.reference_for(cpu_family_model) if backend == "cpu" else None


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def interleave(fns: list, passes: int, repeats: int, names=None, log=None) -> list[list[float]]:
    """Seconds of each (blocking) callable, `repeats` per pass, passes alternating the order."""
    times = [[] for _ in fns]
    for p in range(passes):
        order = list(range(len(fns)))[:: 1 if p % 2 == 0 else -1]
        for i in order:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - t0)
            if log is not None:
                log(f"pass {p + 1} {names[i]}: {times[i][-1]:.3f} s")
    return times


def peak(settings: dict, repeats: int) -> dict:
    return bench.measure_peak(settings["peak_n"], repeats, settings["dtype"],
                              with_numpy=not settings["accelerator"])


def run_train_group(group: dict, settings: dict, *, steps: int, passes: int, warmup: int,
                    peak_gflops_fn, log, families=bench.FAMILIES) -> list[dict]:
    """Every family (of `families`) × backend of `group`, interleaved; summaries with the
    group's settings."""
    rows, cases = [], []
    with tempfile.TemporaryDirectory(prefix="dlm_perf_") as tmp:
        twins = group.get("reference_twins") or {"families": (), "dropout": 0.0}
        specs = [(fam, backend, 0.0) for fam in families for backend in group["backends"]]
        specs += [(fam, "xla", twins["dropout"]) for fam in twins["families"] if fam in families]
        for fam, backend, dropout in specs:
            cfg = bench.make_config(fam, size=group["size"], seq_len=group["seq_len"],
                                    batch=group["batch"], dtype=settings["dtype"],
                                    attention=backend, dropout=dropout)
            name = (f"{fam}-{group['size']}-L{group['seq_len']}-{backend}"
                    + (f"-dropout{dropout:g}" if dropout else ""))
            case = bench.Case(name, fam, cfg, os.path.join(tmp, name))
            case.compile()
            case.backend = backend
            log(f"{name}: first step {case.first_step_s:.1f} s")
            cases.append(case)
        for p in range(passes):
            for case in (cases if p % 2 == 0 else cases[::-1]):
                ts = case.run_pass(steps, warmup)
                log(f"pass {p + 1} {case.name}: median {np.median(ts):.3f} s/step")
        peak_gflops = peak_gflops_fn()
        for case in cases:
            s = case.summary(peak_gflops * 1e9)
            s.update(name=case.name, size=group["size"], seq_len=group["seq_len"],
                     batch=group["batch"], attention=case.backend,
                     mfu_target=mfu_target(case.family, group["size"], group["seq_len"],
                                           settings["accelerator"]))
            rows.append(s)
            case.trainer.close()
    return rows


def run_sampling(settings: dict, *, length: int, batch: int, passes: int, repeats: int,
                 quick: bool, log) -> list[dict]:
    import sample_bench
    cases = []
    for spec in sampling_specs(length, quick):
        spec = dict(spec)
        fam, sampler, cached = spec.pop("family"), spec.pop("sampler"), spec.pop("cached")
        c = sample_bench._case(fam, length, batch, sampler=sampler, cached=cached,
                               dtype=settings["dtype"], **spec)
        log(f"sampling {fam} {sampler} cached={cached}: compiled in {c['compile_s']:.1f} s")
        cases.append(c)
    nfe = {}

    def runner(i, c):
        def go():
            nfe[i] = int(c["fn"]()["nfe"])
        return go
    names = [f"sampling {c['family']} {c['sampler']} cached={c['cached']}" for c in cases]
    times = interleave([runner(i, c) for i, c in enumerate(cases)], passes, repeats, names, log)
    rows = []
    for i, (c, ts) in enumerate(zip(cases, times)):
        med = float(np.median(ts))
        rows.append({k: v for k, v in c.items() if k not in ("fn", "times")}
                    | {"nfe": nfe[i], "seconds": med, "seconds_all": ts,
                       "tokens_per_s": c["batch"] * c["length"] / med})
    return rows


def masked_cudnn_attention(q, k, v, pattern, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` given `pattern` as a dense (1, 1, Lq, Lk) bool mask, which
    jax hands to cuDNN as a bias. Measured beside the `cudnn` backend (`cudnn_mask` in the
    attention table): what block-causal and two-pass attention, which have no cuDNN mask type
    and fall back to flash there, would get from the fused kernel without tile skipping.
    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh) → (B, Lq, H, Dh); `implementation="xla"` on CPU
    (tests)."""
    import math

    import jax
    mask = pattern.dense(q.shape[1], k.shape[1])
    o = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                     mask=mask[None, None], scale=1.0 / math.sqrt(q.shape[-1]),
                                     implementation=implementation)
    return o.astype(q.dtype)


def attention_case(kind: str, L: int, backend: str, dtype: str):
    """A blocking fwd+bwd of `attend` for pattern `kind` over a stream of L tokens (2L keys for
    two-pass), or the reason it cannot run here."""
    import jax
    import jax.numpy as jnp

    from dlm_jax.models.attention import MaskPattern, attend
    sh = ATTN_SHAPE
    pattern = MaskPattern(kind, sh["block"] if kind in ("block_causal", "two_pass") else 0)
    n = 2 * L if kind == "two_pass" else L
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (sh["batch"], n, sh["heads"], sh["head_dim"]), dtype)
               for kk in keys)

    def loss(q, k, v):
        if backend == "cudnn_mask":
            return masked_cudnn_attention(q, k, v, pattern).astype(jnp.float32).sum()
        return attend(q, k, v, pattern, backend=backend).astype(jnp.float32).sum()
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        compile_s = time.perf_counter() - t0
    except Exception as e:  # a backend this platform or jax build lacks: reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return (lambda: jax.block_until_ready(fn(q, k, v))), compile_s


def run_attention(settings: dict, *, lengths, passes: int, repeats: int, log) -> list[dict]:
    """One row per (pattern, L, backend); the cases of one length interleaved."""
    rows = []
    for L in lengths:
        fns, meta = [], []
        for kind in PATTERNS:
            for backend in settings["attention_backends"]:
                fn, info = attention_case(kind, L, backend, settings["dtype"])
                if fn is None:
                    rows.append({"pattern": kind, "seq_len": L, "backend": backend,
                                 "error": info})
                    log(f"attention {kind} L={L} {backend}: unavailable ({info})")
                    continue
                fns.append(fn)
                meta.append({"pattern": kind, "seq_len": L, "backend": backend,
                             "compile_s": info})
        for m, ts in zip(meta, interleave(fns, passes, repeats)):
            m.update(seconds=float(np.median(ts)), seconds_all=ts)
            log(f"attention {m['pattern']} L={L} {m['backend']}: {1e3 * m['seconds']:.1f} ms")
            rows.append(m)
    return rows


def flash_tiles_at(length: int = 4096) -> list[int]:
    """The flash backend's default (tq, tk) for a long sequence."""
    from dlm_jax.models.flash import default_blocks
    return list(default_blocks(length, length))


def measure(args) -> dict:
    import jax
    backend = jax.default_backend()
    settings = platform_settings(backend)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    machine = bench.machine_info()
    reference = machine_reference(machine["cpu_family_model"], backend)
    device_kind = jax.devices()[0].device_kind
    result = {"kind": "perf_table", "quick": args.quick, "machine": machine,
              "settings": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in settings.items()},
              "flash_tiles": flash_tiles_at(), "peaks": [],
              "reference": reference, "comparable_to_reference": reference is not None,
              "device_kind": device_kind,
              "datasheet_peak_gflops": datasheet_peak_gflops(device_kind)
              if settings["accelerator"] else None}
    t_start = time.perf_counter()

    def new_peak() -> float:
        result["peaks"].append(peak(settings, args.peak_repeats))
        log(f"peak: {result['peaks'][-1]['jax_gflops']:.1f} GFLOP/s")
        return float(np.median([pk["jax_gflops"] for pk in result["peaks"]]))

    new_peak()
    # Quick: the compiling step is the only warm-up.
    steps, passes, warmup = (2, 2, 0) if args.quick else (args.steps, args.passes, 1)
    parts = args.parts or PARTS
    groups = train_groups(args.quick, args.small_batch or settings["small_batch"], reference,
                          kernels=model_kernels(settings))
    result["train"] = []
    for group in groups if "train" in parts else ():
        if args.groups and group["name"] not in args.groups:
            continue
        result["train"] += run_train_group(group, settings,
                                           steps=steps if settings["accelerator"] else
                                           min(steps, group.get("max_steps", steps)),
                                           passes=passes, warmup=warmup,
                                           peak_gflops_fn=new_peak, log=log,
                                           families=args.families or bench.FAMILIES)
    # Whole-sequence samplers cost L network calls over L tokens: a small L keeps them short.
    result["sampling"] = run_sampling(
        settings, length=64 if args.quick else 128, batch=8, passes=2, repeats=1,
        quick=args.quick, log=log) if "sampling" in parts else []
    lengths = (256,) if args.quick else (256, 1024, 4096)
    result["attention"] = run_attention(
        settings, lengths=args.attention_lengths or lengths, passes=2, repeats=2,
        log=log) if "attention" in parts else []
    final = new_peak()
    # Every MFU against the same peak: the median over the whole run.
    for row in result["train"]:
        row["mfu"] = row["achieved_gflops"] / final
        if result["datasheet_peak_gflops"]:
            row["mfu_datasheet"] = row["achieved_gflops"] / result["datasheet_peak_gflops"]
        ref_row = bench.reference_row(reference, row["family"], row["seq_len"], row["batch"])
        if reference and ref_row and ref_row["reference_family"] == row["family"] \
                and row["size"] == "bench" and row["dropout"] == reference["dropout"]:
            row.update(bench._ratios(row, reference, ref_row, final))
    result["peak_gflops"] = final
    result["wall_s"] = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------------------
# The table (pure functions of the result dict)
# ---------------------------------------------------------------------------------------------

def machine_line(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    fm = m.get("cpu_family_model") or ("?", "?")
    mode = "`--quick`" if result["quick"] else "full run"
    return (f"Machine: {m.get('cpu', '?')} (cpu family {fm[0]} model {fm[1]}, "
            f"{m.get('cpu_count', '?')} cores), jax {m.get('jax', '?')} on {s['backend']} "
            f"({', '.join(m.get('devices', [])[:1])}), {s['dtype']}; {m.get('date', '')}, "
            f"{mode}, {result.get('wall_s', 0) / 60:.0f} min; host malloc "
            f"{MALLOC_WORDS[m.get('host_malloc', 'system')]}.")


# How the C library's malloc was set (`dlm_jax.hostmem`); results from before the setting
# existed have no such key: they ran with the C library's defaults.
MALLOC_WORDS = {"retained": "reusing freed memory (`dlm_jax.hostmem`)",
                "system": "the C library's defaults"}


def peak_line(result: dict) -> str:
    pk = [p["jax_gflops"] for p in result["peaks"]]
    n, dt = result["settings"]["peak_n"], result["settings"]["dtype"]
    load = [p["loadavg"][0] for p in result["peaks"] if p.get("loadavg")]
    shared = (f"; 1-min load average {load[0]:.1f} at the start, {load[-1]:.1f} at the end "
              f"(other jobs share the machine: compare figures within this table only)"
              if load else "")
    ds = result.get("datasheet_peak_gflops")
    datasheet = (f"; \"MFU (datasheet peak)\" divides by the {result.get('device_kind')}'s "
                 f"datasheet {ds / 1e3:.1f} TFLOP/s, and the target is judged on it" if ds else "")
    return (f"Matmul peak (jax, {n}² {dt}): {pk[0]:.1f} GFLOP/s at the start, {pk[-1]:.1f} at "
            f"the end (median of {len(pk)} measurements {result['peak_gflops']:.1f}, "
            f"range {min(pk):.1f}–{max(pk):.1f}): every MFU below divides by the median"
            f"{shared}{datasheet}.")


def reference_line(result: dict) -> str:
    ref = result.get("reference")
    fm = result["machine"].get("cpu_family_model") or ("?", "?")
    if ref:
        return (f"PyTorch reference ({ref['source']}): this is its CPU model, so the "
                f"bench-size rows it has figures for are run a second time at its dropout "
                f"{ref['dropout']:g}, interleaved with the rest, and show its tokens/s and our "
                f"ratio (raw, and normalised by each side's matmul peak: theirs "
                f"{ref['peak_matmul_gflops']:g} GFLOP/s).")
    measured = "; ".join(f"{r['cpu']} (cpu family {r['cpu_family_model'][0]} model "
                         f"{r['cpu_family_model'][1]})" for r in bench.REFERENCES)
    return (f"PyTorch reference: measured on {measured}; there are no reference figures for "
            f"this CPU (family {fm[0]} model {fm[1]}) or platform, so none are shown.")


def flash_line(result: dict) -> str:
    tiles = result.get("flash_tiles")
    size = f", {tiles[0]} × {tiles[1]} tiles at L 4096" if tiles else ""
    return (f"`xla` attention is the flash backend (`models.flash`{size}); its FLOPs count "
            "the (query tile, key tile) pairs of its schedule, whole tiles, and the two-pass "
            "noisy block diagonal it computes densely.")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def train_table(rows: list[dict], *, accelerator: bool, comparable: bool,
                datasheet: bool = False) -> str:
    """The training rows; on accelerators with `datasheet` MFU, the target is judged on it
    (the stricter, conventional figure), else on MFU against the measured peak."""
    head = ["family", "size", "L", "batch", "attention"] + (["dropout"] if comparable else []) \
        + ["params", "s/step median (min–max)", "tok/s", "GFLOP/step", "MFU"]
    if datasheet:
        head.append("MFU (datasheet peak)")
    if accelerator:
        head.append("MFU target")
    if comparable:
        head += ["reference tok/s", "ours/ref", "ours/ref (peak-norm.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        st = r["step_s"]
        cells = [r["family"], r["size"], str(r["seq_len"]), str(r["batch"]), r["attention"]] \
            + ([f"{r.get('dropout', 0.0):g}"] if comparable else []) \
            + [f"{r['num_params'] / 1e6:.2f}M",
                 f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})",
                 f"{r['tokens_per_s']:.0f}", f"{r['gflop_per_step']:.1f}", _pct(r["mfu"])]
        if datasheet:
            cells.append(_pct(r.get("mfu_datasheet")))
        if accelerator:
            t = r.get("mfu_target")
            mfu = r.get("mfu_datasheet", r["mfu"]) if datasheet else r["mfu"]
            cells.append("–" if t is None else
                         f"≥ {100 * t:.0f}% ({'met' if mfu >= t else 'not met'})")
        if comparable:
            ref = r.get("reference_tokens_per_s")
            cells += ([f"{ref:.0f}", f"{r['ratio_tokens_per_s']:.2f}",
                       f"{r['ratio_peak_normalised']:.2f}"] if ref else ["–"] * 3)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backend_speedups(rows: list[dict]) -> list[dict]:
    """Per (family, size, L, batch) measured with several backends: the step-time ratio of each
    to the base, `dense` where it was measured, else `xla` (the small size's kernel rows)."""
    by_key = {}
    for r in rows:
        if r.get("dropout", 0.0):   # the reference's dropout twins have no backend twin
            continue
        by_key.setdefault((r["family"], r["size"], r["seq_len"], r["batch"]), {})[
            r["attention"]] = r["step_s"]["median"]
    out = []
    for (fam, size, L, B), t in by_key.items():
        base = "dense" if "dense" in t else "xla"
        for b, s in t.items():
            if b != base and base in t:
                out.append({"family": fam, "size": size, "seq_len": L, "batch": B, "backend": b,
                            "base": base, "base_s": t[base], "backend_s": s,
                            "speedup": t[base] / s})
    return out


def speedup_table(speedups: list[dict]) -> str:
    if not speedups:
        return ""
    lines = ["| family | size | L | batch | backend | against | s/step against | s/step backend "
             "| speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for s in speedups:
        lines.append(f"| {s['family']} | {s['size']} | {s['seq_len']} | {s['batch']} | "
                     f"{s['backend']} | {s.get('base', 'dense')} | {s['base_s']:.3f} | "
                     f"{s['backend_s']:.3f} | {s['speedup']:.2f}× |")
    return "\n".join(lines)


def kv_speedups(rows: list[dict]) -> list[dict]:
    """Cached over uncached seconds for each (family, sampler, L, batch) measured both ways."""
    pairs = {}
    for r in rows:
        pairs.setdefault((r["family"], r["sampler"], r["length"], r["batch"]), {})[
            r["cached"]] = r["seconds"]
    return [{"family": f, "sampler": s, "length": L, "batch": B, "cached_s": t[True],
             "uncached_s": t[False], "speedup": t[False] / t[True]}
            for (f, s, L, B), t in pairs.items() if True in t and False in t]


def sampling_table(rows: list[dict]) -> str:
    # A KV cache only means something for the families measured with an uncached twin.
    with_cache = {r["family"] for r in rows if not r["cached"]}
    lines = ["| family | sampler | L | batch | KV cache | steps | NFE | s | tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cache = ("yes" if r["cached"] else "no") if r["family"] in with_cache else "–"
        lines.append(f"| {r['family']} | {r['sampler']} | {r['length']} | {r['batch']} | "
                     f"{cache} | {r['steps'] or '–'} | {r['nfe']} | "
                     f"{r['seconds']:.3f} | {r['tokens_per_s']:.0f} |")
    kv = kv_speedups(rows)
    if kv:
        lines.append("")
        lines.append("KV-cache speed-up (uncached twin's seconds / cached): " + "; ".join(
            f"{k['family']} {k['sampler']} L {k['length']}: {k['speedup']:.2f}×" for k in kv)
            + ".")
    return "\n".join(lines)


def attention_table(rows: list[dict], backends) -> str:
    """ms of fwd+bwd per (pattern, L) and backend, with the speed-up over dense."""
    cells = {(r["pattern"], r["seq_len"], r["backend"]): r for r in rows}
    keys = sorted({(r["pattern"], r["seq_len"]) for r in rows},
                  key=lambda k: (PATTERNS.index(k[0]), k[1]))
    others = [b for b in backends if b != "dense"]
    head = ["pattern", "L", "dense ms"] + [f"{b} ms (speed-up)" for b in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, L in keys:
        dense = cells.get((kind, L, "dense"), {}).get("seconds")
        row = [kind if kind != "two_pass" else "two_pass (2L keys)", str(L),
               "–" if dense is None else f"{1e3 * dense:.1f}"]
        for b in others:
            c = cells.get((kind, L, b), {})
            if "seconds" not in c:
                row.append("n/a")
            else:
                sp = f" ({dense / c['seconds']:.2f}×)" if dense else ""
                row.append(f"{1e3 * c['seconds']:.1f}{sp}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(result: dict) -> str:
    """The markdown written between the README markers."""
    s = result["settings"]
    sh = ATTN_SHAPE
    speed = speedup_table(backend_speedups(result["train"]))
    parts = [machine_line(result), "", peak_line(result), "", reference_line(result), "",
             flash_line(result)]
    if result["train"]:
        parts += ["", "**Training** (random token batches into the jitted train step, AdamW, "
                  "dropout 0" + (" unless its column says otherwise"
                                 if result["comparable_to_reference"] else "")
                  + "; the families of one size and L interleaved; MFU = tokens/s × "
                  "`Experiment.flops_per_token()` / the peak):", "",
                  train_table(result["train"], accelerator=s["accelerator"],
                              comparable=result["comparable_to_reference"],
                              datasheet=bool(result.get("datasheet_peak_gflops")))]
    if speed:
        parts += ["", "**Train step, one `model.attention` against another** (`dense`, else "
                  "`xla`; same process, same interleaved passes):", "", speed]
    if result["sampling"]:
        parts += ["", "**Sampling** (bench size, random parameters, every step calls the "
                  "network; D3PM with T = L steps):", "", sampling_table(result["sampling"])]
    if result["attention"]:
        parts += ["", f"**Attention fwd+bwd** (`attention.attend`, B {sh['batch']}, "
                  f"H {sh['heads']}, Dh {sh['head_dim']}, blocks of {sh['block']}, "
                  f"{s['dtype']}; ms per call, speed-up over dense masked attention):", "",
                  attention_table(result["attention"], s["attention_backends"])]
        if "cudnn_mask" in s["attention_backends"]:
            parts += ["", "`cudnn_mask`: cuDNN fused attention given the pattern as a dense "
                      "mask (a bias; no tile skipped), not a `model.attention` backend: what "
                      "the patterns `cudnn` leaves to flash would get from the fused kernel."]
    missing = [r for r in result["attention"] if "error" in r]
    if missing:
        parts += ["", "Unavailable here: " + "; ".join(
            sorted({f"{r['backend']} ({r['error']})" for r in missing}))]
    return "\n".join(parts)


def replace_between_markers(text: str, body: str) -> str:
    """`text` with everything between the markers replaced by `body` (idempotent)."""
    pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {MARK_START} … {MARK_END} markers")
    return pattern.sub(lambda _: f"{MARK_START}\n{body.strip()}\n{MARK_END}", text, count=1)


def ensure_markers(text: str, section: str = "## Benchmarks") -> str:
    """`text` with the intro line and empty markers at the end of `section` (before the next
    heading of its level) unless the markers are already there."""
    if MARK_START in text:
        return text
    start = text.find(f"\n{section}\n")
    if start < 0:
        raise ValueError(f"no {section!r} section")
    nxt = text.find("\n## ", start + len(section) + 2)
    end = len(text) if nxt < 0 else nxt + 1
    block = f"{README_INTRO}\n\n{MARK_START}\n{MARK_END}\n\n"
    head = text[:end].rstrip("\n") + "\n\n"
    return head + block + text[end:]


def write_readme(path: str, body: str) -> None:
    with open(path) as f:
        text = f.read()
    new = replace_between_markers(ensure_markers(text), body)
    with open(path, "w") as f:
        f.write(new)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _names(allowed):
    """An argparse type: a comma list of names, each one of `allowed`."""
    def parse(value: str) -> tuple:
        names = tuple(v for v in value.split(",") if v)
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(value)}: choose from "
                                             f"{','.join(allowed)}")
        return names
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python benchmarks/perf_table.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L 256 only, few steps (minutes)")
    ap.add_argument("--out", default=None,
                    help="JSON result (default benchmarks/results_perf_<backend>[_quick].json)")
    ap.add_argument("--readme", default="README.md", help="file to write the table into "
                    "('' to skip)")
    ap.add_argument("--steps", type=int, default=4, help="timed train steps per pass (full)")
    ap.add_argument("--passes", type=int, default=2, help="interleaved passes (full)")
    ap.add_argument("--small_batch", type=int, default=0,
                    help="batch of the small-size rows (0: 1 on CPU, 16 on accelerators)")
    ap.add_argument("--peak_repeats", type=int, default=5)
    ap.add_argument("--from_json", default=None,
                    help="render a saved result instead of measuring")
    ap.add_argument("--parts", type=_names(PARTS), default=None,
                    help=f"comma list of what to measure (default all: {','.join(PARTS)})")
    ap.add_argument("--groups", type=_names(group_names()), default=None,
                    help=f"comma list of training groups (default all: "
                         f"{','.join(group_names())})")
    ap.add_argument("--families", type=_names(bench.FAMILIES), default=None,
                    help=f"comma list of families to train (default all: "
                         f"{','.join(bench.FAMILIES)})")
    ap.add_argument("--attention_lengths", type=lambda v: tuple(int(x) for x in v.split(",")),
                    default=None, help="comma list of L for the attention rows "
                                       "(default 256,1024,4096; --quick 256)")
    args = ap.parse_args(argv)
    if args.quick and set(args.groups or ()) - set(group_names(quick=True)):
        ap.error(f"--groups: --quick trains {','.join(group_names(quick=True))} only")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = measure(args)
        out = args.out or os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            f"results_perf_{result['settings']['backend']}{'_quick' if args.quick else ''}.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    table = render(result)
    if args.readme:
        write_readme(args.readme, table)
    print(table, flush=True)
    return result


if __name__ == "__main__":
    main()
