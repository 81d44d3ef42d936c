"""Training-throughput benchmark: tokens/s and MFU per family, side by side in one process.

    python benchmarks/bench.py train [--size bench|tiny] [--families ar,mdlm,bd3lm,sedd,d3pm]
                                  [--steps N] [--passes P] [--out FILE.json]
                                  [--seq_len 256 --batch 8 --block 16] [--extra dropout,clip_ema,remat]
    python benchmarks/bench.py profile [--families mdlm,bd3lm] [--steps N] [--ops] [--out FILE.json]

`train` measures, in ONE process (the machine's speed drifts, so everything that is compared is
measured side by side):
  1. the peak: a 2048² float32 matmul through jax (and numpy, for reference), before every pass
     and once at the end;
  2. per family: the first step (trace + compile + one step), then per pass one untimed warm-up
     step and `--steps` timed steps (each followed by `block_until_ready` on the new state);
     passes interleave the families, so drift hits all of them alike.
Figures: median step time (min–max over all timed steps), tokens/s = batch·L / step time,
achieved FLOP/s = tokens/s · `Experiment.flops_per_token()` (the method's count: 6·N for the
matmuls, N the weights a token's row is multiplied by, `registry.matmul_params`; 12·N − 6·N_q
for the BD3-LM two-pass input, whose output layer and last-block query side see the noisy rows
only; plus the attention actually computed, block-sparse for two-pass), MFU = achieved / the
median jax matmul peak of this run.

Setup (the "bench" size at which the PyTorch reference was measured): DiT width 256,
depth 4, 4 heads, cond 128; the byte tokenizer's 258 ids (+ the mask state for absorbing
processes), L 256, batch 8, float32, AdamW (β 0.9/0.999, eps 1e-8, no weight decay), no gradient
clipping and no EMA (the reference's "core" rows; `--extra clip_ema` adds rows with both),
dropout 0 (`--extra dropout` adds rows at the presets' 0.1; the reference ran with 0.1). Random
token batches go straight to `Trainer.train_step`: no data loading in the timed region.
Family settings come from `CASES` (a table, so no code here branches on a family name).
BD3-LM uses block 16 (two-pass [x_t ⊕ x_0] forward); D3PM T = 1000 (absorbing, jsd schedule);
SEDD absorbing with the log-linear schedule.

`profile` splits one step into jitted pieces for each family (model forward, loss forward,
loss value-and-grad, the AdamW update, attention alone at the step's shapes, the whole step) and
times them interleaved, so the share of each is visible. `--ops` then traces `--steps` train
steps under the jax profiler and sums each XLA op's exclusive time by kind (matmul, elementwise
fusion, copy / transpose, loop control, other; `op_category`, `exclusive_op_times`).

The JSON output holds the machine, versions, the peaks, every timed step, the summaries, the
reference figures and our/reference ratios (raw and normalised by each side's matmul peak).
"""
from __future__ import annotations

if __name__ == "__main__":  # glibc's malloc set to reuse freed memory, before jax starts
    from dlm_jax.hostmem import retain_freed_memory  # (as `python -m dlm_jax.train` does)
    retain_freed_memory()

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

from dlm_jax.hostmem import malloc_mode

# family: (registry family, takes the block size, extra config fields)
CASES = {
    "ar": ("ar", False, ()),
    "mdlm": ("mdlm", False, ()),
    "bd3lm": ("bd3lm", True, ()),
    "sedd": ("sedd", False, ()),
    "d3pm": ("d3pm", False, (("diffusion.d3pm_steps", 1000), ("diffusion.d3pm_schedule", "jsd"),
                             ("diffusion.hybrid_lambda", 0.01))),
}
FAMILIES = tuple(CASES)

