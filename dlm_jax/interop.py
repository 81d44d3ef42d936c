"""Import reference checkpoints into dlm_jax workdirs and export them back (the library behind
`python -m dlm_jax.convert`; see that module for the command line).

`import_checkpoint(family, checkpoint, out)` reads a checkpoint (`models.convert.open_checkpoint`),
maps its tensors (`models.convert.dit_params`, `models.gpt2.gpt2_from_state_dict`), builds the
config (`import_config`: sizes from the tensors, the rest from the checkpoint's own config and
the arguments) and writes `out/config.json` plus `out/checkpoints/0` with the parameters alone.
`export_run(workdir, path)` writes a run's (EMA) parameters under the reference names.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

FAMILIES = ("bd3lm", "mdlm", "sedd", "gpt2")


# ---------------------------------------------------------------------------------------------
# What the checkpoint's own config says
# ---------------------------------------------------------------------------------------------

def _find(tree: Any, key: str):
    """The first value of `key` anywhere in a nested dict (breadth first), else None."""
    level = [tree]
    while level:
        nxt = []
        for node in level:
            if isinstance(node, dict):
                if key in node:
                    return node[key]
                nxt += list(node.values())
        level = nxt
    return None


def declared_family(config: dict | None) -> tuple[str, str] | None:
    """(family, the key that says so) from a checkpoint's own config, or None."""
    if not config:
        return None
    model_type = str(config.get("model_type", "")).lower()
    if model_type in ("gpt2", "bd3lm", "mdlm"):
        return model_type, f"model_type={model_type!r}"
    algo = _find(config, "algo")
    name = algo.get("name") if isinstance(algo, dict) else None
    if name in ("mdlm", "bd3lm", "sedd", "ar"):
        return ("gpt2" if name == "ar" else name), f"algo.name={name!r}"
    if "graph" in config and "noise" in config:  # SEDD's hub config
        return "sedd", "graph/noise sections"
    return None


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

def _read_model(family: str, src, config: dict | None, heads: int | None):
    """(settings, pure params) of the checkpoint as `family`, with the family/key checks."""
    from dlm_jax.models import convert
    src = src.renamed(convert.strip_prefix_name)
    is_gpt2 = any(k.endswith("wte.weight") for k in src)
    is_dit = "vocab_embed.embedding" in src
    if family == "gpt2" and not is_gpt2:
        raise ValueError(f"{src.where}: --from gpt2, but the checkpoint has no wte.weight"
                         + (" (it has DiT keys: vocab_embed.embedding, blocks.*)" if is_dit
                            else ""))
    if family != "gpt2" and not is_dit:
        raise ValueError(f"{src.where}: --from {family}, but the checkpoint has no "
                         f"vocab_embed.embedding" + (" (it has GPT-2 keys: try --from gpt2)"
                                                     if is_gpt2 else ""))
    declared = declared_family(config)
    if declared and declared[0] != family:
        raise ValueError(f"{src.where}: the checkpoint's config declares a {declared[0]} model "
                         f"({declared[1]}), but --from {family}")
    if family == "gpt2":
        from dlm_jax.models.gpt2 import gpt2_from_state_dict
        heads = heads or (config or {}).get("n_head")
        if not heads:
            raise ValueError(f"{src.where}: GPT-2's head count is not in the tensors: pass "
                             f"--heads (or use a directory with its config.json)")
        return gpt2_from_state_dict(src, heads=int(heads))
    heads = heads or _find(config or {}, "n_heads")  # HF BD3LM / MDLM configs carry it
    settings = convert.dit_settings(src, heads=heads)
    if settings["causal"]:
        raise ValueError(f"{src.where}: the DiT has no sigma_map / adaLN: an autoregressive "
                         f"DiT, not a {family} model")
    return convert.dit_params(src, settings)


