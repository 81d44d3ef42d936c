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


def test_bench_profile_tiny_smoke(tmp_path):
    result = bench.main(["profile", "--size", "tiny", "--families", "ar,bd3lm", "--steps", "1",
                         "--passes", "1", "--quiet"])
    for fam in ("ar", "bd3lm"):
        med = result["families"][fam]["median_s"]
        assert med["train_step"] > 0 and med["loss_value_and_grad"] > 0