# The PyTorch reference (kuleshov-group/bd3lms @ 1c3e8f4, torch CPU, 2 threads) at the bench size
# (width 256, depth 4, 4 heads, byte vocabulary + mask, AdamW, dropout 0.1, no clip/EMA, BD3-LM
# block 16), one entry per CPU model it was measured on. Its speed differs about 2× between CPU
# models, so a ratio means something only against the entry for the CPU this benchmark runs on
# (`reference_for`). Rows: tok/s median (min, max where pooled), s/step and, where recorded, the
# reference's own GFLOP/step count (matmuls + dense attention).
REFERENCES = (
    {"source": "kuleshov-group/bd3lms @ 1c3e8f4 (torch 2.13), 3 pooled passes on the project's "
               "Zen 3 VM, 2026-11-22",
     "cpu": "AMD EPYC (Zen 3), 2 vCPUs", "cpu_family_model": ("25", "1"),
     "peak_matmul_gflops": 113.5,   # 2048² f32 torch.mm, pooled median at the start of each pass
     "dropout": 0.1,
     "rows": [
         {"family": "mdlm", "seq_len": 256, "batch": 8, "tokens_per_s": 3038.0, "min": 2107.0,
          "max": 3983.0, "step_s": 0.6741, "gflop_per_step": 46.0},
         {"family": "bd3lm", "seq_len": 256, "batch": 8, "tokens_per_s": 1304.0, "min": 910.0,
          "max": 1651.0, "step_s": 1.5705, "gflop_per_step": 104.7},
         {"family": "ar", "seq_len": 256, "batch": 8, "tokens_per_s": 2763.0, "min": 2172.0,
          "max": 3721.0, "step_s": 0.7413, "gflop_per_step": 45.9}],
     # BD3-LM generation of 256 tokens, block 16 (tok/s = batch · 256 / seconds per run);
     # "steps" per block as the generator reports it (first-hitting: one token per call, 16)
     "sampling": [
         {"family": "bd3lm", "sampler": "ancestral", "steps": 16, "length": 256, "batch": 8,
          "cached": True, "tokens_per_s": 160.2, "seconds": 12.79},
         {"family": "bd3lm", "sampler": "ancestral", "steps": 16, "length": 256, "batch": 8,
          "cached": False, "tokens_per_s": 53.5, "seconds": 38.27},
         {"family": "bd3lm", "sampler": "first_hitting", "steps": 16, "length": 256, "batch": 1,
          "cached": True, "tokens_per_s": 60.5, "seconds": 4.23}]},
    {"source": "kuleshov-group/bd3lms @ 1c3e8f4 (torch 2.13), interleaved with dlm_jax over 3 "
               "rounds on the project's Zen 5 VM, 2026-12-01",
     "cpu": "AMD EPYC (Zen 5), 2 vCPUs", "cpu_family_model": ("26", "2"),
     "peak_matmul_gflops": 210.0,   # 2048² f32 torch.mm in the same process before each case
     "dropout": 0.1,
     "rows": [
         {"family": "mdlm", "seq_len": 256, "batch": 8, "tokens_per_s": 6472.0, "step_s": 0.316},
         {"family": "bd3lm", "seq_len": 256, "batch": 8, "tokens_per_s": 2833.0, "step_s": 0.723},
         {"family": "ar", "seq_len": 256, "batch": 8, "tokens_per_s": 6599.0, "step_s": 0.310},
         {"family": "sedd", "seq_len": 256, "batch": 8, "tokens_per_s": 6402.0, "step_s": 0.320},
         {"family": "mdlm", "seq_len": 1024, "batch": 2, "tokens_per_s": 4679.0, "step_s": 0.438},
         {"family": "ar", "seq_len": 1024, "batch": 2, "tokens_per_s": 5273.0, "step_s": 0.388},
         {"family": "bd3lm", "seq_len": 1024, "batch": 2, "tokens_per_s": 1680.0,
          "step_s": 1.219}],
     "sampling": [
         {"family": "bd3lm", "sampler": "ancestral", "steps": 16, "length": 256, "batch": 8,
          "cached": True, "tokens_per_s": 450.0, "seconds": 4.55},
         {"family": "bd3lm", "sampler": "ancestral", "steps": 16, "length": 256, "batch": 8,
          "cached": False, "tokens_per_s": 157.0, "seconds": 13.1},
         {"family": "bd3lm", "sampler": "first_hitting", "steps": 16, "length": 256, "batch": 1,
          "cached": True, "tokens_per_s": 235.0, "seconds": 1.09}]},
)
# A family without its own row is compared with this one's (the same DiT over L tokens).
REFERENCE_PROXY = {"sedd": "mdlm", "d3pm": "mdlm"}
REFERENCE_BLOCK = 16   # BD3-LM's block size in every reference row