def _set(cfg, dotted: str, raw) -> None:
    from dlm_jax.config import ConfigError
    section, _, key = dotted.partition(".")
    target = getattr(cfg, section, None)
    if target is None or not dataclasses.is_dataclass(target) or not hasattr(target, key):
        raise ConfigError(f"--set {dotted}: config.{dotted} is not a known key")
    kind = type(getattr(target, key))
    if isinstance(raw, str) and kind is not str:
        try:
            raw = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"--set {dotted}={raw!r}: not a {kind.__name__}") from None
    setattr(target, key, raw)


def import_config(family: str, settings: dict, config: dict | None, *, block_size=None,
                  seq_len=None, tokenizer=None, tokenizer_path=None, sets=()):
    """The dlm_jax Config of an imported model: family, sizes from `settings`, the rest from the
    checkpoint's `config`, the arguments and `sets` ("section.key=value")."""
    from dlm_jax.config import Config, ConfigError
    from dlm_jax.registry import apply_family
    cfg = Config(name=f"imported-{family}")
    process = None
    if family == "sedd":
        graph = _find(config or {}, "graph")
        kind = graph.get("type") if isinstance(graph, dict) else None
        process = {"absorb": "absorbing", "uniform": "uniform", None: "absorbing"}.get(kind)
        if process is None:
            raise ValueError(f"the SEDD checkpoint's graph.type={kind!r} is not absorb or uniform")
    if family == "bd3lm":
        block_size = block_size or _find(config or {}, "block_size")
        if not block_size:
            raise ValueError("--from bd3lm: the block size is not in the checkpoint (its config "
                             "has no block_size): pass --block_size")
    apply_family(cfg, "ar" if family == "gpt2" else family, block=int(block_size or 0),
                 process=process)
    m = cfg.model
    m.width, m.depth, m.heads = settings["width"], settings["depth"], settings["heads"]
    if family == "gpt2":
        m.arch, m.n_positions = "gpt2", settings["n_positions"]
        m.mlp_ratio = settings["mlp_hidden"] // settings["width"]
        if "layer_norm_eps" in settings:
            m.layer_norm_eps = settings["layer_norm_eps"]
        length = seq_len or settings["n_positions"]
    else:
        m.cond_dim, m.mlp_ratio = settings["cond_dim"], settings["mlp_ratio"]
        m.sigma_features = settings["sigma_features"]
        m.token_conditioning = False  # the reference averages a per-token σ over the sequence
        scale = _find(config or {}, "scale_by_sigma")
        if scale is not None:
            m.scale_by_sigma = bool(scale)
        tc = _find(config or {}, "time_conditioning")
        if tc is not None and family != "sedd":
            m.time_conditioning = bool(tc)
        period = _find(config or {}, "timestep_max_period")
        if period is not None:
            m.sigma_max_period = float(period)
        length = (seq_len or _find(config or {}, "model_length") or _find(config or {}, "length")
                  or 1024)
    cfg.data.seq_len = int(length)
    absorbing = family in ("mdlm", "bd3lm") or process == "absorbing"
    token_vocab = settings["vocab_size"] - (1 if absorbing else 0)
    if tokenizer is None and not any(s.startswith("data.") for s in sets):
        tokenizer = {50257: "gpt2", 258: "byte"}.get(token_vocab)
        if tokenizer is None:
            raise ValueError(f"the model has {token_vocab} token ids"
                             f"{' (plus the mask)' if absorbing else ''}: pass --tokenizer and "
                             f"--tokenizer_path (or --set data.…) for a tokenizer of that size")
    if tokenizer is not None:
        cfg.data.tokenizer = tokenizer
    if tokenizer_path is not None:
        cfg.data.tokenizer_path = tokenizer_path
    if cfg.data.tokenizer == "gpt2" and not cfg.data.tokenizer_path:
        raise ValueError("the GPT-2 tokenizer needs its local files: pass --tokenizer_path DIR "
                         "(encoder.json and vocab.bpe)")
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(cfg, key, value)
    return cfg


