"""The autoregressive baseline: a causal transformer trained with next-token NLL; optionally on
noisy histories of an ordinal vocabulary (PnF), which Langevin sampling needs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser, Method, dropout_key, pattern_attention_flops
from dlm_jax.models.attention import CAUSAL
from dlm_jax.objectives.ar import ar_nll, noisy_history
from dlm_jax.samplers.block import BlockDecoder


@dataclasses.dataclass(frozen=True)
class Autoregressive(Method):
    """Logits at position i predict token i + 1 (`objectives.ar`); packed batches supported.

    history_noise: noise levels σ (level units) of noisy-history training over an ordinal
    vocabulary (Jayaram & Thickstun, 2021): the model reads x̃ = x + σ·ε with one σ per sequence
    from these levels (`objectives.ar.noisy_history`) and σ itself, and predicts the clean next
    token; () is plain AR. Its evaluation loss is that NLL averaged over the levels, not a
    likelihood of the data (no perplexity). Sampler "langevin" (`samplers.langevin`) uses it.
    """

    name = "ar"
    causal = True
    data_modes = ("wrap", "pack")
    history_noise: tuple = ()

    @property
    def likelihood_bound(self) -> bool:
        return not self.history_noise

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        del clip, step
        tokens = batch["tokens"]
        inputs, sigma = tokens, None
        if self.history_noise:
            key, k_noise = jax.random.split(key)
            inputs, sigma = noisy_history(k_noise, tokens, self.history_noise)
        logits = model(inputs, sigma, deterministic=not train, rngs=dropout_key(key, train))
        _, aux = ar_nll(logits, tokens, segment_ids=batch.get("segment_ids"))
        loss = aux["nll_sum"] / jax.numpy.maximum(aux["num_targets"], 1.0)
        return loss, {"loss": loss}

    def sequence_loss(self, model, batch, key, *, t_samples=1, times="stratified"):
        """The NLL per sequence over its targets (no times: `t_samples`, `times` unused; with
        `history_noise` one level per sequence)."""
        del t_samples, times
        tokens = batch["tokens"]
        inputs, sigma = tokens, None
        if self.history_noise:
            inputs, sigma = noisy_history(jax.random.split(key)[1], tokens, self.history_noise)
        per_token, aux = ar_nll(model(inputs, sigma), tokens,
                                segment_ids=batch.get("segment_ids"))
        return per_token.sum(-1), aux["row_targets"].astype(jnp.float32), {}

    def denoiser(self, model) -> Denoiser:
        return Denoiser("next_token_log_probs",
                        lambda tokens: jax.nn.log_softmax(model(tokens, None), axis=-1))

    def noisy_log_probs(self, model):
        """values (B, L) float, σ (B,) -> (B, L, V): log p_θ(x_{i+1} = k | x̃_{≤i}, σ) at row i,
        one causal pass (the input of `samplers.langevin`; needs `history_noise`)."""
        return lambda values, sigma: jax.nn.log_softmax(model(values, sigma), axis=-1)

    def generator(self, exp, sampling, length):
        from dlm_jax.generation import ar_generator, langevin_generator
        if sampling.sampler == "langevin" or (sampling.sampler == "auto" and self.history_noise):
            return langevin_generator(exp, sampling, length)
        return ar_generator(exp, sampling, length)

    def block_decoder(self, model, length: int, *, cached: bool = True,
                      window: int | None = None) -> BlockDecoder:
        """The model token by token (`samplers.block.generate_ar`) or window by window
        (`samplers.jacobi`): commit(block, cache) returns the next-token log-probs at the block's
        positions and appends it; log_probs(block, _, cache) (cached only) scores a block against
        the committed prefix without writing it. cached: a KV cache of `window` tokens (default:
        `length`; longer generations slide it); False: the twin that reruns the causal model over
        the whole sequence for every token."""
        if cached:
            def log_probs(block, sigma, cache):
                del sigma
                logits = model.decode_block(block, None, cache, commit=False)[0]
                return jax.nn.log_softmax(logits, axis=-1)

            def commit(block, cache):
                logits, cache = model.decode_block(block, None, cache, commit=True)
                return jax.nn.log_softmax(logits, axis=-1), cache
            return BlockDecoder(lambda b: model.init_cache(b, window or length), log_probs, commit)

        def commit_full(block, cache):
            tokens, start = cache
            x = jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1)
            logits = jax.lax.dynamic_slice_in_dim(model(x, None), start, block.shape[1], axis=1)
            return jax.nn.log_softmax(logits, axis=-1), (x, start + block.shape[1])
        return BlockDecoder(lambda b: (jnp.zeros((b, length), jnp.int32), jnp.int32(0)), None,
                            commit_full, max_tokens=length)

    def flops_per_token(self, *, num_params, depth, width, seq_len, attention="xla",
                        query_params=0, conditioning_params=0):
        # Dense scores every key under the causal mask; flash skips the tiles above the diagonal.
        return 6.0 * num_params + pattern_attention_flops(depth, width, CAUSAL, seq_len, attention)
