"""The performance table, on synthetic results (no timing): README markers are created once and
replaced idempotently with the rest of the file untouched; the table's rows, targets and
reference rule; the attention FLOP counts per backend (`methods.base.score_pairs`)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import perf_table as pt  # noqa: E402

from dlm_jax.methods.base import attention_flops, pattern_attention_flops, score_pairs  # noqa: E402
from dlm_jax.models import flash  # noqa: E402
from dlm_jax.models.attention import MaskPattern  # noqa: E402

README = """# Project

Intro.

## Benchmarks

Some text about the benchmarks.

## Next section

Untouched.
"""


def _train_row(family, attention, step, *, size="bench", L=256, B=8, mfu=0.5, target=None):
    return {"family": family, "size": size, "seq_len": L, "batch": B, "attention": attention,
            "num_params": 4_194_051, "step_s": {"median": step, "min": step * 0.9,
                                                "max": step * 1.1, "n": 4},
            "tokens_per_s": B * L / step, "gflop_per_step": 28.6, "mfu": mfu,
            "achieved_gflops": 60.0, "mfu_target": target}


def _result(backend="cpu", cpu_fm=("6", "207")):
    settings = pt.platform_settings(backend)
    settings["attention_backends"] = list(settings["attention_backends"])
    return {
        "quick": True, "wall_s": 180.0, "peak_gflops": 120.0,
        "machine": {"cpu": "Intel Xeon", "cpu_family_model": list(cpu_fm), "cpu_count": 2,
                    "jax": "0.10.2", "devices": ["TFRT_CPU_0"], "date": "2026-12-01"},
        "settings": settings,
        "reference": pt.machine_reference(cpu_fm, backend),
        "comparable_to_reference": pt.machine_reference(cpu_fm, backend) is not None,
        "peaks": [{"jax_gflops": 110.0, "loadavg": [5.0, 4.0, 3.0]}, {"jax_gflops": 120.0},
                  {"jax_gflops": 130.0, "loadavg": [7.0, 6.0, 5.0]}],
        "train": [_train_row("mdlm", "xla", 0.4), _train_row("mdlm", "dense", 0.6),
                  _train_row("bd3lm", "xla", 0.8, size="small", L=1024, B=1, mfu=0.42,
                             target=0.40)],
        "sampling": [
            {"family": "bd3lm", "sampler": "ancestral", "length": 128, "batch": 8,
             "cached": True, "steps": 16, "nfe": 128, "seconds": 0.5, "tokens_per_s": 2048.0},
            {"family": "bd3lm", "sampler": "ancestral", "length": 128, "batch": 8,
             "cached": False, "steps": 16, "nfe": 128, "seconds": 1.5, "tokens_per_s": 683.0},
            {"family": "mdlm", "sampler": "ancestral", "length": 128, "batch": 8,
             "cached": True, "steps": 128, "nfe": 128, "seconds": 1.0, "tokens_per_s": 1024.0}],
        "attention": [
            {"pattern": "causal", "seq_len": 256, "backend": "dense", "seconds": 0.02},
            {"pattern": "causal", "seq_len": 256, "backend": "xla", "seconds": 0.01},
            {"pattern": "full", "seq_len": 256, "backend": "dense", "seconds": 0.02},
            {"pattern": "full", "seq_len": 256, "backend": "xla", "error": "boom"}],
    }


def test_markers_are_created_once_and_replacement_is_idempotent(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README)
    pt.write_readme(str(path), "table one")
    first = path.read_text()
    assert first.count(pt.MARK_START) == 1 and first.count(pt.README_INTRO) == 1
    # Inside the Benchmarks section, after its text and before the next section.
    bench_at, next_at = first.index("## Benchmarks"), first.index("## Next section")
    assert bench_at < first.index("Some text") < first.index(pt.MARK_START) < next_at
    assert "table one" in first
    pt.write_readme(str(path), "table two")
    second = path.read_text()
    assert "table one" not in second and "table two" in second
    pt.write_readme(str(path), "table two")
    assert path.read_text() == second
    # Everything outside the markers is what it was.
    before = second[:second.index(pt.README_INTRO)]
    after = second[second.index(pt.MARK_END) + len(pt.MARK_END):]
    assert before + after.lstrip("\n") == README


def test_replace_needs_markers_and_ensure_needs_the_section():
    with pytest.raises(ValueError, match="markers"):
        pt.replace_between_markers("no markers here", "x")
    with pytest.raises(ValueError, match="Benchmarks"):
        pt.ensure_markers("# only a title\n")
    # A section at the end of the file gets its markers at the end.
    text = pt.ensure_markers("# T\n\n## Benchmarks\n\nText.\n")
    assert text.rstrip().endswith(pt.MARK_END)


def test_render_cpu_states_the_machine_and_no_reference():
    md = pt.render(_result())
    assert "Intel Xeon (cpu family 6 model 207" in md
    assert "no reference figures for this CPU (family 6 model 207)" in md
    assert "AMD EPYC (Zen 3), 2 vCPUs (cpu family 25 model 1)" in md
    assert "reference tok/s" not in md and "MFU target" not in md
    assert "110.0 GFLOP/s at the start, 130.0 at the end" in md
    assert "load average 5.0 at the start, 7.0 at the end" in md
    # Train-step speed-up of xla over dense: 0.6 / 0.4.
    assert "| mdlm | bench | 256 | 8 | xla | dense | 0.600 | 0.400 | 1.50× |" in md
    assert "bd3lm ancestral L 128: 3.00×" in md           # KV cache: 1.5 / 0.5
    assert "| bd3lm | ancestral | 128 | 8 | no |" in md
    assert "| mdlm | ancestral | 128 | 8 | – |" in md      # no cache twin: no cache column
    assert "| causal | 256 | 20.0 | 10.0 (2.00×) |" in md
    assert "| full | 256 | 20.0 | n/a |" in md and "xla (boom)" in md


def test_render_accelerator_prints_the_mfu_targets():
    md = pt.render(_result("gpu"))
    assert "MFU target" in md and "≥ 40% (met)" in md
    assert "cudnn ms (speed-up)" in md
    assert pt.mfu_target("mdlm", "small", 1024, True) == 0.45
    assert pt.mfu_target("mdlm", "small", 1024, False) is None
    assert pt.mfu_target("mdlm", "bench", 256, True) is None
    assert pt.mfu_target("sedd", "small", 1024, True) is None


def test_reference_only_on_its_cpu_model():
    for ref in pt.bench.REFERENCES:
        fm = tuple(ref["cpu_family_model"])
        assert pt.machine_reference(fm, "cpu") is ref
        assert pt.machine_reference(list(fm), "cpu") is ref     # as read back from JSON
        assert pt.machine_reference(fm, "gpu") is None
    assert pt.machine_reference(("25", "17"), "cpu") is None   # Zen 4: never measured
    assert pt.machine_reference(None, "cpu") is None


def test_reference_rows_and_proxies():
    zen3, zen5 = (pt.bench.reference_for(fm) for fm in (("25", "1"), ("26", "2")))
    row = pt.bench.reference_row
    assert row(zen5, "sedd", 256, 8)["reference_family"] == "sedd"     # its own row
    assert row(zen3, "sedd", 256, 8)["reference_family"] == "mdlm"     # the proxy's
    assert row(zen5, "d3pm", 1024, 2)["tokens_per_s"] == 4679.0        # mdlm's, at L 1024
    assert row(zen3, "mdlm", 1024, 2) is None                           # never measured
    assert row(None, "mdlm", 256, 8) is None
    for ref in pt.bench.REFERENCES:   # every row is internally consistent: tok/s = B·L / step
        assert ref["dropout"] == 0.1
        for r in ref["rows"]:
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_s"],
                                                      rel=0.01), r


def test_reference_twins_are_planned_where_rows_exist():
    zen5 = pt.bench.reference_for(("26", "2"))
    groups = {(g["size"], g["seq_len"]): g for g in pt.train_groups(False, 1, zen5)}
    assert groups[("bench", 256)]["reference_twins"] == {
        "dropout": 0.1, "families": ("ar", "mdlm", "bd3lm", "sedd")}
    assert groups[("bench", 1024)]["reference_twins"]["families"] == ("ar", "mdlm", "bd3lm")
    assert "reference_twins" not in groups[("small", 1024)]
    zen3 = pt.bench.reference_for(("25", "1"))
    groups = {(g["size"], g["seq_len"]): g for g in pt.train_groups(False, 1, zen3)}
    assert groups[("bench", 256)]["reference_twins"]["families"] == ("ar", "mdlm", "bd3lm")
    assert "reference_twins" not in groups[("bench", 1024)]
    assert all("reference_twins" not in g for g in pt.train_groups(False, 1, None))


def test_render_on_a_reference_cpu_compares_the_dropout_twins_only():
    result = _result(cpu_fm=("26", "2"))
    ref = result["reference"]
    twin = _train_row("mdlm", "xla", 0.25)
    twin["dropout"] = 0.1
    twin.update(pt.bench._ratios(twin, ref, pt.bench.reference_row(ref, "mdlm", 256, 8),
                                 result["peak_gflops"]))
    result["train"].append(twin)
    md = pt.render(result)
    assert "this is its CPU model" in md and "reference tok/s" in md
    # 8·256 / 0.25 = 8192 tok/s against the reference's 6472: 1.27×; peak-normalised by
    # 120 (ours) and 210 (theirs) GFLOP/s: (8192 / 120) / (6472 / 210) = 2.22×.
    assert "| mdlm | bench | 256 | 8 | xla | 0.1 | 4.19M | 0.250 (0.225–0.275) | 8192 |" in md
    assert "| 6472 | 1.27 | 2.22 |" in md
    # The dropout-0 rows carry no ratio, and the twin does not enter the dense speed-up.
    assert "| mdlm | bench | 256 | 8 | xla | 0 | 4.19M | 0.400 (0.360–0.440) | 5120 | 28.6 " \
           "| 50.0% | – | – | – |" in md
    assert "| mdlm | bench | 256 | 8 | xla | dense | 0.600 | 0.400 | 1.50× |" in md


def test_quick_plan_is_L256_only():
    groups = pt.train_groups(True, 1)
    assert {g["seq_len"] for g in groups} == {256}
    full = pt.train_groups(False, 2)
    assert {(g["size"], g["seq_len"]) for g in full} == {("bench", 256), ("bench", 1024),
                                                          ("small", 1024)}
    assert any("dense" in g["backends"] and g["seq_len"] == 1024 for g in full)


def test_score_pairs_per_backend(monkeypatch):
    """Dense: every key (block-sparse for two-pass); xla: whole tiles of the flash schedule;
    cudnn/splash: the allowed entries."""
    L, lb = 64, 16
    causal, two = MaskPattern("causal"), MaskPattern("two_pass", lb)
    assert score_pairs(causal, L, L, "dense") == L * L
    assert score_pairs(two, 2 * L, 2 * L, "dense") == L * (lb + L) + L * L
    assert score_pairs(two, L, 2 * L, "dense") == L * (lb + L)
    assert score_pairs(causal, L, L, "cudnn") == L * (L + 1) // 2
    # Flash with 16 × 16 tiles: the causal schedule is the 10 tiles on and below the diagonal.
    monkeypatch.setattr(flash, "default_blocks", lambda lq, lk: (16, 16))
    assert score_pairs(causal, L, L, "xla") == 10 * 16 * 16
    assert score_pairs(MaskPattern("full"), L, L, "xla") == L * L
    # Two-pass, blocks = tiles: noisy query tile i scores noisy tile i and clean tiles < i,
    # clean query tile i clean tiles ≤ i (4 tiles a half).
    assert score_pairs(two, 2 * L, 2 * L, "xla") == (4 + 6 + 10) * 16 * 16
    # One tile covering q and the clean half, blocks smaller: the noisy diagonal densely, then
    # every score of the one tile against the clean half.
    monkeypatch.setattr(flash, "default_blocks", lambda lq, lk: (lq, lk))
    assert score_pairs(two, 2 * L, 2 * L, "xla") == L * lb + 2 * L * L
    assert score_pairs(two, L, 2 * L, "xla") == L * lb + L * L


def test_pattern_attention_flops_counts_the_last_layer_alone():
    L, lb, depth, D = 64, 16, 3, 32
    two = MaskPattern("two_pass", lb)
    got = pattern_attention_flops(depth, D, two, L, "dense", last_queries=L)
    keys = (depth - 1) * (2 * L + lb) + (L + lb)
    assert got == attention_flops(1, D, keys)
    assert pattern_attention_flops(depth, D, MaskPattern("full"), L, "dense") == \
        attention_flops(depth, D, L)


def test_accelerator_small_group_times_the_platform_kernel_against_xla():
    groups = {g["name"]: g for g in pt.train_groups(False, 16, kernels=("cudnn",))}
    assert tuple(groups) == pt.group_names() == ("bench-L256", "bench-L1024", "small-L1024")
    assert pt.group_names(quick=True) == ("bench-L256",)
    assert groups["small-L1024"]["backends"] == ("xla", "cudnn")
    assert groups["small-L1024"]["batch"] == 16
    assert groups["bench-L1024"]["backends"] == ("xla", "dense")
    rows = [_train_row("mdlm", "xla", 0.30, size="small", L=1024, B=16),
            _train_row("mdlm", "cudnn", 0.25, size="small", L=1024, B=16)]
    (sp,) = pt.backend_speedups(rows)
    assert (sp["backend"], sp["base"]) == ("cudnn", "xla") and sp["speedup"] == 0.30 / 0.25


def test_parts_groups_and_families_are_checked_and_skipped_parts_leave_no_section():
    args = pt.parse_args(["--parts", "train,attention", "--groups", "small-L1024",
                          "--families", "ar,mdlm,bd3lm", "--attention_lengths", "1024,4096"])
    assert args.parts == ("train", "attention") and args.groups == ("small-L1024",)
    assert args.families == ("ar", "mdlm", "bd3lm") and args.attention_lengths == (1024, 4096)
    for bad in (["--parts", "train,sample"], ["--groups", "small"], ["--families", "gpt"],
                ["--quick", "--groups", "small-L1024"]):
        with pytest.raises(SystemExit):
            pt.parse_args(bad)
    result = _result("gpu")
    result["sampling"], result["attention"] = [], []
    md = pt.render(result)
    assert "**Training**" in md and "**Sampling**" not in md and "**Attention" not in md
    result = _result("gpu")
    result["train"], result["sampling"] = [], []
    md = pt.render(result)
    assert "**Training**" not in md and "**Train step" not in md and "**Attention" in md


def test_datasheet_peaks_and_the_target_judged_on_them():
    assert pt.datasheet_peak_gflops("NVIDIA H100 80GB HBM3") == 989_400.0
    assert pt.datasheet_peak_gflops("NVIDIA H100 PCIe") == 756_000.0
    assert pt.datasheet_peak_gflops("NVIDIA H200") == 989_400.0
    assert pt.datasheet_peak_gflops("TPU v5 lite") == 197_000.0
    assert pt.datasheet_peak_gflops("TPU v5p") == 459_000.0
    assert pt.datasheet_peak_gflops("cpu") is None and pt.datasheet_peak_gflops(None) is None
    result = _result("gpu")
    result["device_kind"], result["datasheet_peak_gflops"] = "NVIDIA H100 80GB HBM3", 989_400.0
    small = result["train"][-1]
    small["mfu_datasheet"] = 0.35          # 0.42 of the measured peak, 0.35 of the datasheet's
    md = pt.render(result)
    assert "MFU (datasheet peak)" in md and "datasheet 989.4 TFLOP/s" in md
    assert "| 42.0% | 35.0% | ≥ 40% (not met) |" in md


def test_accelerator_check_refuses_a_machine_without_one(tmp_path):
    """The prepared device script: usage errors and a CPU-only jax end it at once (exit 2),
    before any wheel is installed (a broken one is planted) or any test or benchmark runs."""
    import subprocess
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accelerator_check.sh")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-0.0-py3-none-any.whl").write_text("not a zip")
    env = {**os.environ, "PYTHON": sys.executable, "CHECK_WHEELS": str(wheels),
           "JAX_PLATFORMS": "cpu"}
    bad = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage" in bad.stderr
    run = subprocess.run(["bash", script, "run", str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "no accelerator here: jax's default backend is 'cpu'" in run.stderr
    assert not os.listdir(tmp_path / "out")


def test_masked_cudnn_variant_is_measured_on_gpus_only_and_equals_dense_attention():
    """`cudnn_mask` (a pattern as a dense mask for cuDNN) joins the GPU attention table, never
    the model backends of the training groups; with jax's xla implementation standing in for
    cuDNN on CPU it equals the dense masked attention in values and gradients."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlm_jax.models.attention import attend
    gpu, cpu = pt.platform_settings("gpu"), pt.platform_settings("cpu")
    assert "cudnn_mask" in gpu["attention_backends"]
    assert "cudnn_mask" not in cpu["attention_backends"]
    assert pt.model_kernels(gpu) == ("cudnn",) and pt.model_kernels(cpu) == ()
    assert pt.model_kernels(pt.platform_settings("tpu")) == ("splash",)
    md = pt.render(_result("gpu"))
    assert "`cudnn_mask`: cuDNN fused attention given the pattern" in md
    assert "`cudnn_mask`" not in pt.render(_result("cpu"))
    keys = jax.random.split(jax.random.key(3), 3)
    for pattern, n in [(MaskPattern("block_causal", 4), 16), (MaskPattern("two_pass", 4), 32),
                       (MaskPattern("causal"), 16)]:
        q, k, v = (jax.random.normal(kk, (2, n, 2, 8), jnp.float32) for kk in keys)
        ours = jax.value_and_grad(lambda q, k, v: pt.masked_cudnn_attention(
            q, k, v, pattern, implementation="xla").sum() ** 2, argnums=(0, 1, 2))(q, k, v)
        dense = jax.value_and_grad(lambda q, k, v: attend(
            q, k, v, pattern, backend="dense").sum() ** 2, argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(dense)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
