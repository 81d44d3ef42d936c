"""The autoregressive baseline: a causal transformer trained with next-token NLL."""
from __future__ import annotations

import dataclasses

import jax

from dlm_jax.methods.base import Denoiser, Method, attention_flops, dropout_key
from dlm_jax.objectives.ar import ar_nll


@dataclasses.dataclass(frozen=True)
class Autoregressive(Method):
    """Logits at position i predict token i + 1 (`objectives.ar`); packed batches supported."""

    name = "ar"
    causal = True
    data_modes = ("wrap", "pack")

    def loss(self, model, batch, key, *, train, clip=None):
        del clip
        tokens = batch["tokens"]
        logits = model(tokens, None, deterministic=not train, rngs=dropout_key(key, train))
        _, aux = ar_nll(logits, tokens, segment_ids=batch.get("segment_ids"))
        loss = aux["nll_sum"] / jax.numpy.maximum(aux["num_targets"], 1.0)
        return loss, {"loss": loss}

    def denoiser(self, model) -> Denoiser:
        return Denoiser("next_token_log_probs",
                        lambda tokens: jax.nn.log_softmax(model(tokens, None), axis=-1))

    def flops_per_token(self, *, num_params, depth, width, seq_len):
        # The causal mask is applied to dense scores: every query scores all L keys.
        return 6.0 * num_params + attention_flops(depth, width, seq_len)
