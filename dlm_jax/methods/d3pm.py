"""D3PM (Austin et al., 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces"):
discrete time t ∈ {1..T}, x0-parameterised reverse step, the hybrid loss T·L_t + λ·CE (their
eq. 5 with the auxiliary term of §3.4) in training and the exact per-step bound with its prior
term at evaluation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser, Method, dropout_key, token_mean
from dlm_jax.objectives.d3pm import d3pm_loss, d3pm_prior_term
from dlm_jax.processes.d3pm import D3PM


@dataclasses.dataclass(frozen=True)
class DiscreteTime(Method):
    """`process` is a `D3PM`; `hybrid_lambda` weighs the auxiliary cross-entropy in training."""

    process: D3PM
    hybrid_lambda: float = 0.01
    name = "d3pm"

    def model_vocab(self, token_vocab: int) -> int:
        return self.process.num_states

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        """Training: uniform t, x_t ~ q(x_t | x_0), T·L_t + λ·CE. Evaluation: λ = 0 plus the prior
        KL(q(x_T | x_0) ‖ π), an unbiased estimate of the discrete-time NELBO."""
        del clip, step
        x0 = batch["tokens"]
        k_t, k_x, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 1, self.process.num_steps + 1)
        xt = self.process.sample_xt(k_x, x0, t)
        logits = model(xt, t.astype(jnp.float32), deterministic=not train,
                       rngs=dropout_key(k_drop, train))
        per_token, _ = d3pm_loss(logits, x0, xt, t, self.process,
                                 hybrid_lambda=self.hybrid_lambda if train else 0.0)
        if not train:
            per_token = per_token + d3pm_prior_term(x0, self.process)
        loss = token_mean(per_token, batch)
        return loss, {"loss": loss}

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
