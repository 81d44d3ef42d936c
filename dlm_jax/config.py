"""Typed configuration schema and its validation.

`configs/*.py:get_config(arg)` returns a `Config`; ml_collections' `config_flags` overrides any
field from the command line (`--config.optim.lr=3e-4`). `validate()` then turns every bad value
into one `ConfigError` naming the key, the value and what is allowed. No logic beyond checks and
derived sizes lives here.

What is trained is `diffusion.objective` × `diffusion.process` × `diffusion.block_size`;
`registry.FAMILIES` holds the named presets (ar, mdlm, bd3lm, sedd, d3pm, ctmc, csm) and
`registry.METHODS` the objective → `Method` table. Every field can still be set on its own, so
combinations no paper ran are a config change.
"""

import dataclasses
import json
import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclasses.dataclass
class DataConfig:
    source: str = "stdlib"          # stdlib | text | tfds | markov | ordinal
    paths: tuple = ()               # text: files or globs
    tfds_name: str = ""             # tfds: dataset name (e.g. "lm1b")
    tfds_data_dir: str = ""
    text_key: str = "text"
    text_per_line: bool = False     # text: one document per line instead of per file
    validation_fraction: float = 0.02  # stdlib / text: share of documents in validation
    text_split: str = "auto"        # text: documents (by hash) | bytes (each file's last
                                    # validation_fraction) | auto (bytes when < 2 documents)
    tokenizer: str = "byte"         # byte | gpt2 (encoder.json + vocab.bpe) | hf (tokenizer.json)
    tokenizer_path: str = ""
    add_bos: bool = False           # put the tokenizer's BOS before every document
    add_eos: bool = True            # and its EOS after
    seq_len: int = 128
    mode: str = "wrap"              # wrap | pack
    pack_bins: int = 16             # pack: open bins of the streaming first-fit packer
    streams: int = 0                # tfds: record streams (0: the largest divisor of the
                                    # batch up to 16); a multiple of the host count
    max_bytes: int = 0              # cap on the corpus read (0: no cap)
    markov_order: int = 2
    markov_vocab: int = 8
    markov_seed: int = 0
    markov_num_tokens: int = 200_000
    markov_concentration: float = 0.1  # Dirichlet concentration of the chain's transition rows
    # ordinal: quantised sums of sinusoids drawn from `seed` (data.sources.ordinal_sequences);
    # token k stands for the value k, so the vocabulary is ordered (no tokenizer).
    ordinal_levels: int = 32        # quantisation levels = the vocabulary
    ordinal_components: int = 3     # sinusoids per sequence
    ordinal_noise: float = 0.5      # std of the added Gaussian noise, in level units
    ordinal_num_tokens: int = 200_000  # tokens generated per split
    num_threads: int = 2
    prefetch: int = 2
    seed: int = 0


# Activation rematerialisation of the transformer blocks (DiT `remat`): none, recompute each
# block in the backward pass, or recompute all but the matmul outputs (models/transformer.py maps
# each name to its `jax.checkpoint` policy).
REMAT_POLICIES = ("none", "block", "dots")

# model.attention: the backends of models/attention.py (which checks the platform at build).
ATTENTION_BACKENDS = ("xla", "dense", "splash", "cudnn")

# diffusion.objective: the keys of registry.METHODS.
OBJECTIVES = ("ar", "nelbo", "score_entropy", "d3pm", "ctmc", "csm")


