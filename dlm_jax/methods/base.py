"""What a family is: the `Method` interface, and the continuous-time machinery several share.

A `Method` gathers, in one object of plain functions, everything that depends on the family:

  * the model it needs: `causal`, and `model_vocab(token_vocab)` (the state count, the mask
    included where the process has one);
  * `loss(model, batch, key, *, train, clip=None, step=None) -> (scalar, metrics)`: the mean
    per-token objective in nats/token over the batch's real tokens (metrics hold scalars, "loss"
    among them). `clip` is the training time interval (2,) of a clipped schedule (BD3-LM) and
    `step` the training step (attention-mask annealing), both traced;
  * `denoiser(model) -> Denoiser`: what samplers call, with its documented meaning;
  * `flops_per_token(...)`: the matmul and attention FLOPs one training token costs, counting
    the attention that is actually computed;
  * `data_modes`: the data pipeline modes its loss supports; `likelihood_bound`: whether the
    evaluation loss bounds the negative log-likelihood (so perplexity and bits are meaningful);
  * `sequence_loss(model, batch, key, *, t_samples, times) -> (sums (B,), tokens (B,), metrics)`:
    the evaluation objective per sequence (its sum in nats over the sequence's real tokens, and
    their count), averaged over `t_samples` time draws of scheme `times`
    (`corruption.TIME_SCHEMES`, those in `time_schemes`), so validation can report a standard
    error over sequences (`evals.validation`). `time_schemes` is () for a method whose
    evaluation draws no times (AR, CSM): there `t_samples` and `times` are ignored.

Shapes: B batch, L length, S model states (vocabulary plus the mask where there is one), K blocks,
Lb block length, D width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.models.attention import CAUSAL, FULL, MaskPattern
from dlm_jax.objectives.ar import ar_nll
from dlm_jax.processes import corruption
from dlm_jax.processes.schedules import Schedule
from dlm_jax.samplers.block import BlockDecoder

Array = jax.Array
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A model turned into the function a sampler consumes.

    kind says what `fn` returns:
      "next_token_log_probs"  fn(tokens (B, L)) -> (B, L, V): log p(x_{i+1} | x_{≤i}) at row i.
      "x0_log_probs"          fn(xt (B, L), noise) -> (B, L, S): log p_θ(x_0^i | x_t) (SUBS for
                              masked diffusion: -1e6 at the mask, carry-over where unmasked;
                              D3PM: `noise` is the integer step t).
      "x0_probs"              fn(xt, σ̄) -> (B, L, S) probabilities p_θ(x_0^i | x_t) (CTMC).
      "log_score"             fn(xt, σ̄) -> (B, L, S): log s_θ(x_t)[i, y] ≈ log p_t(x_t^{i←y}) /
                              p_t(x_t); 0 at y = x_t^i (SEDD).
      "concrete_score"        fn(x (B, L)) -> (B, L, S): c_θ(x)[i, y] ≈ p(x^{i←y}) / p(x) − 1 (CSM).
    Noise arguments are σ̄ per sequence (B,) or per token (B, L) (blocks: the clean prefix at 0).
    With blocks (Lb < L) the model runs under the block-causal mask, so the rows of the block
    being denoised see it and the clean blocks before it, as in two-pass training.
    """

    kind: str
    fn: Callable[..., Array]

    @staticmethod
    def function(denoiser, kind: str, what: str) -> Callable[..., Array]:
        """What a sampler calls: `denoiser.fn` of a Denoiser of `kind`, or a plain callable taken
        as one; anything else, or another kind, is a ValueError naming `what` (the argument)."""
        if isinstance(denoiser, Denoiser):
            if denoiser.kind != kind:
                raise ValueError(f"{what} needs a {kind!r} denoiser: it must be a Denoiser of "
                                 f"kind {kind!r} or a callable, got kind {denoiser.kind!r}")
            return denoiser.fn
        if not callable(denoiser):
            raise ValueError(f"{what} must be a callable or a Denoiser of kind {kind!r}, got "
                             f"{type(denoiser).__name__}")
        return denoiser


