"""Every shipped config validates and builds; config-file arguments are checked."""
import json
import os
import sys

import pytest

from dlm_jax import registry
from dlm_jax.config import Config, ConfigError, OBJECTIVES, validate
from dlm_jax.models import model_dims

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
    dims = model_dims(cfg.model)
    assert (dims["width"], dims["depth"], dims["heads"]) == (768, 12, 12)
    if "bd3lm" in arg:
        assert cfg.diffusion.block_size in (4, 8, 16) and cfg.diffusion.resample
        assert cfg.diffusion.var_min and cfg.train.steps == 150_000
    if "sedd,process=uniform" in arg:
        assert cfg.diffusion.schedule == "geometric"
    if "d3pm" in arg:
        assert cfg.diffusion.d3pm_steps == 1000 and cfg.diffusion.hybrid_lambda == 0.01


# (tiny arg, method name, model vocabulary over 8 Markov tokens, causal)
TINY = [("ar", "ar", 8, True), ("mdlm", "mdlm", 9, False), ("bd3lm,block=4", "bd3lm", 9, False),
        ("sedd", "sedd", 9, False), ("sedd,process=uniform", "sedd", 8, False),
        ("sedd,process=uniform,block=8", "sedd-blocks", 8, False), ("d3pm", "d3pm", 9, False),
        ("d3pm,process=uniform", "d3pm", 8, False), ("ctmc", "ctmc", 9, False),
        ("ctmc,process=uniform", "ctmc", 8, False), ("csm", "csm", 8, False)]


@pytest.mark.parametrize("arg,name,vocab,causal", TINY)
def test_tiny_configs_build_their_method(arg, name, vocab, causal):
    cfg = tiny.get_config(arg)
    cfg.mesh.shape = (1, 1, 1)
    exp = registry.build(cfg)
    assert exp.method.name == name and exp.method.causal == causal
    assert exp.abstract_params["embed"]["embedding"].shape[0] == vocab
    assert exp.method.model_vocab(exp.token_vocab) == vocab


def test_every_objective_has_a_method_and_a_family():
    assert set(registry.METHODS) == set(OBJECTIVES)
    assert {f.objective for f in registry.FAMILIES.values()} == set(OBJECTIVES)


def test_quickstart_config_and_json_round_trip():
    cfg = validate(quickstart.get_config())
    assert cfg.diffusion.objective == "nelbo" and cfg.diffusion.block_size == 16
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("module,arg,match", [
    (tiny, "bd3lm,blok=4", "unknown option 'blok' \\(did you mean 'block'\\?\\)"),
    (tiny, "bd3lm,block=four", "option block='four' must be a int"),
    (tiny, "bdlm", "family 'bdlm' is not known \\(did you mean 'bd3lm'\\?\\)"),
    (presets, "owt,bd3lm,blocks=4", "unknown option 'blocks'"),
    (presets, "c4,mdlm", "unknown dataset 'c4'"),
])
def test_config_file_arguments_are_checked(module, arg, match):
    with pytest.raises(ConfigError, match=match):
        module.get_config(arg)


def test_family_independent_checks_of_new_objectives():
    cfg = tiny.get_config("ctmc")
    cfg.diffusion.block_size = 8
    with pytest.raises(ConfigError, match="objective 'ctmc' trains whole sequences"):
        validate(cfg)
    cfg = tiny.get_config("csm,source=stdlib")   # byte vocabulary: too many neighbours
    cfg.mesh.shape = (1, 1, 1)
    with pytest.raises(ConfigError, match="csm_estimator='exact' runs the model at all"):
        registry.build(cfg)
    cfg.diffusion.csm_estimator = "sampled"
    assert registry.build(cfg).method.estimator == "sampled"
    cfg = tiny.get_config("sedd,process=uniform")
    cfg.diffusion.var_min = True
    with pytest.raises(ConfigError, match="the clip search needs"):
        validate(cfg)


def test_data_mode_is_checked_against_the_method():
    cfg = tiny.get_config("mdlm")
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.mode = "pack"
    with pytest.raises(ConfigError, match="data.mode='pack' is not supported by objective "
                                          "'nelbo' \\(mdlm\\); it supports \\['wrap'\\]"):
        registry.build(cfg)
    cfg = tiny.get_config("ar,source=stdlib")
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.mode = "pack"
    assert registry.build(cfg).method.data_modes == ("wrap", "pack")


def test_a_config_written_before_new_keys_existed_resumes_unchanged():
    """An older config.json lacks keys added since (model.arch, model.sigma_features, …): they
    mean their defaults, so resuming that run reports no change of a fixed field."""
    from dlm_jax.config import config_changes
    new = Config().to_dict()
    old = json.loads(json.dumps(new))
    for key in ("arch", "sigma_features", "sigma_max_period", "n_positions"):
        old["model"].pop(key)
    old["train"].pop("init_from")
    assert config_changes(old, new) == ([], [])
    old["model"]["width"] = 512
    assert config_changes(old, new)[0] == ["model.width: 512 -> 0"]