def to_device_leafwise(tree: dict) -> dict:
    """Replace every numpy leaf of a nested dict by a jax array, one at a time, in place: the
    numpy copy of a leaf is released before the next is converted (one copy of the parameters
    at any time, not two)."""
    import jax
    for key, value in tree.items():
        # Waiting for each transfer releases the numpy copy before the next one starts.
        tree[key] = (to_device_leafwise(value) if isinstance(value, dict)
                     else jax.block_until_ready(jax.device_put(value)))
    return tree


def import_checkpoint(family: str, checkpoint: str, out: str, *, heads=None, block_size=None,
                      seq_len=None, tokenizer=None, tokenizer_path=None, sets=(),
                      unsafe_pickle=False) -> dict:
    """Convert `checkpoint` (a `family` model) into the workdir `out`; returns a summary."""
    import jax
    import numpy as np

    from dlm_jax import registry
    from dlm_jax.checkpoint import save_params
    from dlm_jax.models import convert
    from dlm_jax.models.convert import open_checkpoint, shape_problems
    from dlm_jax.models.layout import stack_layers

    start = time.perf_counter()
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise ValueError(f"{out} already has checkpoints/: convert into a new directory")
    src, config = open_checkpoint(checkpoint, unsafe_pickle=unsafe_pickle)
    settings, params = _read_model(family, src, config, heads)
    cfg = import_config(family, settings, config, block_size=block_size, seq_len=seq_len,
                        tokenizer=tokenizer, tokenizer_path=tokenizer_path, sets=sets)
    if cfg.model.scan_layers:  # the converters give unrolled blocks; stack them as asked
        params = stack_layers(params)
    params = to_device_leafwise(params)
    names = {convert.strip_prefix_name(k): k for k in src}
    if family == "bd3lm" and {"sampling_eps_min", "sampling_eps_max"} <= names.keys():
        # HF BD3LM checkpoints carry the clipped schedule they were trained with.
        cfg.diffusion.clip = tuple(float(np.asarray(src[names[k]]).reshape(()))
                                   for k in ("sampling_eps_min", "sampling_eps_max"))
    exp = registry.build(cfg)
    want = exp.method.model_vocab(exp.token_vocab)
    if want != settings["vocab_size"]:
        raise ValueError(f"the checkpoint's vocabulary is {settings['vocab_size']}, but "
                         f"data.tokenizer={cfg.data.tokenizer!r} gives a model vocabulary of "
                         f"{want}: pick the tokenizer the model was trained with")
    problems = shape_problems(params, exp.abstract_params)
    if problems:  # only if the config and the settings disagree: say where
        raise ValueError("the converted parameters do not fit the config's model: "
                         + "; ".join(problems))
    os.makedirs(out, exist_ok=True)
    save_params(os.path.join(out, "checkpoints"), 0, params)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    n = sum(x.size for x in jax.tree.leaves(params))
    return {"from": family, "checkpoint": checkpoint, "workdir": out, "params": int(n),
            "seconds": round(time.perf_counter() - start, 3),
            "settings": {k: v for k, v in settings.items()}}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def export_run(workdir: str, path: str) -> dict:
    """Write the (EMA) parameters of `workdir`'s newest checkpoint to `path` (safetensors)
    under the reference names (either layer layout: the writers unstack); returns a summary."""
    import jax
    from safetensors.numpy import save_file

    from dlm_jax.evals import restore_run
    from dlm_jax.models.convert import dit_state_dict
    exp, _, step, state = restore_run(workdir)
    params = jax.device_get(state.eval_params)
    if exp.cfg.model.arch == "gpt2":
        from dlm_jax.models.gpt2 import gpt2_to_state_dict
        tensors = gpt2_to_state_dict(params)
    else:
        tensors = dit_state_dict(params)
    save_file(tensors, path, metadata={"dlm_jax.workdir": os.path.abspath(workdir),
                                       "dlm_jax.step": str(step)})
    return {"workdir": workdir, "step": step, "export": path, "tensors": len(tensors)}
