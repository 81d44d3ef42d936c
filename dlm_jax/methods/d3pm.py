"""D3PM (Austin et al., 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces"):
discrete time t ∈ {1..T}, x0-parameterised reverse step, the hybrid loss T·L_t + λ·CE (their
eq. 5 with the auxiliary term of §3.4) in training and the exact per-step bound with its prior
term at evaluation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import (Denoiser, Method, dropout_key, mean_over_draws,
                                  sequence_sums, token_mean)
from dlm_jax.processes import corruption
from dlm_jax.objectives.d3pm import d3pm_loss, d3pm_prior_term
from dlm_jax.processes.d3pm import D3PM


@dataclasses.dataclass(frozen=True)
class DiscreteTime(Method):
    """`process` is a `D3PM`; `hybrid_lambda` weighs the auxiliary cross-entropy in training."""

    process: D3PM
    hybrid_lambda: float = 0.01
    name = "d3pm"
    time_schemes = corruption.TIME_SCHEMES

    def model_vocab(self, token_vocab: int) -> int:
        return self.process.num_states

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        """Training: uniform t, x_t ~ q(x_t | x_0), T·L_t + λ·CE. Evaluation: λ = 0 plus the prior
        KL(q(x_T | x_0) ‖ π), an unbiased estimate of the discrete-time NELBO."""
        del clip, step
        x0 = batch["tokens"]
        k_t, k_x, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 1, self.process.num_steps + 1)
        loss = token_mean(self._values(model, x0, (k_x, k_drop), t, train=train), batch)
        return loss, {"loss": loss}

    def sequence_loss(self, model, batch, key, *, t_samples=1, times="stratified"):
        """The discrete-time NELBO per sequence, averaged over `t_samples` steps per sequence:
        t = 1 + ⌊u·T⌋ for u of scheme `times` on [0, 1) (`corruption.evaluation_times`), so t
        is uniform on {1..T} under every scheme (stratified / shifted-grid u stratify t)."""
        x0 = batch["tokens"]
        T = self.process.num_steps
        k_t, key = jax.random.split(key)
        u = corruption.evaluation_times(k_t, (x0.shape[0],), scheme=times, samples=t_samples,
                                        t_min=0.0, t_max=1.0)
        steps = 1 + jnp.minimum(jnp.floor(u * T), T - 1).astype(jnp.int32)
        per_token = mean_over_draws(
            lambda k, t: self._values(model, x0, jax.random.split(k), t, train=False), key,
            steps)
        sums, tokens = sequence_sums(per_token, batch)
        return sums, tokens, {}

    def _values(self, model, x0, keys, t, *, train: bool):
        """(B, L) per-token loss at integer steps t (B,) (keys (k_x, k_drop)); at evaluation
        λ = 0 plus the prior."""
        k_x, k_drop = keys
        xt = self.process.sample_xt(k_x, x0, t)
        logits = model(xt, t.astype(jnp.float32), deterministic=not train,
                       rngs=dropout_key(k_drop, train))
        per_token, _ = d3pm_loss(logits, x0, xt, t, self.process,
                                 hybrid_lambda=self.hybrid_lambda if train else 0.0)
        if not train:
            per_token = per_token + d3pm_prior_term(x0, self.process)
        return per_token

    def denoiser(self, model) -> Denoiser:
        """log p_θ(x_0 | x_t) at integer steps t (B,); the reverse step p_θ(x_{t-1} | x_t) is
        `reverse_log_probs`."""
        return Denoiser("x0_log_probs", lambda xt, t: self.process.x0_log_probs(
            model(xt, jnp.asarray(t, jnp.float32))))

    def generator(self, exp, sampling, length):
        from dlm_jax.generation import d3pm_generator
        return d3pm_generator(exp, sampling, length)

    def reverse_log_probs(self, model):
        """fn(xt (B, L), t (B,) int) -> log p_θ(x_{t-1} | x_t) (B, L, S), x0-parameterised."""
        return lambda xt, t: self.process.reverse_log_probs(
            xt, model(xt, jnp.asarray(t, jnp.float32)), t)
