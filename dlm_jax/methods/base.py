"""What a family is: the `Method` interface, and the continuous-time machinery several share.

A `Method` gathers, in one object of plain functions, everything that depends on the family:

  * the model it needs: `causal`, and `model_vocab(token_vocab)` (the state count, the mask
    included where the process has one);
  * `loss(model, batch, key, *, train, clip=None) -> (scalar, metrics)`: the mean per-token
    objective in nats/token over the batch's real tokens (metrics hold scalars, "loss" among
    them). `clip` is the training time interval (2,) of a clipped schedule (BD3-LM), traced;
  * `denoiser(model) -> Denoiser`: what samplers call, with its documented meaning;
  * `flops_per_token(...)`: the matmul and attention FLOPs one training token costs, counting
    the attention that is actually computed;
  * `data_modes`: the data pipeline modes its loss supports; `likelihood_bound`: whether the
    evaluation loss bounds the negative log-likelihood (so perplexity and bits are meaningful).

Shapes: B batch, L length, S model states (vocabulary plus the mask where there is one), K blocks,
Lb block length, D width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlm_jax.masks import block_causal_mask
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


def token_mean(per_token: Array, batch: dict) -> Array:
    """Mean of a (B, L) per-token value over the batch's real tokens (every token counts,
    masked or not: the MDLM/BD3-LM reduction)."""
    weights = token_weights(batch)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def attention_flops(depth: int, width: int, keys_per_token: float) -> float:
    """Forward + backward FLOPs of the attention scores and values: 12·depth·D·keys per token."""
    return 12.0 * depth * width * keys_per_token


class Method:
    """Interface and defaults; the families in this package subclass it (see module docstring)."""

    name: str = "method"
    causal: bool = False
    data_modes: tuple[str, ...] = ("wrap",)
    likelihood_bound: bool = True
    clip_search: bool = False       # BD3-LM's variance-minimising clip search applies
    drafts: bool = False            # its denoiser (SUBS x0 log-probs at σ̄, a mask state
                                    # `process.mask_id`) can draft for AR speculative / MH

    def model_vocab(self, token_vocab: int) -> int:
        """Rows of the embedding and columns of the output layer."""
        return token_vocab

    def loss(self, model, batch: dict, key: Array, *, train: bool,
             clip: Array | None = None) -> tuple[Array, Metrics]:
        raise NotImplementedError

    def denoiser(self, model) -> Denoiser:
        raise NotImplementedError

    def generator(self, exp, sampling, length: int):
        """The family's jitted sampler (`dlm_jax.generation.Generator`) for `length` tokens."""
        from dlm_jax.config import ConfigError
        raise ConfigError(f"sampling is not available yet for the {self.name} family "
                          f"(objective {exp.cfg.diffusion.objective!r})")

    def flops_per_token(self, *, num_params: int, depth: int, width: int, seq_len: int) -> float:
        """6·N for the matmuls (forward + backward) plus attention over all L keys."""
        return 6.0 * num_params + attention_flops(depth, width, seq_len)


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
    """

    process: Any
    schedule: Schedule
    seq_len: int
    block_size: int
    sampling_eps: float = 1e-3
    antithetic: bool = True
    resample: bool = False

    @property
    def blocks(self) -> bool:
        return self.block_size < self.seq_len

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

    def per_token(self, model, x0: Array, key: Array, *, train: bool, bounds, resample: bool
                  ) -> tuple[Array, Metrics]:
        """Per-token values (B, L) for one draw of times in `bounds` (floats or traced) and x_t."""
        B, L = x0.shape
        k_t, k_x, k_drop = jax.random.split(key, 3)
        t_blocks = corruption.sample_times(k_t, (B, L // self.block_size), t_min=bounds[0],
                                           t_max=bounds[1], antithetic=self.antithetic)
        xt = corruption.corrupt_blocks(k_x, x0, t_blocks, self.block_size, self.process,
                                       self.schedule, resample=resample, bounds=bounds,
                                       sampling_eps=self.sampling_eps)
        sigma = self.conditioning(t_blocks)
        rngs = dropout_key(k_drop, train)
        if self.blocks:
            raw = model.two_pass(xt, x0, sigma, self.block_size, deterministic=not train,
                                 rngs=rngs)
        else:
            raw = model(xt, sigma, deterministic=not train, rngs=rngs)
        return self.terms(raw, x0, xt, corruption.block_times(t_blocks, self.block_size))

    def loss(self, model, batch, key, *, train, clip=None):
        x0 = batch["tokens"]
        if train:
            bounds = (self.sampling_eps, 1.0) if clip is None else (clip[0], clip[1])
            per_token, aux = self.per_token(model, x0, key, train=True, bounds=bounds,
                                            resample=self.resample)
        else:
            per_token, aux = self.per_token(model, x0, key, train=False,
                                            bounds=(self.sampling_eps, 1.0), resample=False)
        loss = token_mean(per_token, batch)
        return loss, {"loss": loss}

    def block_nelbo(self, model, x0: Array, key: Array, bounds) -> Array:
        """(B, K) per-block mean objective at times in `bounds` with the resample rule (evaluation
        mode): the clip search scores an interval by the variance of this over batch × blocks."""
        per_token, _ = self.per_token(model, x0, key, train=False, bounds=bounds, resample=True)
        B, L = x0.shape
        return per_token.reshape(B, L // self.block_size, self.block_size).mean(-1)

    def raw_fn(self, model) -> Callable[[Array, Array], Array]:
        """(xt (B, L), σ̄ (B,) | (B, L)) -> raw outputs (B, L, S), block-causal with blocks."""
        def raw(xt, sigma_bar):
            mask = block_causal_mask(xt.shape[1], self.block_size) if self.blocks else None
            return model(xt, sigma_bar, mask=mask)
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
                return self.block_output(raw, block, sigma)

            def commit(block, cache):
                zero = jnp.zeros((block.shape[0],), jnp.float32)
                return model.decode_block(block, zero, cache, commit=True)
            return BlockDecoder(lambda b: model.init_cache(b, w), log_probs, commit)

        mask = block_causal_mask(length, lb)

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
            return self.block_output(full(block, sigma, cache)[0], block, sigma)

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

    def flops_per_token(self, *, num_params, depth, width, seq_len):
        if not self.blocks:
            return super().flops_per_token(num_params=num_params, depth=depth, width=width,
                                           seq_len=seq_len)
        # Two-pass input of 2L rows (matmuls twice). Block-sparse attention: a noisy query scores
        # its own block (Lb) and the clean half (L, masked), a clean query the clean half (L); the
        # last layer computes noisy queries only. Per training token (L of them):
        L, lb = seq_len, self.block_size
        keys = (depth - 1) * (2 * L + lb) + (L + lb)
        return 12.0 * num_params + attention_flops(1, width, keys)