@dataclasses.dataclass
class ModelConfig:
    size: str = "tiny"              # preset: tiny | bench | small | medium
    width: int = 0                  # 0: take the preset's value
    depth: int = 0
    heads: int = 0
    cond_dim: int = 0
    mlp_ratio: int = 4
    dropout: float = 0.0
    time_conditioning: bool = False
    token_conditioning: bool = True # with time conditioning and blocks: each block its own σ̄
    scale_by_sigma: bool = True     # SEDD absorbing log-score head: subtract log(expm1 σ̄)+log(S-1)
    sigma_features: int = 256       # σ embedder: sinusoid features (cos first) …
    sigma_max_period: float = 10000.0  # … with periods up to this
    compute_dtype: str = "float32"  # float32 | bfloat16 (params stay float32)
    remat: str = "none"              # none | block (recompute each block) | dots (keep matmul outputs)
    arch: str = "dit"               # dit | gpt2 (AR, or adapted masked diffusion: learned
                                    # positions, LN bias, tied head)
    n_positions: int = 0            # gpt2: learned position table (0: data.seq_len; validate
                                    # writes the resolved size back)
    layer_norm_eps: float = 1e-5    # gpt2: eps of every LayerNorm
    attention: str = "xla"          # xla (flash-style, every platform) | dense (the whole score
                                    # matrix) | splash (TPU Pallas kernel) | cudnn (GPU)
    scan_layers: bool = False       # the blocks as one lax.scan over stacked parameters


@dataclasses.dataclass
class DiffusionConfig:
    objective: str = "nelbo"        # ar | nelbo | score_entropy | d3pm | ctmc | csm
    process: str = "absorbing"      # absorbing | uniform
    schedule: str = "loglinear"     # loglinear | geometric | linear | cosine
    schedule_eps: float = 1e-3      # loglinear / cosine eps
    sigma_min: float = 1e-4         # geometric / linear
    sigma_max: float = 20.0
    block_size: int = 0             # 0: the whole sequence (plain diffusion)
    sampling_eps: float = 1e-3      # training times t ~ U[eps, 1] (unclipped)
    antithetic: bool = True         # stratified times over batch × blocks
    clip: tuple = (1e-3, 1.0)       # BD3-LM clipped schedule [beta_l, beta_u]
    resample: bool = False          # BD3-LM: realised mask fraction inside clip
    var_min: bool = False           # BD3-LM: search clip bounds minimising Var(NELBO) at eval
    clip_search_widths: tuple = (0.5, 0.6, 0.7, 0.8, 0.9)
    clip_search_delta: float = 0.05
    clip_search_batches: int = 4
    d3pm_steps: int = 1000
    d3pm_schedule: str = "auto"     # linear | cosine | jsd | auto (uniform: cosine, absorbing: jsd)
    hybrid_lambda: float = 0.01
    history_noise: tuple = ()       # ar over an ordinal vocabulary: train p(x_i | x̃_<i, σ) on
                                    # histories x̃ = x + σ·ε, σ drawn per sequence from these
                                    # levels (level units); () off. Enables sampler "langevin"
    csm_estimator: str = "exact"    # csm: exact (all L·(V-1) neighbours) | sampled (one of each)
    # AR → diffusion adaptation and joint training (nelbo / score_entropy):
    shift: bool = False             # the prediction for token i is read at row i − 1 (a block's
                                    # first row reads itself), the AR head's alignment
    mask_anneal_steps: int = 0      # training attention inside a block widens from causal to
                                    # bidirectional over this many steps (0: bidirectional)
    ar_weight: float = 0.0          # joint training: + ar_weight × the AR NLL of a causal pass
                                    # of the same network


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: str = "constant"         # constant | cosine
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # global norm; 0 disables
    ema_decay: float = 0.9999       # 0 disables EMA
    accum_steps: int = 1            # gradient accumulation (microbatches per step)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32            # global batch (sequences)
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 8
    eval_t_samples: int = 1         # time draws per sequence in validation (diffusion)
    eval_times: str = "stratified"  # validation time scheme: iid | stratified | quadrature
    ckpt_every: int = 500
    keep: int = 3
    stop_check_every: int = 10      # several hosts: agree on a SIGTERM every this many steps
    async_checkpoint: bool = True
    tensorboard: bool = False
    profile_steps: tuple = ()       # (start, stop) to capture a jax.profiler trace
    final_samples: int = 0          # samples printed when training ends (sampling section)
    init_from: str = ""             # a new run starts from the (EMA) params of this run's newest
                                    # checkpoint (a trained run or a dlm_jax.convert import)


