"""Every shipped config validates and builds its model shapes."""
import os
import sys

import pytest
from flax import nnx

from dlm_jax import registry
from dlm_jax.config import Config, validate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import presets  # noqa: E402
import quickstart  # noqa: E402
import tiny  # noqa: E402

PRESETS = [f"{d},{f}" for d in ("lm1b", "owt") for f in ("ar", "d3pm", "sedd", "mdlm")]
PRESETS += [f"{d},bd3lm,block={b}" for d in ("lm1b", "owt") for b in (4, 8, 16)]
PRESETS += ["owt,sedd,process=uniform", "lm1b,d3pm,process=uniform"]


@pytest.mark.parametrize("arg", PRESETS)
def test_paper_presets_validate(arg):
    cfg = validate(presets.get_config(arg))
    assert cfg.model.size == "small" and cfg.train.batch_size == 512
    dims = registry.model_dims(cfg)
    assert (dims["width"], dims["depth"], dims["heads"]) == (768, 12, 12)
    if "bd3lm" in arg:
        assert cfg.diffusion.block_size in (4, 8, 16) and cfg.diffusion.resample


@pytest.mark.parametrize("arg", ["ar", "mdlm", "bd3lm,block=4", "sedd", "sedd,process=uniform",
                                 "d3pm", "d3pm,process=uniform"])
def test_tiny_configs_validate_and_build(arg):
    cfg = validate(tiny.get_config(arg))
    model = nnx.eval_shape(lambda: registry.build_model(cfg, 8, nnx.Rngs(0)))
    expected = 8 if cfg.diffusion.objective == "ar" or cfg.diffusion.process == "uniform" else 9
    assert model.vocab_size == expected


def test_quickstart_config_and_json_round_trip():
    cfg = validate(quickstart.get_config())
    assert cfg.diffusion.family == "bd3lm" and cfg.diffusion.block_size == 16
    assert Config.from_dict(cfg.to_dict()) == cfg
