"""Metropolis–Hastings chains whose stationary distribution is exactly an AR model's p(x).

The target is p(x) = Π_{i ≥ P} p(x_i | x_<i) given the prompt x_<P, read from one causal pass
(the ratio p(x′)/p(x) is the concrete score of Meng et al., 2022, "Concrete Score Matching",
here evaluated exactly rather than estimated). A step proposes x′ ~ q(· | x) and keeps it with
probability min(1, α), α = p(x′) q(x | x′) / (p(x) q(x′ | x)) (Metropolis et al., 1953;
Hastings, 1970), which leaves p invariant whatever q is, so a poor proposal costs mixing, never
exactness. The chain carries log p(x), so a step costs one AR pass (on x′ only).

Proposals (`proposal`), never touching positions < P:
  "uniform": one position uniform among the L − P free ones and a token uniform among the V − 1
    others: symmetric, q(x′ | x) = q(x | x′) = 1 / ((L − P)(V − 1)).
  "masked": a masked-diffusion proposal. A subset S of m = `num_masked` free positions is drawn
    uniformly (independently of x), masked, and resampled in one step, independently per
    position, from the denoiser's p_θ(x_0 | x_¬S): q(x′ | x) = Π_{i∈S} p_θ(x′_i | x_¬S). The
    reverse move masks the same S and sees the same context x′_¬S = x_¬S, so
    q(x | x′) = Π_{i∈S} p_θ(x_i | x_¬S) comes from the same denoiser call and α is exact.
    With the exact denoiser of p and m = 1 this is a Gibbs step (α = 1). For m > 1 the proposal
    is the product of the conditional marginals, an independence proposal on S (α = 1 only when
    p factorises over S).

States of probability 0: a move to one is never accepted; from one (a bad init outside the
support) a move to a positive state is always accepted, and between two such states the
proposal ratio alone decides, so the chain walks into the support and then stays there.

Randomness: step t of row b uses fold_in(keys[b], t); row b depends on keys[b] only.
Shapes: B batch, L length, P prompt length (≥ 1: position 0 has no AR conditional), V AR
vocabulary, S denoiser states (≥ V, the mask among them), T steps, m masked positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser
from dlm_jax.processes.schedules import LogLinear, Schedule
from dlm_jax.samplers import categorical
from dlm_jax.samplers.speculative import (NextLogProbs, X0LogProbs, masked_fraction_sigma,
                                          proposal_log_probs)
from dlm_jax.samplers.steps import row_keys

Array = jax.Array

PROPOSALS = ("uniform", "masked")


def sequence_log_prob(ar_log_probs: NextLogProbs | Denoiser, tokens: Array,
                      prompt_len: int) -> Array:
    """log p(x_{≥P} | x_<P) = Σ_{i ≥ P} log p(x_i | x_<i) from one causal pass: tokens (B, L)
    int -> (B,) float32 (−inf where a token has probability 0)."""
    fn = Denoiser.function(ar_log_probs, "next_token_log_probs", "ar_log_probs")
    tokens = jnp.asarray(tokens, jnp.int32)
    lp = jax.nn.log_softmax(fn(tokens).astype(jnp.float32), axis=-1)
    per = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # (B, L − 1)
    scored = jnp.arange(1, tokens.shape[1]) >= prompt_len
    return jnp.where(scored[None, :], per, 0.0).sum(-1)


def log_acceptance(log_p_new: Array, log_p_old: Array, log_q_fwd: Array,
                   log_q_rev: Array) -> Array:
    """log α = log p(x′) − log p(x) + log q(x | x′) − log q(x′ | x), all (B,) -> (B,), with the
    zero-probability conventions of the module docstring (+inf: always accept)."""
    proposal = log_q_rev - log_q_fwd
    old_zero, new_zero = log_p_old == -jnp.inf, log_p_new == -jnp.inf
    return jnp.where(old_zero, jnp.where(new_zero, proposal, jnp.inf),
                     jnp.where(new_zero, -jnp.inf, log_p_new - log_p_old + proposal))


def propose_uniform(keys: Array, x: Array, prompt_len: int, vocab: int) -> Array:
    """One free position and a different token, both uniform: keys (B,), x (B, L) -> x′ (B, L).
    Symmetric, so its log q ratio is 0."""
    L = x.shape[1]

    def row(key, xr):
        k_pos, k_tok = jax.random.split(key)
        i = jax.random.randint(k_pos, (), prompt_len, L)
        shift = jax.random.randint(k_tok, (), 1, vocab)          # never the current token
        return xr.at[i].set((xr[i] + shift) % vocab)
    return jax.vmap(row)(keys, x)


def random_subset(keys: Array, length: int, prompt_len: int, num_masked: int) -> Array:
    """(B, L) bool: m positions per row, uniform among [P, L), independent of the tokens."""
    def row(key):
        score = jnp.where(jnp.arange(length) >= prompt_len,
                          jax.random.uniform(key, (length,)), -1.0)
        chosen = jax.lax.top_k(score, num_masked)[1]
        return jnp.zeros((length,), bool).at[chosen].set(True)
    return jax.vmap(row)(keys)


def masked_log_q(log_p_x0: Array, x: Array, x_new: Array, subset: Array, vocab: int,
                 mask_id: int) -> tuple[Array, Array]:
    """(log q(x′ | x), log q(x | x′)) of the masked proposal, both (B,), from the denoiser's
    output log_p_x0 (B, L, S) on x with `subset` (B, L) masked; x, x′ (B, L) agree off it."""
    log_r = jax.nn.log_softmax(proposal_log_probs(log_p_x0, vocab, mask_id), axis=-1)

    def total(tokens):
        per = jnp.take_along_axis(log_r, tokens[..., None], axis=-1)[..., 0]
        return jnp.where(subset, per, 0.0).sum(-1)
    return total(x_new), total(x)


def propose_masked(keys: Array, x: Array, denoiser: X0LogProbs | Denoiser, *, prompt_len: int,
                   num_masked: int, vocab: int, mask_id: int,
                   schedule: Schedule = LogLinear()) -> tuple[Array, Array, Array, Array]:
    """Mask m random free positions and resample them from one denoiser call.

    keys (B,); x (B, L); denoiser (xt (B, L), σ̄ (B,)) -> (B, L, S) SUBS log-probs, fed σ̄ at
    t = m / (L − P). Returns (x′ (B, L), log q(x′ | x) (B,), log q(x | x′) (B,), S (B, L) bool).
    """
    fn = Denoiser.function(denoiser, "x0_log_probs", "denoiser")
    x = jnp.asarray(x, jnp.int32)
    subset = random_subset(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), x.shape[1],
                           prompt_len, num_masked)
    xm = jnp.where(subset, mask_id, x)
    lp = fn(xm, masked_fraction_sigma(schedule, xm, mask_id, prompt_len))
    lpq = proposal_log_probs(lp, vocab, mask_id)
    draw = jax.vmap(lambda k, r: categorical.sample(jax.random.fold_in(k, 1), r))(keys, lpq)
    x_new = jnp.where(subset, draw, x)
    fwd, rev = masked_log_q(lp, x, x_new, subset, vocab, mask_id)
    return x_new, fwd, rev, subset


def mh_sample(ar_log_probs: NextLogProbs | Denoiser, keys: Array, init: Array, *, steps: int,
              prompt_len: int, proposal: str = "uniform",
              denoiser: X0LogProbs | Denoiser | None = None, mask_id: int | None = None,
              num_masked: int = 1, schedule: Schedule = LogLinear(),
              track_log_prob: bool = False) -> dict[str, Array]:
    """Run B independent MH chains for T = `steps` steps (a `lax.scan`) targeting the AR model.

    ar_log_probs: tokens (B, L) -> (B, L, V) next-token log-probs (row i predicts i + 1), causal,
      or a Denoiser of kind "next_token_log_probs". keys (B,): one per chain. init (B, L) int:
      any start (an AR or a diffusion sample, or a bad one); positions < prompt_len are the
      prompt, never changed. proposal: "uniform" or "masked" (needs `denoiser`, its `mask_id`,
      and 1 ≤ num_masked ≤ L − P); see the module docstring.

    Returns {"tokens": (B, L) int32 the final states, "log_prob": (B,) their log p,
             "accept_rate": (B,) float32 per chain, "acceptance": float32[] over all,
             "ar_nfe": int32[] AR passes (T + 1), "denoiser_nfe": int32[] (T or 0),
             and with track_log_prob "log_probs": (B, T) log p after each step}.
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"unknown proposal {proposal!r}; choose one of {PROPOSALS}")
    init = jnp.asarray(init)
    if init.ndim != 2 or not jnp.issubdtype(init.dtype, jnp.integer):
        raise ValueError(f"init must be (B, L) integer tokens, got shape {init.shape} dtype "
                         f"{init.dtype}")
    B, L = init.shape
    if keys.ndim != 1 or keys.shape[0] != B:
        raise ValueError(f"keys of shape {keys.shape} for {B} chains: one key per chain")
    if not 1 <= prompt_len < L:
        raise ValueError(f"prompt_len must be in [1, L={L}) (position 0 has no AR conditional "
                         f"and at least one position must be free), got {prompt_len}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ar_fn = Denoiser.function(ar_log_probs, "next_token_log_probs", "ar_log_probs")
    x0 = init.astype(jnp.int32)
    V = jax.eval_shape(ar_fn, x0).shape[-1]
    if proposal == "uniform" and V < 2:
        raise ValueError(f"the uniform proposal needs a vocabulary of >= 2 tokens, got {V}")
    if proposal == "masked":
        if denoiser is None or mask_id is None:
            raise ValueError("the masked proposal needs a denoiser and its mask_id")
        if not 1 <= num_masked <= L - prompt_len:
            raise ValueError(f"num_masked must be in [1, L − P = {L - prompt_len}], got "
                             f"{num_masked}")
        Denoiser.function(denoiser, "x0_log_probs", "denoiser")
        if mask_id < V:
            raise ValueError(f"mask_id {mask_id} is a token of the AR vocabulary (V={V}); the "
                             f"mask must be a state >= V")

    def step(carry, t):
        x, log_p, accepted = carry
        k = row_keys(keys, t)
        if proposal == "uniform":
            x_new = propose_uniform(k, x, prompt_len, V)
            fwd = rev = jnp.zeros((B,), jnp.float32)
        else:
            x_new, fwd, rev, _ = propose_masked(k, x, denoiser, prompt_len=prompt_len,
                                                num_masked=num_masked, vocab=V,
                                                mask_id=mask_id, schedule=schedule)
        log_p_new = sequence_log_prob(ar_fn, x_new, prompt_len)
        log_alpha = log_acceptance(log_p_new, log_p, fwd, rev)
        u = jax.vmap(lambda kr: categorical.fine_uniform(jax.random.fold_in(kr, 2), ()))(k)
        keep = jnp.log(u) < log_alpha
        x = jnp.where(keep[:, None], x_new, x)
        log_p = jnp.where(keep, log_p_new, log_p)
        return (x, log_p, accepted + keep.astype(jnp.int32)), log_p

    init_carry = (x0, sequence_log_prob(ar_fn, x0, prompt_len), jnp.zeros((B,), jnp.int32))
    (x, log_p, accepted), trace = jax.lax.scan(step, init_carry, jnp.arange(steps))
    out = {"tokens": x, "log_prob": log_p, "accept_rate": accepted / steps,
           "acceptance": accepted.sum() / (B * steps), "ar_nfe": jnp.int32(steps + 1),
           "denoiser_nfe": jnp.int32(steps if proposal == "masked" else 0)}
    if track_log_prob:
        out["log_probs"] = trace.T
    return out