@dataclasses.dataclass
class MeshConfig:
    shape: tuple = (-1, 1, 1)       # (data, fsdp, tensor); one -1 takes the remaining devices
    axes: tuple = ("data", "fsdp", "tensor")
    # logical parameter axis -> mesh axes (None: replicated)
    rules: tuple = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("qkv", None),
        ("kv", None),
        ("cond", None),
        ("layers", None),
    )


@dataclasses.dataclass
class SamplingConfig:
    sampler: str = "auto"           # auto (the family default) | ar | jacobi | ancestral | …
                                    # | the samplers of dlm_jax.samplers.SAMPLERS
    steps: int = 0                  # denoising steps (per block with blocks); 0: the block length
    length: int = 0                 # tokens per sample; 0: data.seq_len
    num_samples: int = 8
    batch_size: int = 8             # samples generated together
    temperature: float = 1.0
    top_k: int = 0                  # 0: off
    top_p: float = 1.0              # nucleus (1: off)
    kv_cache: bool = True           # BD3-LM / AR: cache the clean prefix
    skip_unchanged: bool = True     # reuse p_θ while a step changes nothing (only without time
                                    # conditioning, where that is exact)
    window: int = 0                 # AR "jacobi": tokens per window through the KV cache
                                    # (0: the whole length at once, uncached)
    drafter: str = ""               # AR "speculative" / "mh": a masked-diffusion run (workdir)
                                    # that drafts / proposes, over the same tokenizer
    draft_tokens: int = 4           # speculative: tokens per draft; mh: positions per proposal
    mh_proposal: str = "masked"     # mh: masked (the drafter re-draws draft_tokens positions) |
                                    # uniform (one position, a uniform token); steps: MH steps
    step_size: float = 0.1          # langevin: η = step_size·σ² per update at noise level σ
                                    # (steps: updates per level of diffusion.history_noise)
    stop_at_eos: bool = False       # variable length: cut each sample after its first EOS
    stop_entropy: float = 0.0       # variable length: stop when the last 256 tokens' entropy
                                    # (nats) falls below this (0: off)
    seed: int = 0