def reference_for(cpu_family_model) -> dict | None:
    """The reference entry measured on this CPU model ((family, model) strings), else None."""
    fm = tuple(cpu_family_model) if cpu_family_model else None
    return next((r for r in REFERENCES if tuple(r["cpu_family_model"]) == fm), None)


def reference_row(ref: dict | None, family: str, seq_len: int, batch: int) -> dict | None:
    """`ref`'s row for `family` at (seq_len, batch) — its own, else its proxy's — with
    "reference_family" naming whose it is; None where the reference has neither."""
    for fam in (family, REFERENCE_PROXY.get(family)):
        for row in (ref or {}).get("rows", ()):
            if (row["family"], row["seq_len"], row["batch"]) == (fam, seq_len, batch):
                return dict(row, reference_family=fam)
    return None


SIZES = {
    # size: (model preset, default L, default batch, default block)
    "bench": ("bench", 256, 8, 16),
    "tiny": ("tiny", 32, 8, 4),
    "small": ("small", 1024, 2, 16),   # the papers' small model (perf_table.py)
}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def byte_vocab() -> int:
    """Real token ids of the byte tokenizer (256 bytes + BOS + EOS = 258)."""
    from dlm_jax.data.tokenizers import make_tokenizer
    return make_tokenizer("byte", "").vocab_size


def make_config(family: str, *, size: str = "bench", seq_len: int | None = None,
                batch: int | None = None, block: int | None = None, dropout: float = 0.0,
                clip_ema: bool = False, remat: str = "none", vocab: int | None = None,
                dtype: str = "float32", attention: str | None = None):
    """The benchmark Config for one family (synthetic Markov source, no data is read);
    `attention` None keeps the config's default backend."""
    from dlm_jax.config import Config, validate
    from dlm_jax.registry import apply_family, set_fields
    preset, L0, B0, blk0 = SIZES[size]
    L = seq_len or L0
    name, blocks, fields = CASES[family]
    cfg = Config(name=f"bench-{family}")
    apply_family(cfg, name, block=(block or blk0) if blocks else 0)
    set_fields(cfg, fields)
    cfg.data.source = "markov"
    cfg.data.markov_vocab = vocab or byte_vocab()
    cfg.data.seq_len = L
    cfg.model.size = preset
    cfg.model.dropout = dropout
    cfg.model.remat = remat
    cfg.model.compute_dtype = dtype
    if attention is not None:
        cfg.model.attention = attention
    cfg.diffusion.process = "absorbing"
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-4, 0
    cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, cfg.optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
    cfg.optim.grad_clip = 1.0 if clip_ema else 0.0
    cfg.optim.ema_decay = 0.9999 if clip_ema else 0.0
    cfg.train.batch_size = batch or B0
    cfg.train.steps = 1_000_000
    cfg.train.async_checkpoint = False
    cfg.mesh.shape = (-1, 1, 1)
    return validate(cfg)


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------

def _stats(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs)}


# OpenBLAS (numpy's BLAS) keeps its threads spinning for ~0.1 s after a call. A jax matmul timed
# in that window shares the cores with them and ran ~30% slow here (150 against 208 GFLOP/s),
# which inflated every MFU: numpy is timed after jax, then left to go idle.
BLAS_SETTLE_S = 0.3


def measure_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32",
                 with_numpy: bool = True) -> dict:
    """GFLOP/s of an n×n matmul through jax (jit, one device, in `dtype`) and numpy (float32;
    `with_numpy` False skips it, e.g. beside an accelerator, where it is only host time).
    jax's repeats all run before numpy's (see BLAS_SETTLE_S)."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile
    jt = _timed(f, (a, b), repeats)
    nt = [float("nan")]
    if with_numpy:
        np.matmul(a_np, b_np)
        nt = _timed(np.matmul, (a_np, b_np), repeats)
        time.sleep(BLAS_SETTLE_S)
    flop = 2.0 * n ** 3
    return {"n": n, "jax_gflops": flop / np.median(jt) / 1e9,
            "jax_gflops_best": flop / min(jt) / 1e9,
            "numpy_gflops": flop / np.median(nt) / 1e9,
            "numpy_gflops_best": flop / min(nt) / 1e9,
            "dtype": dtype, "jax_s": [float(t) for t in jt],
            "numpy_s": [float(t) for t in nt] if with_numpy else [],
            "loadavg": list(os.getloadavg())}


def _cpu_family_model() -> tuple[str, str] | None:
    """(cpu family, model) from /proc/cpuinfo, e.g. ("25", "1") for AMD Zen 3."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines()
                          if ":" in ln)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("cpu family"), fields.get("model")


