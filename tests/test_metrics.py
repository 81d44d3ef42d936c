"""The peak FLOP/s behind the trainer's MFU: one host's CPU devices share its cores, the matmul
runs in the model's compute dtype."""
import os
import sys
from types import SimpleNamespace

import jax
import pytest

import dlm_jax.trainer as trainer_module
from dlm_jax.metrics import combined_peak_flops, measure_peak_flops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402


def _devices(platform, processes, per_process):
    return [SimpleNamespace(platform=platform, process_index=p)
            for p in range(processes) for _ in range(per_process)]


def test_cpu_devices_of_one_host_share_its_peak_and_accelerators_add_up():
    assert combined_peak_flops(2.0, _devices("cpu", 1, 8)) == 2.0
    assert combined_peak_flops(2.0, _devices("cpu", 2, 4)) == 4.0
    assert combined_peak_flops(2.0, _devices("gpu", 1, 8)) == 16.0
    assert combined_peak_flops(2.0, _devices("tpu", 2, 4)) == 16.0
    assert combined_peak_flops(2.0, jax.devices()) == 2.0  # the suite's 8 fake CPU devices


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measured_peak_is_positive_in_either_dtype(dtype):
    assert measure_peak_flops(128, repeats=2, dtype=dtype) > 0


def test_trainer_peak_is_one_cpu_host_in_the_compute_dtype(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(trainer_module, "measure_peak_flops",
                        lambda **kw: (asked.append(kw), 1e11)[1])
    cfg = tiny.get_config("mdlm")
    cfg.model.compute_dtype = "bfloat16"
    cfg.mesh.shape = (-1, 1, 1)  # every fake CPU device of the suite
    trainer = trainer_module.Trainer(cfg, str(tmp_path))
    try:
        assert trainer.exp.mesh.devices.size == jax.device_count() > 1
        assert asked == [{"dtype": "bfloat16"}]
        assert trainer.peak_flops == 1e11  # not 1e11 × the device count
    finally:
        trainer.close()
