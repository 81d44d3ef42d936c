"""The one place where config strings become components: `METHODS`, `FAMILIES` and `build(cfg)`.

`build(cfg)` resolves a validated `Config` once into an `Experiment` — tokenizer, method (with
its process and schedule), the model's graph definition and abstract parameters, the mesh and
shardings — which training, evaluation, benchmarks and sampling share. A family (`FAMILIES`) is
a preset of objective × process × block size; every field stays settable on its own, so
combinations no paper ran (block diffusion with score entropy over a uniform process) are a
config change.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Callable

import jax
from flax import nnx

from dlm_jax import sharding
from dlm_jax.config import Config, ConfigError, OBJECTIVES, block_size, validate
from dlm_jax.methods import (Autoregressive, ConcreteScoreMatching, ContinuousTimeELBO,
                             DiscreteTime, Masked, Method, ScoreEntropy)
from dlm_jax.methods.csm import MAX_EXACT_NEIGHBOURS
from dlm_jax.models.attention import check_backend
from dlm_jax.models.kernels import SPLASH_TILES
from dlm_jax.models.transformer import DiT, build_model, model_dims
from dlm_jax.processes import schedules, transitions
from dlm_jax.processes.d3pm import D3PM


# ---------------------------------------------------------------------------------------------
# Families: presets of (objective, process, block size) and their published settings
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """objective; fixed_block (AR: 1); time_conditioning of the model; per-process overrides;
    `paper`: the published settings that `configs/presets.py` adds (dotted key → value)."""

    objective: str
    fixed_block: int | None = None
    time_conditioning: bool = False
    per_process: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    paper: tuple[tuple[str, Any], ...] = ()


FAMILIES: dict[str, Family] = {
    "ar": Family("ar", fixed_block=1),
    "mdlm": Family("nelbo"),
    "bd3lm": Family("nelbo", paper=(("diffusion.resample", True), ("diffusion.var_min", True),
                                    ("diffusion.clip_search_batches", 100),
                                    ("train.steps", 150_000))),  # fine-tuned from block L
    "sedd": Family("score_entropy", time_conditioning=True,
                   per_process=(("uniform", (("diffusion.schedule", "geometric"),)),)),
    "d3pm": Family("d3pm", time_conditioning=True,
                   paper=(("diffusion.d3pm_steps", 1000), ("diffusion.hybrid_lambda", 0.01))),
    "ctmc": Family("ctmc", time_conditioning=True),
    "csm": Family("csm"),
}


def set_fields(cfg: Config, values) -> Config:
    """Set dotted fields ("diffusion.resample", True) on cfg; an unknown key is a ConfigError."""
    for dotted, value in values:
        section, _, key = dotted.partition(".")
        target = getattr(cfg, section, None)
        if target is None or not hasattr(target, key):
            raise ConfigError(f"config.{dotted} is not a known key")
        setattr(target, key, value)
    return cfg


def apply_family(cfg: Config, family: str, *, block: int = 0, process: str | None = None
                 ) -> Config:
    """Set the objective, process, block size and model conditioning that define `family`."""
    if family not in FAMILIES:
        close = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"family {family!r} is not known{hint}; choose one of "
                          f"{sorted(FAMILIES)}")
    fam = FAMILIES[family]
    df = cfg.diffusion
    df.objective = fam.objective
    df.block_size = fam.fixed_block if fam.fixed_block is not None else block
    if process is not None:
        df.process = process
    cfg.model.time_conditioning = fam.time_conditioning
    return set_fields(cfg, dict(fam.per_process).get(df.process, ()))


# What an adapted diffusion model takes from the AR run's model section.
ADAPTED_MODEL_KEYS = ("arch", "size", "width", "depth", "heads", "mlp_ratio", "n_positions",
                      "layer_norm_eps")


def apply_adaptation(cfg: Config, ar_run: str = "", *, anneal_steps: int = 0,
                     ar_weight: float = 0.0) -> Config:
    """The AR → diffusion presets, on a config of a continuous-time family (mdlm, bd3lm, sedd).

    ar_run: start from that AR run's weights (`train.init_from`; `models.adapt`), read the
    predictions with the shift (`diffusion.shift`) and widen the training attention from causal
    to the family's mask over `anneal_steps` (Gong et al., 2025, "Scaling Diffusion Language
    Models via Adaptation from Autoregressive Models"). ar_weight > 0: joint training, the AR
    NLL of a causal pass added with this weight (`diffusion.ar_weight`), also with the shift so
    both objectives read a position's prediction at the same row. The AR run's architecture (`ADAPTED_MODEL_KEYS` of its config.json, when it exists) is
    copied, so its weights fit: a GPT-2 import adapts into the bidirectional GPT-2.
    """
    if ar_run:
        cfg.train.init_from = ar_run
        cfg.diffusion.mask_anneal_steps = anneal_steps
        path = os.path.join(ar_run, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                model = json.load(f).get("model", {})
            for key in ADAPTED_MODEL_KEYS:
                if key in model:
                    setattr(cfg.model, key, model[key])
    cfg.diffusion.ar_weight = ar_weight
    cfg.diffusion.shift = bool(ar_run) or ar_weight > 0
    return cfg


# ---------------------------------------------------------------------------------------------
# Methods: objective -> Method, built from the config
# ---------------------------------------------------------------------------------------------

def build_schedule(cfg: Config) -> schedules.Schedule:
    """The continuous-time noise schedule (training times come from `diffusion.clip`)."""
    df = cfg.diffusion
    if df.schedule in ("loglinear", "cosine"):
        return schedules.make_schedule(df.schedule, eps=df.schedule_eps)
    return schedules.make_schedule(df.schedule, sigma_min=df.sigma_min, sigma_max=df.sigma_max)


def _continuous(cfg: Config, token_vocab: int) -> dict:
    df = cfg.diffusion
    return dict(process=transitions.make_process(df.process, token_vocab),
                schedule=build_schedule(cfg), seq_len=cfg.data.seq_len,
                block_size=block_size(cfg), sampling_eps=df.sampling_eps,
                antithetic=df.antithetic, resample=df.resample, shift=df.shift,
                anneal_steps=df.mask_anneal_steps, ar_weight=df.ar_weight)


def _d3pm(cfg: Config, token_vocab: int) -> DiscreteTime:
    df = cfg.diffusion
    schedule = None if df.d3pm_schedule == "auto" else df.d3pm_schedule
    process = D3PM(kind=df.process, vocab_size=token_vocab, num_steps=df.d3pm_steps,
                   schedule=schedule)
    return DiscreteTime(process=process, hybrid_lambda=df.hybrid_lambda)


def _csm(cfg: Config, token_vocab: int) -> ConcreteScoreMatching:
    L, est = cfg.data.seq_len, cfg.diffusion.csm_estimator
    neighbours = L * (token_vocab - 1)
    if est == "exact" and neighbours > MAX_EXACT_NEIGHBOURS:
        raise ConfigError(
            f"config.diffusion.csm_estimator='exact' runs the model at all data.seq_len × "
            f"(vocab − 1) = {L} × {token_vocab - 1} = {neighbours} Hamming neighbours of each "
            f"sequence, more than {MAX_EXACT_NEIGHBOURS}: use a small vocabulary (e.g. "
            f"data.source='markov') or csm_estimator='sampled'")
    return ConcreteScoreMatching(num_states=token_vocab, seq_len=L, estimator=est)


METHODS: dict[str, Callable[[Config, int], Method]] = {
    "ar": lambda cfg, vocab: Autoregressive(
        history_noise=tuple(float(v) for v in cfg.diffusion.history_noise)),
    "nelbo": lambda cfg, vocab: Masked(**_continuous(cfg, vocab)),
    "score_entropy": lambda cfg, vocab: ScoreEntropy(**_continuous(cfg, vocab),
                                                     scale_by_sigma=cfg.model.scale_by_sigma),
    "d3pm": _d3pm,
    "ctmc": lambda cfg, vocab: ContinuousTimeELBO(
        process=transitions.make_process(cfg.diffusion.process, vocab),
        schedule=build_schedule(cfg), antithetic=cfg.diffusion.antithetic),
    "csm": _csm,
}
assert set(METHODS) == set(OBJECTIVES), "config.OBJECTIVES and registry.METHODS disagree"


def build_method(cfg: Config, token_vocab: int) -> Method:
    """The `Method` of `diffusion.objective` over `token_vocab` real tokens."""
    return METHODS[cfg.diffusion.objective](cfg, token_vocab)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def build_tokenizer(cfg: Config):
    """The tokenizer named by `data.tokenizer` (None for the synthetic Markov and ordinal
    sources, which yield token ids)."""
    from dlm_jax.data.pipeline import TOKEN_SOURCES
    from dlm_jax.data.tokenizers import make_tokenizer
    if cfg.data.source in TOKEN_SOURCES:
        return None
    return make_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------

def _new_model(cfg: Config, method: Method, token_vocab: int, seed: int) -> DiT:
    rules = dict(cfg.mesh.rules)
    return build_model(cfg.model, vocab_size=method.model_vocab(token_vocab),
                       causal=method.causal, history_noise=bool(cfg.diffusion.history_noise),
                       batch_axes=sharding.mesh_axes_for("batch", rules),
                       head_axes=sharding.mesh_axes_for("heads", rules), rngs=nnx.Rngs(seed))


# Parameter subtrees read by a lookup, not a matmul: the DiT's token embedding and GPT-2's
# position table (GPT-2's token table is also its tied output head, so it counts).
GATHER_TABLES = ("embed", "wpe")
# The DiT's σ conditioning: the σ embedding and the adaLN modulations it feeds, applied once per
# sequence when σ is one per sequence.
CONDITIONING = ("sigma_map", "adaln")
# The output layers (the DiT's final layer, GPT-2's tied head), and the parts of a block that
# act on query rows only (attention output, MLP): a two-pass forward applies these to its noisy
# rows only, in the last layer.
OUTPUT_LAYERS = ("final", "wte")
QUERY_ROW_PARTS = ("out", "mlp")


def matmul_params(params: dict, *, depth: int,
                  per_token_sigma: bool) -> tuple[int, int, int]:
    """(N, N_q, N_c) of a model's parameter tree for `Method.flops_per_token`.

    N: the weights every token's row is multiplied by in a forward: matrices only (biases and
    norm scales are elementwise), without the gathered input tables (`GATHER_TABLES`) and,
    unless σ is per token, without the σ conditioning (`CONDITIONING`: a per-sequence matmul).
    N_q: those of N a two-pass forward applies to its query (noisy) rows only — the output
    layer and the last block's attention output and MLP. N_c: the σ conditioning's share of
    N (0 unless σ is per token). Either block layout (a list of depth blocks, or stacked
    (depth, …) parameters) counts the same.
    """
    n = n_q = n_c = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(p, "key", getattr(p, "idx", p)) for p in path]
        size = math.prod(leaf.shape)
        elementwise = len(leaf.shape) < 2 or str(names[-1]).endswith("bias")
        if elementwise or names[0] in GATHER_TABLES:
            continue
        if any(name in CONDITIONING for name in names):
            if not per_token_sigma:
                continue
            n_c += size
        n += size
        if names[0] in OUTPUT_LAYERS:
            n_q += size
        elif names[0] == "blocks" and any(name in QUERY_ROW_PARTS for name in names):
            stacked = not isinstance(names[1], int)
            if stacked:
                n_q += size // depth
            elif names[1] == depth - 1:
                n_q += size
    return n, n_q, n_c


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything resolved from one config, shared by train, evaluate, bench and sample.

    params are pure dicts (`nnx.to_pure_dict`); `abstract_params` holds their
    ShapeDtypeStructs and `param_shardings` their NamedShardings on `mesh`.
    """

    cfg: Config
    tokenizer: Any
    token_vocab: int
    method: Method
    graphdef: Any
    abstract_params: Any
    mesh: jax.sharding.Mesh
    param_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    num_params: int

    def new_model(self, seed: int) -> DiT:
        """A freshly initialised model (parameters from `seed`)."""
        return _new_model(self.cfg, self.method, self.token_vocab, seed)

    def model(self, params) -> DiT:
        """The model with `params` (a pure dict), e.g. inside a jitted function."""
        return nnx.merge(self.graphdef, params)

    def flops_per_token(self) -> float:
        """The method's training FLOPs per token with the configured attention backend, over
        the weights each token's row is multiplied by (`matmul_params`)."""
        model = self.cfg.model
        dims = model_dims(model)
        # as the DiT conditions (GPT-2 has no σ conditioning, and refuses time_conditioning)
        per_token_sigma = (self.method.per_token_sigma and model.time_conditioning
                           and model.token_conditioning)
        n, n_q, n_c = matmul_params(self.abstract_params, depth=dims["depth"],
                                    per_token_sigma=per_token_sigma)
        return self.method.flops_per_token(num_params=n, depth=dims["depth"],
                                           width=dims["width"], seq_len=self.cfg.data.seq_len,
                                           attention=model.attention, query_params=n_q,
                                           conditioning_params=n_c)

    def dataset(self, split: str, *, global_batch: int, repeat: bool, shuffle: bool = True):
        """This host's grain pipeline for `split` (train / validation)."""
        from dlm_jax.data.pipeline import make_dataset
        return make_dataset(self.cfg.data, split=split, global_batch=global_batch,
                            tokenizer=self.tokenizer, shuffle=shuffle, repeat=repeat,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())


