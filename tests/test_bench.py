"""Smoke test of the throughput benchmark: tiny size, one family, 2 timed steps, JSON keys."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench  # noqa: E402


def test_bench_train_tiny_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["train", "--size", "tiny", "--families", "mdlm", "--steps", "2",
                         "--passes", "1", "--warmup", "0", "--peak_n", "256",
                         "--peak_repeats", "2", "--out", str(out), "--quiet"])
    data = json.loads(out.read_text())
    assert data["kind"] == "train" == result["kind"]
    for key in ("machine", "settings", "peak", "cases", "reference", "table",
                "comparable_to_reference"):
        assert key in data, key
    assert data["comparable_to_reference"] is False
    assert data["peak"]["jax_gflops"] > 0 and data["peak"]["numpy_gflops"] > 0
    case = data["cases"]["mdlm"]
    for key in ("num_params", "first_step_s", "compile_s", "step_s", "tokens_per_s",
                "flops_per_token", "achieved_gflops", "mfu", "final_loss"):
        assert key in case, key
    assert case["step_s"]["n"] == 2
    assert case["tokens_per_s"] > 0 and 0 < case["mfu"]
    assert case["tokens_per_s"] == 8 * 32 / case["step_s"]["median"]
    assert "| mdlm |" in data["table"]


def test_peak_times_jax_before_numpy_and_lets_blas_settle(monkeypatch):
    """numpy's BLAS threads spin after a call and slow a jax matmul timed next to it (~30%
    here): every jax call must come before the first numpy one, and the peak must wait after."""
    events = []
    import jax
    real_jit, real_matmul = jax.jit, bench.np.matmul

    def jit(fn):
        compiled = real_jit(fn)
        return lambda *a: (events.append("jax"), compiled(*a))[1]

    monkeypatch.setattr(jax, "jit", jit)
    monkeypatch.setattr(bench.np, "matmul",
                        lambda *a: (events.append("numpy"), real_matmul(*a))[1])
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(f"sleep {s}"))
    peak = bench.measure_peak(64, repeats=3)
    assert events == ["jax"] * 4 + ["numpy"] * 4 + [f"sleep {bench.BLAS_SETTLE_S}"], events
    assert len(peak["jax_s"]) == len(peak["numpy_s"]) == 3
    events.clear()
    bench.measure_peak(64, repeats=2, with_numpy=False)
    assert events == ["jax"] * 3


def test_bench_profile_tiny_smoke(tmp_path):
    result = bench.main(["profile", "--size", "tiny", "--families", "ar,bd3lm", "--steps", "1",
                         "--passes", "1", "--quiet", "--ops"])
    for fam in ("ar", "bd3lm"):
        med = result["families"][fam]["median_s"]
        assert med["train_step"] > 0 and med["loss_value_and_grad"] > 0
    for fam in ("ar", "bd3lm"):
        ops = result["families"][fam]["ops"]
        assert ops["ms_per_step"]["matmul"] > 0 and ops["top_ops_ms"]
        assert abs(sum(ops["ms_per_step"].values()) - ops["total_ms"]) < 1e-9
    assert "| matmul | elementwise fusion |" in result["table"]


def test_reference_comparison_needs_its_cpu_size_block_and_rows():
    zen5, zen3 = ("26", "2"), ("25", "1")
    ref = bench.comparable_reference(zen5, "bench", 1024, 2, 16, ["mdlm"])
    assert ref is bench.reference_for(zen5) and ref["dropout"] == 0.1
    assert bench.comparable_reference(zen3, "bench", 1024, 2, 16, ["mdlm"]) is None  # no row
    assert bench.comparable_reference(zen3, "bench", 256, 8, 16, ["d3pm"]) is not None  # proxy
    assert bench.comparable_reference(zen5, "tiny", 256, 8, 16, ["mdlm"]) is None
    assert bench.comparable_reference(zen5, "bench", 256, 8, 4, ["bd3lm"]) is None
    assert bench.comparable_reference(("25", "17"), "bench", 256, 8, 16, ["mdlm"]) is None
    assert bench.comparable_reference(None, "bench", 256, 8, 16, ["mdlm"]) is None


def test_ratios_raw_and_peak_normalised():
    ref = bench.reference_for(("25", "1"))
    row = bench.reference_row(ref, "mdlm", 256, 8)
    out = bench._ratios({"tokens_per_s": 6076.0}, ref, row, peak_gflops=227.0)
    assert out["reference_family"] == "mdlm"
    assert out["ratio_tokens_per_s"] == 2.0                       # 6076 / 3038
    assert abs(out["ratio_peak_normalised"] - 1.0) < 1e-12        # and twice the peak
    # Their own count: 46.0 GFLOP/step at 3038 tok/s of 2048-token steps, peak 113.5.
    assert abs(out["reference_mfu_own_count"] - 46.0 * 3038 / 2048 / 113.5) < 1e-12
    zen5 = bench.reference_for(("26", "2"))
    assert "reference_mfu_own_count" not in bench._ratios(
        {"tokens_per_s": 1.0}, zen5, bench.reference_row(zen5, "ar", 1024, 2), 1.0)


def test_exclusive_op_times_subtract_nested_ops_only():
    """A while (0–100 µs) holding two body ops (10–30, 40–90) and a runtime event (a thread-pool
    wait, 50–60, inside the second op); a Python event around everything; another thread."""
    ev = [{"ph": "X", "name": "$api.py:1 block_until_ready", "ts": 0, "dur": 120, "tid": 1},
          {"ph": "X", "name": "while.3", "ts": 0, "dur": 100, "tid": 1},
          {"ph": "X", "name": "ynn_fusion.7", "ts": 10, "dur": 20, "tid": 1},
          {"ph": "X", "name": "multiply_add_fusion", "ts": 40, "dur": 50, "tid": 1},
          {"ph": "X", "name": "SlinkyThreadPool::Await", "ts": 50, "dur": 10, "tid": 1},
          {"ph": "X", "name": "ynn_fusion.7", "ts": 0, "dur": 30, "tid": 2},
          {"ph": "i", "name": "marker", "ts": 5, "tid": 1}]
    got = bench.exclusive_op_times(ev)
    assert got == {"while.3": 30, "ynn_fusion.7": 50, "multiply_add_fusion": 50}
    assert [bench.op_category(n) for n in ("while.3", "ynn_fusion.7", "dot_general.2",
                                           "transpose_copy_fusion.1", "multiply_add_fusion",
                                           "wrapped_gather")] == [
        "loop control", "matmul", "matmul", "copy / transpose", "elementwise fusion", "other"]


def test_sampling_reference_rows_match_the_same_case_only():
    import sample_bench
    zen5 = bench.reference_for(("26", "2"))

    def row(**kw):
        base = {"family": "bd3lm", "sampler": "ancestral", "steps": 16, "length": 256,
                "batch": 8, "cached": True, "block": 16, "tokens_per_s": 900.0}
        return base | kw
    rows = sample_bench.attach_reference(
        [row(), row(cached=False, tokens_per_s=314.0), row(length=1024),
         row(sampler="first_hitting", batch=1, tokens_per_s=470.0), row(block=8),
         row(family="mdlm", steps=256)], zen5, "bench")
    assert [r.get("reference_tokens_per_s") for r in rows] == [450.0, 157.0, None, 235.0, None,
                                                               None]
    assert rows[0]["ratio_tokens_per_s"] == 2.0 and rows[1]["ratio_tokens_per_s"] == 2.0
    assert rows[3]["ratio_tokens_per_s"] == 2.0
    assert "reference_tokens_per_s" not in sample_bench.attach_reference(
        [row()], zen5, "tiny")[0]
    assert "reference_tokens_per_s" not in sample_bench.attach_reference(
        [row()], bench.reference_for(("25", "17")), "bench")[0]
    for ref in bench.REFERENCES:   # tok/s = batch · 256 / seconds, to the figures' rounding
        for r in ref["sampling"]:
            assert abs(r["tokens_per_s"] - r["batch"] * r["length"] / r["seconds"]) \
                <= 0.02 * r["tokens_per_s"], r
