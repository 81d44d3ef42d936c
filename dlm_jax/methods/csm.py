"""Concrete score matching (Meng et al., 2022, "Concrete Score Matching: Generalized Score
Matching for Discrete Data"): the network's c_θ(x)[i, y] ≈ p(x^{i←y}) / p(x) − 1 over the
Hamming-1 neighbours, trained with the implicit objective J (their eq. 5, `objectives.csm`), which
equals E‖c_θ − c_p‖² up to a θ-free constant. No forward process: the data are the input.

The exact estimator runs the network at all L·(S − 1) neighbours of every sequence (small
vocabularies and lengths only; `MAX_EXACT_NEIGHBOURS`); the sampled one draws one neighbour per
term (two calls, any size, higher variance). J is not a likelihood; evaluation adds the
pseudo-likelihood the score implies, −(1/L) Σ_i log p_θ(x_i | x_{−i}) with
p_θ(y | x_{−i}) ∝ 1 + c_θ(x)[i, y], in nats/token.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser, Method, token_weights
from dlm_jax.objectives.csm import csm_loss, csm_loss_sampled

Array = jax.Array

ESTIMATORS = ("exact", "sampled")
MAX_EXACT_NEIGHBOURS = 4096


@dataclasses.dataclass(frozen=True)
class ConcreteScoreMatching(Method):
    """c_θ = expm1(raw) (ratios exp(raw) ≥ 0; a zero-initialised head starts at ratio 1)."""

    num_states: int
    seq_len: int
    estimator: str = "exact"
    name = "csm"
    likelihood_bound = False

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    def _raw_fn(self, model, key: Array | None, train: bool):
        calls = []  # one dropout key per network call, folded in trace order

        def raw(x):
            k = None if key is None else jax.random.fold_in(key, len(calls))
            calls.append(None)
            sigma = jnp.zeros((x.shape[0],), jnp.float32)
            return model(x, sigma, deterministic=not train, rngs=k).astype(jnp.float32)
        return raw

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        del clip, step
        x = batch["tokens"]
        k_nb, k_drop = jax.random.split(key)
        raw = self._raw_fn(model, k_drop if train else None, train)
        score_fn = lambda tokens: jnp.expm1(raw(tokens))  # noqa: E731
        if self.estimator == "exact":
            values, _ = csm_loss(score_fn, x)
        else:
            values, _ = csm_loss_sampled(k_nb, score_fn, x, self.num_states)
        loss = values.mean() / x.shape[1]
        metrics = {"loss": loss}
        if not train:
            metrics["pseudo_nll"] = self.pseudo_nll(raw(x), x, batch)
        return loss, metrics

    def sequence_loss(self, model, batch, key, *, t_samples=1, times="stratified"):
        """J per sequence (the sum over its L positions, as `loss` divides by L) and the batch's
        pseudo-NLL; no times (`t_samples`, `times` unused)."""
        del t_samples, times
        x = batch["tokens"]
        raw = self._raw_fn(model, None, False)
        score_fn = lambda tokens: jnp.expm1(raw(tokens))  # noqa: E731
        if self.estimator == "exact":
            values, _ = csm_loss(score_fn, x)
        else:
            values, _ = csm_loss_sampled(jax.random.split(key)[0], score_fn, x, self.num_states)
        tokens = jnp.full(values.shape, x.shape[1], jnp.float32)
        return values, tokens, {"pseudo_nll": self.pseudo_nll(raw(x), x, batch)}

    @staticmethod
    def pseudo_nll(raw: Array, x: Array, batch: dict) -> Array:
        """Mean −log p_θ(x_i | x_{−i}) over real tokens, nats (raw (B, L, S) at x)."""
        own = jax.nn.one_hot(x, raw.shape[-1], dtype=bool)
        per_token = jax.nn.logsumexp(jnp.where(own, 0.0, raw), axis=-1)
        weights = token_weights(batch)
        return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    def denoiser(self, model) -> Denoiser:
        raw = self._raw_fn(model, None, False)
        return Denoiser("concrete_score", lambda x: jnp.expm1(raw(x)))

    def flops_per_token(self, *, num_params, depth, width, seq_len, attention="xla",
                        query_params=0, conditioning_params=0):
        calls = 1 + seq_len * self.num_states if self.estimator == "exact" else 2
        return calls * super().flops_per_token(num_params=num_params, depth=depth, width=width,
                                               seq_len=seq_len, attention=attention,
                                               query_params=query_params,
                                               conditioning_params=conditioning_params)