@dataclasses.dataclass
class Config:
    name: str = "run"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Inverse of `to_dict` (e.g. a run's config.json); unknown keys raise ConfigError."""
        def build(kind, vals, prefix):
            fields = {f.name: f for f in dataclasses.fields(kind)}
            kwargs = {}
            for k, v in vals.items():
                if k not in fields:
                    raise ConfigError(f"config.{prefix}{k} is not a known key")
                default = getattr(kind(), k)
                if dataclasses.is_dataclass(default):
                    v = build(type(default), v, f"{prefix}{k}.")
                elif isinstance(default, tuple) and isinstance(v, list):
                    v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
                kwargs[k] = v
            return kind(**kwargs)
        return build(cls, values, "")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _check(cond: bool, key: str, value, what: str) -> None:
    if not cond:
        raise ConfigError(f"config.{key}={value!r}: {what}")


def block_size(cfg: Config) -> int:
    """The effective block size: `diffusion.block_size`, or the sequence length when 0."""
    return cfg.diffusion.block_size or cfg.data.seq_len


def validate(cfg: Config) -> Config:
    """Check every field; raise ConfigError naming the first bad key. Returns cfg."""
    d, m, df, o, t, mesh = cfg.data, cfg.model, cfg.diffusion, cfg.optim, cfg.train, cfg.mesh
    _choice("data.source", d.source, {"stdlib", "text", "tfds", "markov", "ordinal"})
    _choice("data.tokenizer", d.tokenizer, {"byte", "gpt2", "hf"})
    _choice("data.mode", d.mode, {"wrap", "pack"})
    _check(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be >= 2")
    _choice("data.text_split", d.text_split, {"auto", "documents", "bytes"})
    _check(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", d.validation_fraction,
           "must be in (0, 1)")
    if d.source == "text":
        _check(len(d.paths) > 0, "data.paths", d.paths, "source 'text' needs at least one path or glob")
    if d.source == "tfds":
        _check(bool(d.tfds_name), "data.tfds_name", d.tfds_name, "source 'tfds' needs a dataset name")
    if d.tokenizer in ("gpt2", "hf"):
        _check(bool(d.tokenizer_path), "data.tokenizer_path", d.tokenizer_path,
               f"tokenizer {d.tokenizer!r} needs local files (hub downloads are not possible)")
    if d.source == "markov":
        _check(d.markov_vocab >= 2, "data.markov_vocab", d.markov_vocab, "must be >= 2")
        _check(d.markov_order >= 1, "data.markov_order", d.markov_order, "must be >= 1")
    if d.source == "ordinal":
        _check(2 <= d.ordinal_levels <= 65536, "data.ordinal_levels", d.ordinal_levels,
               "must be in [2, 65536]")
        _check(d.ordinal_components >= 1, "data.ordinal_components", d.ordinal_components,
               "must be >= 1")
        _check(math.isfinite(d.ordinal_noise) and d.ordinal_noise >= 0, "data.ordinal_noise",
               d.ordinal_noise, "must be finite and >= 0 (level units)")
        _check(d.ordinal_num_tokens >= d.seq_len, "data.ordinal_num_tokens",
               d.ordinal_num_tokens, f"must be >= data.seq_len={d.seq_len}")

    _choice("model.size", m.size, {"tiny", "bench", "small", "medium"})
    _choice("model.compute_dtype", m.compute_dtype, {"float32", "bfloat16"})
    _choice("model.remat", m.remat, set(REMAT_POLICIES))
    _choice("model.attention", m.attention, set(ATTENTION_BACKENDS))
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    for key in ("width", "depth", "heads", "cond_dim", "mlp_ratio"):
        _check(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    _check(m.sigma_features >= 2, "model.sigma_features", m.sigma_features, "must be >= 2")
    _check(m.sigma_max_period > 1.0, "model.sigma_max_period", m.sigma_max_period,
           "must be > 1")
    _choice("model.arch", m.arch, {"dit", "gpt2"})
    _check(m.n_positions >= 0, "model.n_positions", m.n_positions, "must be >= 0 (0: data.seq_len)")
    _check(m.layer_norm_eps > 0, "model.layer_norm_eps", m.layer_norm_eps, "must be > 0")

    _choice("diffusion.objective", df.objective, set(OBJECTIVES))
    _choice("diffusion.process", df.process, {"absorbing", "uniform"})
    _choice("diffusion.schedule", df.schedule, {"loglinear", "geometric", "linear", "cosine"})
    _choice("diffusion.d3pm_schedule", df.d3pm_schedule, {"linear", "cosine", "jsd", "auto"})
    if df.objective == "nelbo":
        _check(df.process == "absorbing", "diffusion.process", df.process,
               "objective 'nelbo' (masked NELBO) needs the absorbing process")
    _choice("diffusion.csm_estimator", df.csm_estimator, {"exact", "sampled"})
    bs = block_size(cfg)
    _check(bs >= 1 and d.seq_len % bs == 0, "diffusion.block_size", df.block_size,
           f"must divide data.seq_len={d.seq_len} (0 means the whole sequence)")
    _check(0.0 < df.sampling_eps < 1.0, "diffusion.sampling_eps", df.sampling_eps, "must be in (0, 1)")
    lo, hi = df.clip
    _check(0.0 <= lo <= hi <= 1.0, "diffusion.clip", df.clip, "needs 0 <= beta_l <= beta_u <= 1")
    if df.objective in ("ctmc", "csm"):
        _check(bs == d.seq_len, "diffusion.block_size", df.block_size,
               f"objective {df.objective!r} trains whole sequences (0 or data.seq_len)")
    if df.resample:
        _check(df.process == "absorbing", "diffusion.resample", df.resample,
               "mask-fraction resampling needs the absorbing process")
    if df.var_min:
        _check(df.objective in ("nelbo", "score_entropy") and df.process == "absorbing",
               "diffusion.var_min", df.var_min, "the clip search needs a continuous-time "
               "objective (nelbo or score_entropy) over the absorbing process")
    _check(df.d3pm_steps >= 1, "diffusion.d3pm_steps", df.d3pm_steps, "must be >= 1")
    _check(df.mask_anneal_steps >= 0, "diffusion.mask_anneal_steps", df.mask_anneal_steps,
           "must be >= 0")
    _check(df.ar_weight >= 0, "diffusion.ar_weight", df.ar_weight, "must be >= 0")
    for key in ("shift", "mask_anneal_steps", "ar_weight"):
        if getattr(df, key):
            _check(df.objective in ("nelbo", "score_entropy"), f"diffusion.{key}",
                   getattr(df, key), "AR adaptation and joint training apply to the continuous-"
                   f"time objectives 'nelbo' and 'score_entropy', not {df.objective!r}")
    _check(df.hybrid_lambda >= 0, "diffusion.hybrid_lambda", df.hybrid_lambda, "must be >= 0")
    if df.history_noise:
        _check(isinstance(df.history_noise, tuple) and all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in df.history_noise),
            "diffusion.history_noise", df.history_noise,
            "must be a tuple of finite noise levels σ > 0 (level units)")
        _check(df.objective == "ar", "diffusion.history_noise", df.history_noise,
               f"noisy histories train the AR objective (diffusion.objective='ar'), not "
               f"{df.objective!r}")
        _check(d.source == "ordinal", "diffusion.history_noise", df.history_noise,
               f"x + σ·ε needs an ordinal vocabulary (token k = value k): data.source="
               f"'ordinal', not {d.source!r}")
        _check(m.arch == "dit", "diffusion.history_noise", df.history_noise,
               f"the noise-level input is an option of the DiT, not model.arch={m.arch!r}")

    _check(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be finite and > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _choice("optim.decay", o.decay, {"constant", "cosine"})
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", o.ema_decay, "must be in [0, 1)")
    _check(o.accum_steps >= 1, "optim.accum_steps", o.accum_steps, "must be >= 1")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")

    _check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.batch_size % o.accum_steps == 0, "train.batch_size", t.batch_size,
           f"must be divisible by optim.accum_steps={o.accum_steps}")
    for key in ("log_every", "eval_every", "ckpt_every", "keep", "stop_check_every"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    _check(t.eval_batches >= 1, "train.eval_batches", t.eval_batches, "must be >= 1")
    _check(isinstance(t.eval_t_samples, int) and t.eval_t_samples >= 1, "train.eval_t_samples",
           t.eval_t_samples, "must be an integer >= 1")
    _choice("train.eval_times", t.eval_times, {"iid", "stratified", "quadrature"})
    _check(t.final_samples >= 0, "train.final_samples", t.final_samples, "must be >= 0")

    _check(len(mesh.shape) == len(mesh.axes) == 3, "mesh.shape", mesh.shape,
           f"needs one size per axis of {mesh.axes}")
    _check(list(mesh.shape).count(-1) <= 1, "mesh.shape", mesh.shape, "at most one -1")
    _check(all(s == -1 or s >= 1 for s in mesh.shape), "mesh.shape", mesh.shape,
           "sizes must be >= 1 or -1")

    sm = cfg.sampling
    for key in ("steps", "length", "top_k", "window"):
        _check(getattr(sm, key) >= 0, f"sampling.{key}", getattr(sm, key), "must be >= 0 (0: auto/off)")
    _choice("sampling.mh_proposal", sm.mh_proposal, {"masked", "uniform"})
    for key in ("num_samples", "batch_size", "draft_tokens"):
        _check(getattr(sm, key) >= 1, f"sampling.{key}", getattr(sm, key), "must be >= 1")
    _check(0.0 < sm.top_p <= 1.0, "sampling.top_p", sm.top_p, "must be in (0, 1]")
    _check(sm.temperature >= 0.0, "sampling.temperature", sm.temperature, "must be >= 0")
    _check(sm.stop_entropy >= 0.0, "sampling.stop_entropy", sm.stop_entropy, "must be >= 0")
    _check(math.isfinite(sm.step_size) and sm.step_size > 0, "sampling.step_size", sm.step_size,
           "must be finite and > 0")

    if m.arch == "gpt2":
        _check(df.objective in ("ar", "nelbo"), "model.arch", m.arch,
               f"GPT-2 is the AR model, or (adapted) the denoiser of masked diffusion: it needs "
               f"diffusion.objective 'ar' or 'nelbo', not {df.objective!r}")
        _check(df.objective == "ar" or not m.time_conditioning, "model.time_conditioning",
               m.time_conditioning, "GPT-2 has no σ input (masked diffusion without time "
               "conditioning, as MDLM / BD3-LM train)")
        _check(m.n_positions == 0 or m.n_positions >= d.seq_len, "model.n_positions",
               m.n_positions, f"GPT-2's position table must cover data.seq_len={d.seq_len} "
               f"(0: exactly that)")
        # A derived size, written back so that config.json records the table the params have.
        m.n_positions = m.n_positions or d.seq_len
        _check((sm.length or d.seq_len) <= m.n_positions, "sampling.length", sm.length,
               f"GPT-2 cannot generate past its n_positions={m.n_positions} learned positions")
    return cfg


def parse_arg(arg: str | None, *, positional: tuple[str, ...], options: dict[str, type],
              where: str) -> tuple[list[str], dict[str, Any]]:
    """Parse a config file's argument "a,b,key=value,…" (`configs/x.py:a,b,key=value`).

    `positional` gives the defaults of the leading values (missing ones take them), `options`
    the known keys and their types. An unknown key or a bad value is a ConfigError naming
    `where` (the config file) and the allowed keys.
    """
    parts = [p for p in (arg or "").split(",") if p]
    values = [p for p in parts if "=" not in p]
    if len(values) > len(positional):
        raise ConfigError(f"{where}: too many positional values {values}; expected at most "
                          f"{len(positional)} ({', '.join(positional)}) then key=value options")
    values += list(positional[len(values):])
    opts: dict[str, Any] = {}
    for p in parts:
        if "=" not in p:
            continue
        key, _, value = p.partition("=")
        if key not in options:
            import difflib
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}; known options: "
                              f"{', '.join(sorted(options))}")
        try:
            opts[key] = options[key](value)
        except ValueError:
            raise ConfigError(f"{where}: option {key}={value!r} must be a "
                              f"{options[key].__name__}") from None
    return values, opts


# Fields a resumed run may not change: they change the parameters' shapes or meaning, the
# vocabulary, the process or the blocks (the checkpoint would not fit, or would mean something
# else). Any other change (lr, steps, cadences, data order, mesh) is allowed and reported;
# model.scan_layers among them: restoring converts the blocks' layer layout (checkpoint.py).
RESUME_FIXED = (
    "model.size", "model.width", "model.depth", "model.heads", "model.cond_dim",
    "model.mlp_ratio", "model.time_conditioning", "model.token_conditioning",
    "model.scale_by_sigma", "model.sigma_features", "model.sigma_max_period", "model.arch",
    "model.n_positions", "model.layer_norm_eps",
    "diffusion.objective", "diffusion.process", "diffusion.block_size",
    "diffusion.d3pm_steps", "diffusion.d3pm_schedule", "diffusion.shift", "data.source",
    "data.tokenizer",
    "data.tokenizer_path", "data.markov_vocab", "data.ordinal_levels", "diffusion.history_noise",
)


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(fixed, allowed): "key: old -> new" lines between two `Config.to_dict()`s (or their JSON).

    `fixed` lists changes of `RESUME_FIXED` fields and of optimizer settings that change the
    train state's structure (EMA or gradient clipping switched on or off)."""
    def norm(v):
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
    # A key an older version did not write has its default (what that version did).
    old = Config.from_dict(old).to_dict()
    a = {k: norm(v) for k, v in _flatten(old).items()}
    b = {k: norm(v) for k, v in _flatten(new).items()}
    fixed, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        structural = (key in ("optim.ema_decay", "optim.grad_clip")
                      and ((a.get(key) or 0) > 0) != ((b.get(key) or 0) > 0))
        (fixed if key in RESUME_FIXED or structural else allowed).append(line)
    return fixed, allowed