def token_weights(batch: dict) -> Array:
    """(B, L) float32: 1 on real tokens, 0 on padding (packed batches carry segment_ids)."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.ones(batch["tokens"].shape, jnp.float32)


def sequence_sums(per_token: Array, batch: dict) -> tuple[Array, Array]:
    """Per-sequence sums (B,) of a (B, L) per-token value over the real tokens, and the real
    token counts (B,) (the per-sequence form of `token_mean`)."""
    weights = token_weights(batch)
    return (per_token * weights).sum(-1), weights.sum(-1)


def mean_over_draws(fn: Callable[[Array, Array], Array], key: Array, times: Array) -> Array:
    """(1/R) Σ_r fn(fold_in(key, r), times[r]) for times (R, ...): the per-token values (B, L) of
    R evaluation draws averaged, by a `lax.scan` (one compiled body whatever R)."""
    def body(acc, xs):
        r, t = xs
        return acc + fn(jax.random.fold_in(key, r), t), None
    first = jax.eval_shape(fn, key, times[0])
    total, _ = jax.lax.scan(body, jnp.zeros(first.shape, jnp.float32),
                            (jnp.arange(times.shape[0]), times))
    return total / times.shape[0]


def token_mean(per_token: Array, batch: dict) -> Array:
    """Mean of a (B, L) per-token value over the batch's real tokens (every token counts,
    masked or not: the MDLM/BD3-LM reduction)."""
    weights = token_weights(batch)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def shift_rows(raw: Array, block_size: int) -> Array:
    """The shift of AR adaptation: row i − 1 of raw outputs (B, L, S) becomes the prediction of
    position i, inside each block of `block_size` (which divides L); a block's first position
    keeps its own row. An AR model's row i − 1 predicts token i, so a diffusion model
    initialised from it starts from the AR head's alignment (Gong et al., 2025, "Scaling
    Diffusion Language Models via Adaptation from Autoregressive Models", ICLR). Within blocks,
    so a block's predictions still come from rows that see the block (two-pass training, the KV
    cache).
    """
    B, L, S = raw.shape
    r = raw.reshape(B, L // block_size, block_size, S)
    return jnp.concatenate([r[:, :, :1], r[:, :, :-1]], axis=2).reshape(B, L, S)


def attention_flops(depth: int, width: int, keys_per_token: float) -> float:
    """Forward + backward FLOPs of the attention scores and values: 12·depth·D·keys per token."""
    return 12.0 * depth * width * keys_per_token


def score_pairs(pattern: MaskPattern, lq: int, lk: int, backend: str) -> float:
    """(query, key) scores per head and sequence that `backend` computes for `pattern`, queries
    the first lq of lk positions.

    xla: the flash plan's P·tq·tk (whole tiles, padding included) plus the two-pass noisy
    diagonal it computes densely; dense: every key, but the block-sparse two-pass
    (`layers.attend_two_pass`: noisy queries score their own block and the clean half, clean
    queries the clean half); splash / cudnn skip tiles of their own choosing, so count only the
    allowed entries (a lower bound: MFU is never overstated).
    """
    if backend == "xla":
        from dlm_jax.models.flash import flash_plan
        return float(flash_plan(pattern, lq, lk).scores)
    if backend == "dense":
        if pattern.kind != "two_pass":
            return float(lq * lk)
        L = pattern.stream_length(lk)
        return float(L * (pattern.block_size + L) + (lq - L) * L)
    q, k = np.arange(lq)[:, None], np.arange(lk)[None, :]
    return float(np.asarray(pattern.allowed(q, k, lk, use_band=False, xp=np)).sum())


def pattern_attention_flops(depth: int, width: int, pattern: MaskPattern, seq_len: int,
                            backend: str, *, last_queries: int | None = None) -> float:
    """Attention FLOPs (forward + backward) per training token of a sequence of `seq_len`
    tokens run by `depth` layers under `pattern` (keys: 2·seq_len for two-pass); the last layer
    computes only `last_queries` queries (None: all)."""
    lk = 2 * seq_len if pattern.kind == "two_pass" else seq_len
    per_layer = score_pairs(pattern, lk, lk, backend)
    last = per_layer if last_queries is None else score_pairs(pattern, last_queries, lk, backend)
    return attention_flops(1, width, ((depth - 1) * per_layer + last) / seq_len)


class Method:
    """Interface and defaults; the families in this package subclass it (see module docstring)."""

    name: str = "method"
    causal: bool = False
    data_modes: tuple[str, ...] = ("wrap",)
    likelihood_bound: bool = True
    clip_search: bool = False       # BD3-LM's variance-minimising clip search applies
    drafts: bool = False            # its denoiser (SUBS x0 log-probs at σ̄, a mask state
                                    # `process.mask_id`) can draft for AR speculative / MH
    time_schemes: tuple[str, ...] = ()  # evaluation time schemes (); () = draws no times

    def model_vocab(self, token_vocab: int) -> int:
        """Rows of the embedding and columns of the output layer."""
        return token_vocab

    def loss(self, model, batch: dict, key: Array, *, train: bool,
             clip: Array | None = None, step: Array | None = None) -> tuple[Array, Metrics]:
        raise NotImplementedError

    def sequence_loss(self, model, batch: dict, key: Array, *, t_samples: int = 1,
                      times: str = "stratified") -> tuple[Array, Array, Metrics]:
        """Evaluation objective per sequence: (sums (B,) in nats, real tokens (B,), scalar
        metrics); its token-weighted mean is `loss(..., train=False)`'s estimand."""
        raise NotImplementedError(f"{self.name} has no per-sequence evaluation")

    def denoiser(self, model) -> Denoiser:
        raise NotImplementedError

    def generator(self, exp, sampling, length: int):
        """The family's jitted sampler (`dlm_jax.generation.Generator`) for `length` tokens."""
        from dlm_jax.config import ConfigError
        raise ConfigError(f"sampling is not available yet for the {self.name} family "
                          f"(objective {exp.cfg.diffusion.objective!r})")

    def flops_per_token(self, *, num_params: int, depth: int, width: int, seq_len: int,
                        attention: str = "xla", query_params: int = 0,
                        conditioning_params: int = 0) -> float:
        """6·N for the matmuls (forward + backward) plus the bidirectional attention that
        backend `attention` computes. num_params: N, the weights every token's row is
        multiplied by (`registry.matmul_params`); query_params: those of N a two-pass forward
        applies to its query rows only; conditioning_params: the per-token σ conditioning's
        share of N, which a pass at one σ per sequence does not run per row."""
        return 6.0 * num_params + pattern_attention_flops(depth, width, FULL, seq_len, attention)

    @property
    def per_token_sigma(self) -> bool:
        """Whether the model is conditioned on a noise level per token (B, L) rather than one
        per sequence (B,): then the σ conditioning is a per-token matmul too."""
        return False