def machine_info() -> dict:
    import jax
    import jaxlib
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_family_model": _cpu_family_model(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "host_malloc": malloc_mode(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for mod in ("flax", "optax", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - informational only
            pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


# ---------------------------------------------------------------------------------------------
# One benchmark case: a Trainer, its state and a fixed random batch
# ---------------------------------------------------------------------------------------------

class Case:
    """A family (+ variant) with its Trainer, live state and a random token batch."""

    def __init__(self, name: str, family: str, cfg, workdir: str, seed: int = 0):
        import jax
        from dlm_jax.trainer import Trainer
        self.name, self.family, self.cfg = name, family, cfg
        self.trainer = Trainer(cfg, workdir, measure_mfu=False)
        self.state = self.trainer.init_state()
        jax.block_until_ready(self.state)
        B, L = cfg.train.batch_size, cfg.data.seq_len
        self.tokens_per_step = B * L
        rng = np.random.default_rng(seed)
        self.batch = {"tokens": rng.integers(0, self.trainer.exp.token_vocab, (B, L),
                                             dtype=np.int32)}
        self.first_step_s = None
        self.times: list[list[float]] = []
        self.losses: list[float] = []

    def step(self) -> float:
        import jax
        t0 = time.perf_counter()
        self.state, metrics = self.trainer.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        self._metrics = metrics
        return dt

    def compile(self) -> float:
        self.first_step_s = self.step()
        return self.first_step_s

    def run_pass(self, steps: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            self.step()
        ts = [self.step() for _ in range(steps)]
        self.times.append(ts)
        self.losses.append(float(self._metrics["loss"]))
        return ts

    def summary(self, peak_flops: float) -> dict:
        all_t = [t for p in self.times for t in p]
        st = _stats(all_t)
        exp = self.trainer.exp
        fpt = exp.flops_per_token()
        tok = self.tokens_per_step / st["median"]
        achieved = tok * fpt
        return {
            "family": self.family,
            "num_params": int(exp.num_params),
            "model_vocab": int(exp.method.model_vocab(exp.token_vocab)),
            "dropout": self.cfg.model.dropout,
            "clip_ema": self.cfg.optim.grad_clip > 0,
            "block_size": self.cfg.diffusion.block_size,
            "first_step_s": self.first_step_s,
            "compile_s": max(self.first_step_s - st["median"], 0.0),
            "step_s": st,
            "step_s_per_pass": [float(np.median(p)) for p in self.times],
            "step_s_all": all_t,
            "tokens_per_s": tok,
            "tokens_per_s_min": self.tokens_per_step / st["max"],
            "tokens_per_s_max": self.tokens_per_step / st["min"],
            "flops_per_token": fpt,
            "gflop_per_step": fpt * self.tokens_per_step / 1e9,
            "achieved_gflops": achieved / 1e9,
            "mfu": achieved / peak_flops,
            "final_loss": self.losses[-1] if self.losses else None,
        }


def reference_sampling_row(ref: dict | None, row: dict) -> dict | None:
    """`ref`'s generation row for a sampling case (family, sampler, steps per block, length,
    batch, KV cache: the keys of `sample_bench` rows), else None."""
    keys = ("family", "sampler", "steps", "length", "batch", "cached")
    return next((r for r in (ref or {}).get("sampling", ())
                 if all(r[k] == row.get(k) for k in keys)), None)


def comparable_reference(cpu_family_model, size: str, seq_len: int, batch: int, block: int,
                         families) -> dict | None:
    """The reference entry whose rows a run of `families` can be compared with: measured on this
    CPU model, at the bench size, BD3-LM's block and an (L, batch) it has rows for; else None."""
    ref = reference_for(cpu_family_model)
    if ref is None or size != "bench" or block != REFERENCE_BLOCK:
        return None
    return ref if any(reference_row(ref, f, seq_len, batch) for f in families) else None


def _ratios(summary: dict, ref: dict, row: dict, peak_gflops: float) -> dict:
    """Ours against the reference row `row` of entry `ref`: raw tokens/s and normalised by each
    side's matmul peak (ours measured in this run, theirs in the reference's)."""
    ours = summary["tokens_per_s"]
    out = {"reference_family": row["reference_family"],
           "reference_tokens_per_s": row["tokens_per_s"],
           "ratio_tokens_per_s": ours / row["tokens_per_s"],
           "ratio_peak_normalised": (ours / peak_gflops)
           / (row["tokens_per_s"] / ref["peak_matmul_gflops"])}
    if "gflop_per_step" in row:
        out["reference_mfu_own_count"] = (row["gflop_per_step"] * row["tokens_per_s"]
                                          / (row["seq_len"] * row["batch"])
                                          / ref["peak_matmul_gflops"])
    return out


# ---------------------------------------------------------------------------------------------
# `train`
# ---------------------------------------------------------------------------------------------

def _case_specs(families, extras) -> list[tuple[str, str, dict]]:
    specs = [(f, f, {}) for f in families]
    if "dropout" in extras:
        specs += [(f"{f}+dropout0.1", f, {"dropout": 0.1}) for f in families]
    if "clip_ema" in extras:
        specs += [(f"{f}+clip+ema", f, {"clip_ema": True}) for f in families]
    if "remat" in extras:
        specs += [(f"{f}+remat-{r}", f, {"remat": r}) for f in families for r in ("dots", "block")]
    return specs


def run_train(args) -> dict:
    import jax
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            raise SystemExit(f"unknown family {f!r}; choose from {','.join(FAMILIES)}")
    extras = [e for e in args.extra.split(",") if e]
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    _, L0, B0, blk0 = SIZES[args.size]
    seq_len, batch = args.seq_len or L0, args.batch or B0
    ref = comparable_reference(_cpu_family_model(), args.size, seq_len, batch,
                               args.block or blk0, families)
    comparable = ref is not None
    if comparable and "dropout" not in extras:
        extras.append("dropout")
        log(f"reference rows exist for {ref['cpu']}: adding rows at its dropout "
            f"{ref['dropout']} (--extra dropout)")
    result = {"kind": "train", "machine": machine_info(),
              "settings": {"size": args.size, "families": families, "extra": extras,
                           "steps_per_pass": args.steps, "passes": args.passes,
                           "warmup_per_pass": args.warmup, "seq_len": args.seq_len,
                           "batch": args.batch, "block": args.block, "peak_n": args.peak_n,
                           "float": "float32", "optimizer": "AdamW(3e-4, 0.9, 0.999, 1e-8, wd 0)"}}
    peaks = [measure_peak(args.peak_n, args.peak_repeats)]
    log(f"peak: jax {peaks[0]['jax_gflops']:.1f} GFLOP/s, numpy {peaks[0]['numpy_gflops']:.1f}")
    cases = []
    with tempfile.TemporaryDirectory(prefix="dlm_bench_") as tmp:
        for name, fam, kw in _case_specs(families, extras):
            cfg = make_config(fam, size=args.size, seq_len=args.seq_len, batch=args.batch,
                              block=args.block, **kw)
            case = Case(name, fam, cfg, os.path.join(tmp, name))
            case.compile()
            log(f"{name}: first step (trace+compile+run) {case.first_step_s:.1f} s")
            cases.append(case)
        for p in range(args.passes):
            order = cases if p % 2 == 0 else cases[::-1]
            for case in order:
                ts = case.run_pass(args.steps, args.warmup)
                log(f"pass {p + 1} {case.name}: median {np.median(ts):.3f} s/step")
            peaks.append(measure_peak(args.peak_n, args.peak_repeats))
            log(f"peak: jax {peaks[-1]['jax_gflops']:.1f} GFLOP/s")
        peak_gflops = float(np.median([pk["jax_gflops"] for pk in peaks]))
        result["peak"] = {
            "jax_gflops": peak_gflops,
            "jax_gflops_min": min(pk["jax_gflops"] for pk in peaks),
            "jax_gflops_max": max(pk["jax_gflops"] for pk in peaks),
            "numpy_gflops": float(np.median([pk["numpy_gflops"] for pk in peaks])),
            "measurements": peaks}
        result["cases"] = {}
        result["comparable_to_reference"] = comparable
        for case in cases:
            s = case.summary(peak_gflops * 1e9)
            row = reference_row(ref, case.family, seq_len, batch)
            if comparable and row and s["dropout"] == ref["dropout"] and not s["clip_ema"] \
                    and case.cfg.model.remat == "none":
                s.update(_ratios(s, ref, row, peak_gflops))
            result["cases"][case.name] = s
            case.trainer.close()
    result["reference"] = ref
    mdlm = result["cases"].get("mdlm")
    bd3 = result["cases"].get("bd3lm")
    if mdlm and bd3:
        result["bd3lm_over_mdlm_step_time"] = bd3["step_s"]["median"] / mdlm["step_s"]["median"]
        rows = [reference_row(ref, f, seq_len, batch) for f in ("bd3lm", "mdlm")]
        if all(r and r["reference_family"] == f for r, f in zip(rows, ("bd3lm", "mdlm"))):
            result["reference_bd3lm_over_mdlm_step_time"] = rows[0]["step_s"] / rows[1]["step_s"]
    result["table"] = markdown_table(result)
    return result


def markdown_table(result: dict) -> str:
    pk = result["peak"]
    lines = [f"peak 2048² f32 matmul: jax {pk['jax_gflops']:.1f} GFLOP/s (median; "
             f"{pk['jax_gflops_min']:.1f}–{pk['jax_gflops_max']:.1f}), numpy "
             f"{pk['numpy_gflops']:.1f}"
             + (f"; reference torch.mm {result['reference']['peak_matmul_gflops']} on "
                f"{result['reference']['cpu']}" if result.get("reference") else
                "; no reference figures for this CPU model"),
             "",
             "| case | params | s/step median (min–max) | tok/s median (min–max) | GFLOP/step | "
             "GFLOP/s | MFU | compile s | reference tok/s | ours/ref | ours/ref (peak-norm.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["cases"].items():
        st = s["step_s"]
        ref = s.get("reference_tokens_per_s")
        proxy = "" if s.get("reference_family") in (None, s["family"]) else \
            f" ({s['reference_family']})"
        lines.append(
            f"| {name} | {s['num_params'] / 1e6:.2f}M | {st['median']:.3f} "
            f"({st['min']:.3f}–{st['max']:.3f}) | {s['tokens_per_s']:.0f} "
            f"({s['tokens_per_s_min']:.0f}–{s['tokens_per_s_max']:.0f}) | "
            f"{s['gflop_per_step']:.1f} | {s['achieved_gflops']:.1f} | {100 * s['mfu']:.1f}% | "
            f"{s['compile_s']:.1f} | "
            + (f"{ref:.0f}{proxy} | {s['ratio_tokens_per_s']:.2f} | "
               f"{s['ratio_peak_normalised']:.2f} |" if ref else "– | – | – |"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `profile`: where a step's time goes
# ---------------------------------------------------------------------------------------------

def _timed(fn, args, n: int) -> list[float]:
    import jax
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def phase_functions(case: Case) -> dict:
    """Jitted pieces of one train step: (fn, args) per phase name."""
    import jax
    import jax.numpy as jnp
    import optax
    from dlm_jax.methods import ContinuousTime
    from dlm_jax.models import model_dims
    from dlm_jax.models.attention import CAUSAL, FULL, MaskPattern, attend
    tr, cfg = case.trainer, case.cfg
    exp, method = tr.exp, tr.exp.method
    # Copies: the train step donates (and so deletes) the state it is given.
    params = jax.tree.map(jnp.copy, case.state.params)
    opt_state = jax.tree.map(jnp.copy, case.state.opt_state)
    batch = {"tokens": jnp.asarray(case.batch["tokens"])}
    key = jax.random.key(1)
    B, L = case.batch["tokens"].shape
    two_pass = isinstance(method, ContinuousTime) and method.blocks
    clip = jnp.asarray(cfg.diffusion.clip, jnp.float32)

    def loss(p, b, k):
        return method.loss(exp.model(p), b, k, train=True, clip=clip)[0]

    def model_out(p, b):
        m = exp.model(p)
        x = b["tokens"]
        if two_pass:
            return m.two_pass(x, x, jnp.zeros((B,)), cfg.diffusion.block_size)
        return m(x, jnp.zeros((B,)))

    grads = jax.tree.map(jnp.zeros_like, params)

    def update(p, g, o):
        u, o = tr.program.tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    d = model_dims(cfg.model)
    H, Dh, depth = d["heads"], d["width"] // d["heads"], d["depth"]
    S = 2 * L if two_pass else L
    ks = jax.random.split(jax.random.key(2), 3)
    q, k_, v = (jax.random.normal(kk, (B, S, H, Dh), jnp.float32) for kk in ks)
    if two_pass:
        mask = MaskPattern("two_pass", cfg.diffusion.block_size)  # what DiT.two_pass uses
    else:
        mask = CAUSAL if method.causal else FULL

    def attn_loss(q, k_, v):
        return attend(q, k_, v, mask, backend=cfg.model.attention).sum()

    return {
        "model_forward": (jax.jit(lambda p, b: model_out(p, b).sum()), (params, batch)),
        "loss_forward": (jax.jit(loss), (params, batch, key)),
        "loss_value_and_grad": (jax.jit(jax.value_and_grad(loss)), (params, batch, key)),
        "adamw_update": (jax.jit(update), (params, grads, opt_state)),
        f"attention_fwd_bwd_x{depth}": (jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2))),
                                        (q, k_, v)),
    }, depth


# An XLA op's trace event is named after its HLO instruction ("ynn_fusion.12", "while.3");
# Python and runtime events ("$api.py:…", "ThunkExecutor::Execute") do not match.
OP_EVENT = re.compile(r"^[a-z_][a-z0-9_\-]*(\.\d+)?$")


def op_category(name: str) -> str:
    """What an XLA:CPU op is, from its instruction name: matmul (a dot, or a YNNPACK / oneDNN
    fusion around one), copy / transpose, loop control (a while's own time: the flash
    attention's scan, scanned layers), elementwise fusion, or other."""
    if name.startswith(("ynn_fusion", "dot", "onednn", "xnn")) or "convolution" in name:
        return "matmul"
    if "copy" in name or "transpose" in name:
        return "copy / transpose"
    if name.startswith(("while", "call", "conditional")):
        return "loop control"
    return "elementwise fusion" if "fusion" in name else "other"


def exclusive_op_times(events) -> dict[str, float]:
    """Microseconds per XLA op from complete ("X") trace events: each op's duration minus that of
    the ops nested in it on the same thread (a while's body ops count as themselves)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, dur, time of nested ops]

        def pop():
            end, name, dur, nested = stack.pop()
            if OP_EVENT.match(name):
                out[name] += dur - nested
                if stack:
                    stack[-1][3] += dur
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                pop()
            stack.append([e["ts"] + e["dur"], e["name"], e["dur"], 0.0])
        while stack:
            pop()
    return dict(out)


def trace_ops(step, n: int) -> dict:
    """Run `step()` n times under the jax profiler; ms per step per op category and the ops."""
    import jax
    with tempfile.TemporaryDirectory(prefix="dlm_trace_") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(n):
                step()
        paths = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = {k: v / 1e3 / n for k, v in exclusive_op_times(events).items()}
    cats = collections.Counter()
    for name, ms in ops.items():
        cats[op_category(name)] += ms
    return {"ms_per_step": dict(cats.most_common()), "total_ms": sum(cats.values()),
            "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:15])}


def run_profile(args) -> dict:
    families = [f for f in args.families.split(",") if f]
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    result = {"kind": "profile", "machine": machine_info(),
              "settings": {"size": args.size, "families": families, "steps": args.steps,
                           "passes": args.passes, "seq_len": args.seq_len, "batch": args.batch,
                           "block": args.block}, "families": {}}
    with tempfile.TemporaryDirectory(prefix="dlm_bench_") as tmp:
        cases, phases = [], []
        for fam in families:
            cfg = make_config(fam, size=args.size, seq_len=args.seq_len, batch=args.batch,
                              block=args.block)
            case = Case(fam, fam, cfg, os.path.join(tmp, fam))
            case.compile()
            fns, depth = phase_functions(case)
            for fn, a in fns.values():
                _timed(fn, a, 1)  # compile
            cases.append(case)
            phases.append((fns, depth))
            log(f"{fam}: compiled")
        times = [{k: [] for k in list(f) + ["train_step"]} for f, _ in phases]
        for _ in range(args.passes):
            for case, (fns, _), tt in zip(cases, phases, times):
                for name, (fn, a) in fns.items():
                    tt[name] += _timed(fn, a, args.steps)
                tt["train_step"] += [case.step() for _ in range(args.steps)]
        for case, (fns, depth), tt in zip(cases, phases, times):
            med = {k: float(np.median(v)) for k, v in tt.items()}
            attn_key = next(k for k in med if k.startswith("attention"))
            med[attn_key] *= depth  # one layer was timed; the step runs `depth` of them
            step = med["train_step"]
            result["families"][case.family] = {
                "median_s": med, "all_s": tt,
                "share_of_step": {k: v / step for k, v in med.items()},
                "backward_s": med["loss_value_and_grad"] - med["loss_forward"],
                "loss_head_s": med["loss_forward"] - med["model_forward"],
                "rest_of_step_s": step - med["loss_value_and_grad"] - med["adamw_update"],
            }
            if args.ops:
                result["families"][case.family]["ops"] = trace_ops(case.step, args.steps)
            case.trainer.close()
            log(f"{case.family}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
    lines = ["| family | " + " | ".join(["model fwd", "loss fwd", "loss fwd+bwd", "AdamW",
                                          "attention fwd+bwd (all layers)", "train step"]) + " |",
             "|---|---|---|---|---|---|---|"]
    for fam, r in result["families"].items():
        m = r["median_s"]
        attn = next(v for k, v in m.items() if k.startswith("attention"))
        cells = [m["model_forward"], m["loss_forward"], m["loss_value_and_grad"],
                 m["adamw_update"], attn, m["train_step"]]
        lines.append(f"| {fam} | " + " | ".join(
            f"{c:.3f} ({100 * c / m['train_step']:.0f}%)" for c in cells) + " |")
    if args.ops:
        cats = ("matmul", "elementwise fusion", "copy / transpose", "loop control", "other")
        lines += ["", "XLA ops per train step (profiler trace, exclusive ms, summed over threads):",
                  "", "| family | " + " | ".join(cats) + " | all ops |",
                  "|---|" + "---|" * (len(cats) + 1)]
        for fam, r in result["families"].items():
            o = r["ops"]
            lines.append(f"| {fam} | " + " | ".join(
                f"{o['ms_per_step'].get(c, 0.0):.1f} "
                f"({100 * o['ms_per_step'].get(c, 0.0) / o['total_ms']:.0f}%)" for c in cats)
                + f" | {o['total_ms']:.1f} |")
    result["table"] = "\n".join(lines)
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python benchmarks/bench.py",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fams, steps, passes in (("train", ",".join(FAMILIES), 10, 2),
                                      ("profile", "mdlm,bd3lm", 5, 2)):
        p = sub.add_parser(name)
        p.add_argument("--size", choices=sorted(SIZES), default="bench")
        p.add_argument("--families", default=fams)
        p.add_argument("--steps", type=int, default=steps, help="timed steps per pass")
        p.add_argument("--passes", type=int, default=passes)
        p.add_argument("--warmup", type=int, default=1, help="untimed steps per pass")
        p.add_argument("--seq_len", type=int, default=None)
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--block", type=int, default=None, help="BD3-LM block size")
        p.add_argument("--extra", default="", help="comma list: dropout (0.1), clip_ema, remat")
        p.add_argument("--peak_n", type=int, default=2048)
        p.add_argument("--peak_repeats", type=int, default=5)
        p.add_argument("--out", default=None, help="write the JSON result here")
        p.add_argument("--quiet", action="store_true")
        if name == "profile":
            p.add_argument("--ops", action="store_true",
                           help="also trace --steps train steps: time per XLA op category")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)
    result = run_train(args) if args.cmd == "train" else run_profile(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(result["table"], flush=True)
    return result


if __name__ == "__main__":
    main()