def build(cfg: Config, devices=None, *, platform: str | None = None) -> Experiment:
    """Validate `cfg` and resolve it into an `Experiment` (no parameters are allocated).

    platform: the platform the run is for, against which `model.attention` is checked (default:
    the devices'); `--compile_only --platform tpu|gpu` builds for it over fake CPU devices."""
    from dlm_jax.data.pipeline import dataset_vocab_size
    validate(cfg)
    tokenizer = build_tokenizer(cfg)
    token_vocab = dataset_vocab_size(cfg.data.source, tokenizer,
                                     markov_vocab=cfg.data.markov_vocab,
                                     ordinal_levels=cfg.data.ordinal_levels)
    method = build_method(cfg, token_vocab)
    if cfg.data.mode not in method.data_modes:
        raise ConfigError(f"config.data.mode={cfg.data.mode!r} is not supported by objective "
                          f"{cfg.diffusion.objective!r} ({method.name}); it supports "
                          f"{list(method.data_modes)}")
    if method.time_schemes and cfg.train.eval_times not in method.time_schemes:
        raise ConfigError(f"config.train.eval_times={cfg.train.eval_times!r} is not available "
                          f"for {method.name}; it supports {list(method.time_schemes)}")
    mesh = sharding.make_mesh(cfg.mesh, devices)
    try:
        check_backend(cfg.model.attention, platform or mesh.devices.flat[0].platform)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if cfg.model.attention == "splash" and cfg.data.seq_len % SPLASH_TILES[-1]:
        raise ConfigError(f"config.model.attention='splash' needs config.data.seq_len to be a "
                          f"multiple of {SPLASH_TILES[-1]} (got {cfg.data.seq_len}); use 'xla'")
    rules = tuple(cfg.mesh.rules)
    shards = sharding.batch_divisor(mesh, rules)
    if cfg.train.batch_size % (shards * cfg.optim.accum_steps):
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"the batch shards ({shards}) × config.optim.accum_steps "
                          f"({cfg.optim.accum_steps})")
    abstract_model = nnx.eval_shape(lambda: _new_model(cfg, method, token_vocab, cfg.train.seed))
    graphdef, abstract_state = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_state)
    return Experiment(
        cfg=cfg, tokenizer=tokenizer, token_vocab=token_vocab, method=method, graphdef=graphdef,
        abstract_params=abstract_params, mesh=mesh,
        param_shardings=sharding.param_shardings(abstract_state, mesh, rules),
        batch_sharding=sharding.batch_sharding(mesh, rules),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params)))