def dropout_key(key: Array, train: bool) -> Array | None:
    return key if train else None


@dataclasses.dataclass(frozen=True)
class ContinuousTime(Method):
    """Shared by the continuous-time families that train on x_t of a CTMC process at block times.

    One step: one time per (sequence, block), stratified over batch × blocks, from `bounds`
    (training: the clip interval; evaluation: [sampling_eps, 1], whose estimate is an unbiased
    NELBO); x_t from the process (BD3-LM's `resample` rule when on); the model on x_t (one block)
    or the two-pass [x_t ⊕ x_0] input (blocks), conditioned on σ̄ per sequence (one block) or per
    token (blocks); then `terms(raw, x0, xt, t)` gives the per-token objective.

    AR adaptation and joint training (fields off by default):
      shift: the prediction for position i is read at row i − 1 (`shift_rows`), in training,
        evaluation and sampling alike.
      anneal_steps: in training, attention inside each block is limited to keys j ≤ i + band,
        band growing linearly from 0 (causal) at step 0 to Lb − 1 (the target mask) at this
        step; evaluation and sampling always use the target mask.
      ar_weight: joint training: the loss adds ar_weight × the AR NLL of a causal pass of the
        same network over x_0 at σ = 0 (logits at row i predict token i + 1 over the real
        tokens). Evaluation reports the NELBO as "loss" (the bound) and "ar_nll" beside it.
    """

    process: Any
    schedule: Schedule
    seq_len: int
    block_size: int
    sampling_eps: float = 1e-3
    antithetic: bool = True
    resample: bool = False
    shift: bool = False
    anneal_steps: int = 0
    ar_weight: float = 0.0
    time_schemes = corruption.TIME_SCHEMES

    @property
    def blocks(self) -> bool:
        return self.block_size < self.seq_len

    @property
    def token_vocab(self) -> int:
        """V, the real tokens (the states but the mask)."""
        mask_id = self.process.mask_id
        return self.process.num_states if mask_id is None else mask_id

    def outputs(self, raw: Array) -> Array:
        """Raw outputs (B, L, S) of a sequence or of one block (L = Lb) as per-position
        predictions: shifted inside blocks with `shift`, as they are otherwise."""
        if not self.shift:
            return raw
        return shift_rows(raw, min(self.block_size, raw.shape[1]))

    def band(self, step: Array | None) -> Array | None:
        """The annealed attention band inside a block at training `step` (None: the target
        mask): ⌊min(step / anneal_steps, 1) · (Lb − 1)⌋, int32."""
        if not self.anneal_steps or step is None:
            return None
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / self.anneal_steps, 1.0)
        return jnp.floor(frac * (self.block_size - 1)).astype(jnp.int32)

    def ar_loss(self, model, batch: dict, key: Array, *, train: bool) -> Array:
        """Mean AR NLL (nats/token) of a causal pass of the (diffusion) model over x_0 at σ = 0,
        over the real tokens' logits (joint training)."""
        x0 = batch["tokens"]
        logits = model(x0, jnp.zeros(x0.shape[:1], jnp.float32), mask=CAUSAL,
                       deterministic=not train, rngs=dropout_key(key, train))
        _, aux = ar_nll(logits[..., :self.token_vocab], x0, segment_ids=batch.get("segment_ids"))
        return aux["nll_sum"] / jnp.maximum(aux["num_targets"], 1.0)

    def model_vocab(self, token_vocab: int) -> int:
        return self.process.num_states

    def terms(self, raw: Array, x0: Array, xt: Array, t: Array) -> tuple[Array, Metrics]:
        """Per-token objective (B, L) from raw outputs (B, L, S) at per-token times t (B, L)."""
        raise NotImplementedError

    def conditioning(self, t_blocks: Array) -> Array:
        """σ̄ per sequence (B,) for one block, per token (B, L) with blocks."""
        if self.blocks:
            return self.schedule.sigma_bar(corruption.block_times(t_blocks, self.block_size))
        return self.schedule.sigma_bar(t_blocks[:, 0])

    def per_token(self, model, x0: Array, key: Array, *, train: bool, bounds, resample: bool,
                  band: Array | None = None, t_blocks: Array | None = None
                  ) -> tuple[Array, Metrics]:
        """Per-token values (B, L) for one draw of times in `bounds` (floats or traced) and x_t;
        `band`: the annealed attention band inside blocks (None: the target mask); `t_blocks`
        (B, K): given times instead of a draw."""
        B, L = x0.shape
        k_t, k_x, k_drop = jax.random.split(key, 3)
        if t_blocks is None:
            t_blocks = corruption.sample_times(k_t, (B, L // self.block_size), t_min=bounds[0],
                                               t_max=bounds[1], antithetic=self.antithetic)
        xt = corruption.corrupt_blocks(k_x, x0, t_blocks, self.block_size, self.process,
                                       self.schedule, resample=resample, bounds=bounds,
                                       sampling_eps=self.sampling_eps)
        sigma = self.conditioning(t_blocks)
        rngs = dropout_key(k_drop, train)
        if self.blocks:
            raw = model.two_pass(xt, x0, sigma, self.block_size, band=band,
                                 deterministic=not train, rngs=rngs)
        else:
            mask = MaskPattern("full", band=band)
            raw = model(xt, sigma, mask=mask, deterministic=not train, rngs=rngs)
        return self.terms(self.outputs(raw), x0, xt,
                          corruption.block_times(t_blocks, self.block_size))

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        x0 = batch["tokens"]
        if self.ar_weight:  # only then split: runs without the AR term keep their keys
            key, k_ar = jax.random.split(key)
        if train:
            bounds = (self.sampling_eps, 1.0) if clip is None else (clip[0], clip[1])
            per_token, aux = self.per_token(model, x0, key, train=True, bounds=bounds,
                                            resample=self.resample, band=self.band(step))
        else:
            per_token, aux = self.per_token(model, x0, key, train=False,
                                            bounds=(self.sampling_eps, 1.0), resample=False)
        loss = token_mean(per_token, batch)
        if not self.ar_weight:
            return loss, {"loss": loss}
        ar = self.ar_loss(model, batch, k_ar, train=train)
        total = loss + self.ar_weight * ar if train else loss
        return total, {"loss": total, "nelbo": loss, "ar_nll": ar}

    def sequence_loss(self, model, batch, key, *, t_samples=1, times="stratified"):
        """The NELBO per sequence, the per-token terms averaged over `t_samples` times per
        (sequence, block) of scheme `times` (`corruption.evaluation_times` on
        [sampling_eps, 1], unclipped, no resampling: each scheme an unbiased estimate of the
        bound, MDLM eq. 10 / BD3-LM eq. 8) with a fresh x_t per draw. Joint runs add the
        batch's "ar_nll" to the metrics."""
        x0 = batch["tokens"]
        B, L = x0.shape
        k_t, k_x, k_ar = jax.random.split(key, 3)
        bounds = (self.sampling_eps, 1.0)
        t_all = corruption.evaluation_times(k_t, (B, L // self.block_size), scheme=times,
                                            samples=t_samples, t_min=bounds[0], t_max=bounds[1])
        per_token = mean_over_draws(
            lambda k, t: self.per_token(model, x0, k, train=False, bounds=bounds,
                                        resample=False, t_blocks=t)[0], k_x, t_all)
        sums, tokens = sequence_sums(per_token, batch)
        metrics = {}
        if self.ar_weight:
            metrics["ar_nll"] = self.ar_loss(model, batch, k_ar, train=False)
        return sums, tokens, metrics

    def generator(self, exp, sampling, length):
        """A joint run (`ar_weight` > 0) decodes either way: an AR sampler name (ar, jacobi, …)
        reads the network causally (`methods.joint.CausalView`); anything else is the family's
        diffusion sampler (`diffusion_generator`)."""
        from dlm_jax.generation import AR_SAMPLERS, ar_generator
        if self.ar_weight and sampling.sampler in AR_SAMPLERS:
            from dlm_jax.methods.joint import CausalView
            view = dataclasses.replace(exp, method=CausalView(vocab=self.token_vocab))
            return ar_generator(view, sampling, length)
        return self.diffusion_generator(exp, sampling, length)

    def diffusion_generator(self, exp, sampling, length):
        return super().generator(exp, sampling, length)

    def block_nelbo(self, model, x0: Array, key: Array, bounds) -> Array:
        """(B, K) per-block mean objective at times in `bounds` with the resample rule (evaluation
        mode): the clip search scores an interval by the variance of this over batch × blocks."""
        per_token, _ = self.per_token(model, x0, key, train=False, bounds=bounds, resample=True)
        B, L = x0.shape
        return per_token.reshape(B, L // self.block_size, self.block_size).mean(-1)

    def raw_fn(self, model) -> Callable[[Array, Array], Array]:
        """(xt (B, L), σ̄ (B,) | (B, L)) -> raw outputs (B, L, S), block-causal with blocks."""
        def raw(xt, sigma_bar):
            mask = MaskPattern("block_causal", self.block_size) if self.blocks else None
            return self.outputs(model(xt, sigma_bar, mask=mask))
        return raw

    def block_decoder(self, model, length: int, *, cached: bool = True,
                      window: int | None = None) -> BlockDecoder:
        """The model block by block (`samplers.block`), for sequences of `length` tokens:
        `log_probs` gives `block_output` of the block given the committed prefix (SUBS log-probs
        for masked diffusion, log-scores for SEDD); `commit` returns the raw outputs.

        cached: a KV cache of the committed clean blocks (`DiT.decode_block`), committed with
        σ̄ = 0 like the clean half of two-pass training; only the current block's queries are
        computed. `window` (default min(length, seq_len), a multiple of the block) bounds the
        cache: longer generations slide it. Exact (equal to the uncached twin) within the window
        when time conditioning is off or per-token.
        cached=False: the twin that recomputes the whole sequence at every call under the
        block-causal mask (future blocks masked out), up to the training length.
        """
        lb = self.block_size
        fill = self.process.mask_id if self.process.mask_id is not None else 0

        if cached:
            w = window or min(length, self.seq_len)
            if w % lb:
                raise ValueError(f"the KV cache window {w} must be a multiple of the block size "
                                 f"{lb}")

            def log_probs(block, sigma, cache):
                raw = model.decode_block(block, sigma, cache, commit=False)[0]
                return self.block_output(self.outputs(raw), block, sigma)

            def commit(block, cache):
                zero = jnp.zeros((block.shape[0],), jnp.float32)
                return model.decode_block(block, zero, cache, commit=True)
            return BlockDecoder(lambda b: model.init_cache(b, w), log_probs, commit)

        mask = MaskPattern("block_causal", lb)

        def full(block, sigma, cache):
            tokens, start = cache
            x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
            sigma = jnp.asarray(sigma, jnp.float32)  # (B,) or per token (B, Lb)
            block_sig = jnp.broadcast_to(sigma[:, None] if sigma.ndim == 1 else sigma, block.shape)
            sig = jax.lax.dynamic_update_slice_in_dim(  # the clean prefix (and future) at 0
                jnp.zeros(tokens.shape, jnp.float32), block_sig, start, axis=1)
            logits = model(x, sig, mask=mask)
            return jax.lax.dynamic_slice_in_dim(logits, start, block.shape[1], axis=1), x

        def log_probs_full(block, sigma, cache):
            return self.block_output(self.outputs(full(block, sigma, cache)[0]), block, sigma)

        def commit_full(block, cache):
            raw, x = full(block, jnp.zeros((block.shape[0],), jnp.float32), cache)
            return raw, (x, cache[1] + block.shape[1])

        return BlockDecoder(
            lambda b: (jnp.full((b, length), fill, jnp.int32), jnp.int32(0)),
            log_probs_full, commit_full,
            max_tokens=min(length, self.seq_len) if self.blocks else length)

    def block_output(self, raw: Array, block: Array, sigma_bar: Array) -> Array:
        """What a block decoder returns for raw outputs (B, Lb, S) of a block (B, Lb)."""
        raise NotImplementedError

    @property
    def per_token_sigma(self) -> bool:
        return self.blocks

    def flops_per_token(self, *, num_params, depth, width, seq_len, attention="xla",
                        query_params=0, conditioning_params=0):
        # joint training: one more pass, causal, at σ = 0 per sequence
        joint = 0.0 if not self.ar_weight else (
            6.0 * (num_params - conditioning_params)
            + pattern_attention_flops(depth, width, CAUSAL, seq_len, attention))
        if not self.blocks:
            return joint + super().flops_per_token(num_params=num_params, depth=depth,
                                                   width=width, seq_len=seq_len,
                                                   attention=attention)
        # Two-pass input of 2L rows (matmuls twice) under the two-pass mask; the last layer
        # and the output layer compute the L noisy query rows only.
        pattern = MaskPattern("two_pass", self.block_size)
        return joint + (12.0 * num_params - 6.0 * query_params
                        + pattern_attention_flops(depth, width, pattern, seq_len, attention,
                                                  last_queries=seq_len))
