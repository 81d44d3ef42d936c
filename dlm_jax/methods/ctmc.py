"""The continuous-time framework's bound (Campbell et al., 2022, "A Continuous Time Framework for
Discrete Denoising Models"): an x0-parameterised reverse rate

    R̂_t(x, x^{d←y}) = σ(t) Q[y, x^d] Σ_{x0} p_θ(x0^d | x) q_{t|0}(y | x0) / q_{t|0}(x^d | x0)

trained with their continuous-time ELBO, estimated from one time, one x_t and one forward jump
x̃ per sequence (`objectives.ctmc.ctmc_elbo`, with the exact posterior over the pre-jump state).
At evaluation the prior term KL(q_{1|0}(·|x0) ‖ p_ref) is added, so the value bounds −log p_θ(x0)
per token for a generator that starts from `reference_probs()`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import (Denoiser, Method, dropout_key, mean_over_draws,
                                  sequence_sums, token_mean)
from dlm_jax.objectives.ctmc import ctmc_elbo, ctmc_prior_kl, sample_jump
from dlm_jax.objectives.nelbo import subs_log_probs
from dlm_jax.processes import corruption
from dlm_jax.processes.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ContinuousTimeELBO(Method):
    """Whole sequences (no blocks) over `process`; times t ~ U(0, 1), stratified over the batch."""

    process: Any
    schedule: Schedule
    antithetic: bool = True
    name = "ctmc"
    time_schemes = corruption.TIME_SCHEMES

    def model_vocab(self, token_vocab: int) -> int:
        return self.process.num_states

    def x0_probs(self, raw: Array, xt: Array) -> Array:
        """p_θ(x0 | x_t) (B, L, S): a softmax that never predicts the mask and, for a masking
        process, keeps unmasked tokens (they are x0 exactly); a plain softmax otherwise."""
        if self.process.mask_id is not None:
            return jnp.exp(subs_log_probs(raw, xt, self.process.mask_id))
        return jax.nn.softmax(raw.astype(jnp.float32), axis=-1)

    def reference_probs(self) -> Array:
        """(S,) p_ref, the start of generation: the forward marginal at t = 1 of a uniformly
        random token (absorbing: mask with probability 1 − α(1), else a uniform token), which
        keeps the prior term finite when α(1) > 0; the process's limit otherwise."""
        if self.process.mask_id is None:
            return self.process.limit_probs()
        S = self.process.num_states
        alpha = jnp.exp(-self.schedule.sigma_bar(jnp.float32(1.0)))
        probs = jnp.full((S,), alpha / (S - 1), jnp.float32)
        return probs.at[self.process.mask_id].set(1.0 - alpha)

    def loss(self, model, batch, key, *, train, clip=None, step=None):
        del clip, step
        x0 = batch["tokens"]
        k_t, *keys = jax.random.split(key, 4)
        t = corruption.sample_times(k_t, (x0.shape[0],), t_min=0.0, t_max=1.0,
                                    antithetic=self.antithetic)
        loss = token_mean(self._values(model, x0, keys, t, train=train), batch)
        return loss, {"loss": loss}

    def sequence_loss(self, model, batch, key, *, t_samples=1, times="stratified"):
        """The bound (with its prior term) per sequence, averaged over `t_samples` times per
        sequence of scheme `times` on [0, 1] (`corruption.evaluation_times`)."""
        x0 = batch["tokens"]
        k_t, key = jax.random.split(key)
        t_all = corruption.evaluation_times(k_t, (x0.shape[0],), scheme=times, samples=t_samples,
                                            t_min=0.0, t_max=1.0)
        per_token = mean_over_draws(
            lambda k, t: self._values(model, x0, jax.random.split(k, 3), t, train=False), key,
            t_all)
        sums, tokens = sequence_sums(per_token, batch)
        return sums, tokens, {}

    def _values(self, model, x0: Array, keys, t: Array, *, train: bool) -> Array:
        """(B, L) per-token estimate at times t (B,): one x_t, one jump (keys (k_x, k_j, k_drop));
        at evaluation (train=False) with the prior term."""
        B = x0.shape[0]
        k_x, k_j, k_drop = keys
        sb, sg = self.schedule.sigma_bar(t), self.schedule.sigma(t)
        xt = self.process.sample_transition(k_x, x0, sb[:, None])
        x_jump = sample_jump(k_j, self.process, xt)
        # The model at x_t and at x̃ in one call of 2B rows.
        both = jnp.concatenate([xt, x_jump])
        sigma = jnp.concatenate([sb, sb])
        raw = model(both, sigma, deterministic=not train, rngs=dropout_key(k_drop, train))
        probs = self.x0_probs(raw, both)
        values, _ = ctmc_elbo(self.process, probs[:B], probs[B:], x0, xt, x_jump, sb, sg)
        if not train:
            values = values + ctmc_prior_kl(self.process, x0,
                                            self.schedule.sigma_bar(jnp.float32(1.0)),
                                            self.reference_probs())
        return values

    def generator(self, exp, sampling, length):
        from dlm_jax.generation import score_generator
        return score_generator(exp, sampling, length, denoiser="x0_probs")

    def denoiser(self, model) -> Denoiser:
        return Denoiser("x0_probs", lambda xt, sigma_bar: self.x0_probs(model(xt, sigma_bar), xt))

    def flops_per_token(self, *, num_params, depth, width, seq_len, attention="xla",
                        query_params=0, conditioning_params=0):
        return 2 * super().flops_per_token(num_params=num_params, depth=depth, width=width,
                                           seq_len=seq_len, attention=attention,
                                           query_params=query_params,
                                           conditioning_params=conditioning_params)
