"""Samplers for masked (absorbing) diffusion and for D3PM, driven by a denoiser function.

Masked diffusion (S = V + 1 states, the mask `mask_id`):
  * `ancestral`: the MDLM "ddpm" sampler (Sahoo et al., 2024, "Simple and Effective Masked
    Diffusion Language Models"): over t = linspace(1, t_final, steps + 1), each masked
    position is revealed with probability (α_s − α_t)/(1 − α_t) and takes a token from
    p_θ(x_0 | x_t); then "noise removal", a greedy fill of whatever is still masked.
  * `ancestral_cached`: the same chain ("ddpm_cache"), reusing the previous log-probabilities of a
    row whose tokens did not change when the denoiser ignores σ̄ — most steps change nothing when
    steps ≫ L. Token for token equal to `ancestral` under the same keys.
  * `first_hitting`: one unmasking event per step, at the time the next masked position is hit
    (the first-hitting sampler of Zheng et al., 2025, "Masked diffusion models are secretly
    time-agnostic masked models and exploit inaccurate categorical sampling"), batched with
    per-row times.
  * `confidence_decode`: confidence-ordered parallel decoding in the style of Mask-Predict
    (Ghazvininejad et al., 2019) and LLaDA (Nie et al., 2025, "Large Language Diffusion Models"):
    top-k by confidence / margin / entropy on a schedule, or every position above a threshold;
    ReMDM remasking (Wang et al., 2025, "Remasking Discrete Diffusion Models with Inference-Time
    Scaling"); semi-autoregressive strides of a bidirectional model.
D3PM (Austin et al., 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces"):
  * `d3pm_ancestral`: x_T ~ π, then x_{t−1} ~ p_θ(x_{t−1} | x_t) for t = T … 1 (their eq. 4).

Denoisers. `denoise(xt (B, L) int32, sigma_bar (B,) float32) -> (B, L, S)` SUBS log-probabilities
log p_θ(x_0 | x_t) (kind "x0_log_probs" of `methods.base.Denoiser`, which may be passed as is):
−1e6 (or −inf) at the mask, carry-over one-hot at unmasked positions. The samplers only ever
change masked positions, so prompts and clamped tokens stay fixed whatever the denoiser returns
there. σ̄ is what a time-conditioned network is fed; a time-independent one ignores it.

Conditioning. `prompt` (B, P) int32 is a prefix held fixed (the output keeps it: L includes P);
`clamp = (known (B, L) bool, tokens (B, L) int32)` fixes arbitrary positions (infilling); where
both apply, `clamp` wins. Masked diffusion conditions exactly by starting from x_t with the fixed
tokens unmasked: with the exact denoiser, the free positions follow the exact conditional.

Randomness. `keys` is a (B,) array of typed keys, one per sequence. Step n draws from
`steps.row_keys(keys, n)` and each row's draws come from its own key only, so row i's output is
the same alone or in any batch (also its `nfe`, which counts the denoiser evaluations a batch-1
run of that row performs; the batched program evaluates the whole batch whenever any row needs
it).

Compilation. Each sampler is one jitted program (`lax.scan` over a static number of steps, or
`lax.while_loop` where it stops early). The denoiser, schedule and options are static: pass the
same function object to reuse a compilation. A denoiser closing over model parameters bakes them
in as constants; to avoid that, call the sampler inside your own `jax.jit` with a denoiser that
closes over the traced parameters.

Shapes: B batch, L length, P prompt length, S states, V real tokens (= S − 1 for masking).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.methods.base import Denoiser
from dlm_jax.samplers import categorical
from dlm_jax.samplers import steps as step_fns

Array = jax.Array

STRATEGIES = ("confidence", "margin", "entropy", "random")
REMASK_MODES = ("rescale", "cap")
# A revealed count target ceil(N·f) must not jump by one because N·f is 2.0000002 in float32.
_COUNT_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Validation and set-up (Python, on static shapes only: works on tracers too)
# ---------------------------------------------------------------------------------------------
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_keys(keys) -> int:
    """B from a (B,) array of typed keys."""
    dtype = getattr(keys, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key):
        raise ValueError("keys must be a (B,) array of typed PRNG keys (jax.random.key(seed) "
                         f"split into B), got dtype {dtype}")
    if keys.ndim != 1:
        raise ValueError(f"keys must be a (B,) array of typed keys, one per sequence, got shape "
                         f"{keys.shape}")
    return keys.shape[0]


def _initial(batch: int, length: int, mask_id: int, prompt, clamp) -> tuple[Array, Array, int]:
    """All-mask x (B, L) int32 with prompt/clamped tokens written in, `known` (B, L) bool, P."""
    length = _check_int(length, "length", 1)
    _check_int(mask_id, "mask_id", 0)
    known = jnp.zeros((batch, length), bool)
    tokens = jnp.full((batch, length), mask_id, jnp.int32)
    p_len = 0
    if prompt is not None:
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[0] != batch:
            raise ValueError(f"prompt must be (B, P) = ({batch}, P) int tokens, got shape "
                             f"{prompt.shape}")
        if not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"prompt must hold integer tokens, got dtype {prompt.dtype}")
        p_len = prompt.shape[1]
        if p_len > length:
            raise ValueError(f"prompt of length P={p_len} is longer than the sequence length "
                             f"L={length}")
        known = known.at[:, :p_len].set(True)
        tokens = tokens.at[:, :p_len].set(prompt.astype(jnp.int32))
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError("clamp must be a pair (known (B, L) bool, tokens (B, L) int)")
        c_known, c_tok = jnp.asarray(clamp[0]), jnp.asarray(clamp[1])
        if c_known.shape != (batch, length) or c_tok.shape != (batch, length):
            raise ValueError(f"clamp arrays must be (B, L) = ({batch}, {length}), got shapes "
                             f"{c_known.shape} and {c_tok.shape}")
        if c_known.dtype != jnp.bool_ or not jnp.issubdtype(c_tok.dtype, jnp.integer):
            raise ValueError(f"clamp must be (bool, int) arrays, got dtypes {c_known.dtype} and "
                             f"{c_tok.dtype}")
        known = known | c_known
        tokens = jnp.where(c_known, c_tok.astype(jnp.int32), tokens)
    return jnp.where(known, tokens, mask_id), known, p_len


def _check_output(fn, x: Array, mask_id: int) -> None:
    """The denoiser must map (B, L) tokens and (B,) σ̄ to (B, L, S) with S > mask_id."""
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, jnp.int32),
                         jax.ShapeDtypeStruct(x.shape[:1], jnp.float32))
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 3 or tuple(shape[:2]) != tuple(x.shape) \
            or shape[2] <= mask_id:
        raise ValueError(f"denoise(xt {tuple(x.shape)}, sigma_bar ({x.shape[0]},)) must return "
                         f"(B, L, S) log-probs with S > mask_id={mask_id}, got {out}")


def _check_truncation(temperature, top_k, top_p) -> tuple[float, int, float]:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_k = _check_int(top_k, "top_k", 0)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return float(temperature), top_k, float(top_p)


def _split(keys: Array, num: int) -> Array:
    """(B,) keys -> (B, num) keys, row by row."""
    return jax.vmap(lambda k: jax.random.split(k, num))(keys)


def _real_log_probs(log_p: Array, mask_id: int) -> Array:
    """log p over real tokens only (the mask column −inf), renormalised: (..., S) float32."""
    lp = jnp.asarray(log_p, jnp.float32)
    lp = jnp.where(jnp.arange(lp.shape[-1]) == mask_id, -jnp.inf, lp)
    return jax.nn.log_softmax(lp, axis=-1)


# ---------------------------------------------------------------------------------------------
# MDLM ancestral ("ddpm") and its cached variant ("ddpm_cache")
# ---------------------------------------------------------------------------------------------
def ancestral(denoise, schedule, keys: Array, length: int, mask_id: int, *, steps: int,
              t_final: float = 1e-5, noise_removal: bool = True, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, prompt: Array | None = None,
              clamp: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """MDLM ancestral sampling (Sahoo et al., 2024, the SUBS reverse posterior), one denoiser
    call per step.

    Times t_n = linspace(1, t_final, steps + 1). Step n (t = t_n → s = t_{n+1}) reveals each
    masked position with probability (α_s − α_t)/(1 − α_t) = 1 − m(s)/m(t), with m = 1 − α the
    schedule's `move_prob` ((t − s)/t for log-linear), drawing its token from p_θ(x_0 | x_t) at
    σ̄(t) after temperature / top-k / top-p. With `noise_removal` a final call at σ̄(t_final)
    fills the positions still masked with their most likely token (the MDLM default; they are a
    fraction ≈ m(t_final)/m(1) of the free positions).

    Args:
      denoise: (xt (B, L), σ̄ (B,)) -> (B, L, S) SUBS log p_θ(x_0 | x_t), or a Denoiser.
      schedule: a masking `Schedule` (move_prob, sigma_bar).
      keys: (B,) typed keys. length: L. mask_id: the mask state.
      steps: number of reverse steps (≥ 1).
      prompt: (B, P) fixed prefix; clamp: (known (B, L) bool, tokens (B, L)) fixed positions.
    Returns:
      tokens (B, L) int32; nfe (B,) int32 = steps (+1 for noise removal when a row still has a
      masked position).
    """
    return _ancestral_entry(denoise, schedule, keys, length, mask_id, steps=steps,
                            t_final=t_final, noise_removal=noise_removal,
                            temperature=temperature, top_k=top_k, top_p=top_p, prompt=prompt,
                            clamp=clamp, cached=False, time_conditioned=True)


def ancestral_cached(denoise, schedule, keys: Array, length: int, mask_id: int, *, steps: int,
                     time_conditioned: bool = False, t_final: float = 1e-5,
                     noise_removal: bool = True, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, prompt: Array | None = None,
                     clamp: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """`ancestral` with MDLM's output cache (the "ddpm_cache" sampler of Sahoo et al., 2024).

    A row whose tokens did not change in the previous step reuses its previous log-probabilities
    instead of a new denoiser evaluation: for a denoiser that ignores σ̄ (time conditioning off,
    `time_conditioned=False`, the MDLM/BD3-LM default) the input is the same, so the output is too,
    and the samples equal `ancestral`'s token for token under the same keys. The call is skipped
    for real (`lax.cond`) when no row of the batch needs it. With `time_conditioned=True` nothing
    is reused (σ̄ differs every step) and this is `ancestral`.

    Returns tokens (B, L) int32 and nfe (B,) int32: the steps at which the row needed a fresh
    evaluation (the first one, and each after a step that changed the row), plus the noise-removal
    call when it is needed. Arguments as in `ancestral`.
    """
    return _ancestral_entry(denoise, schedule, keys, length, mask_id, steps=steps,
                            t_final=t_final, noise_removal=noise_removal,
                            temperature=temperature, top_k=top_k, top_p=top_p, prompt=prompt,
                            clamp=clamp, cached=True, time_conditioned=bool(time_conditioned))


def _ancestral_entry(denoise, schedule, keys, length, mask_id, *, steps, t_final, noise_removal,
                     temperature, top_k, top_p, prompt, clamp, cached, time_conditioned):
    fn = Denoiser.function(denoise, "x0_log_probs", "denoise")
    steps = _check_int(steps, "steps", 1)
    if not 0.0 < t_final < 1.0:
        raise ValueError(f"t_final must be in (0, 1), got {t_final}")
    temperature, top_k, top_p = _check_truncation(temperature, top_k, top_p)
    batch = _check_keys(keys)
    x, _, _ = _initial(batch, length, mask_id, prompt, clamp)
    _check_output(fn, x, mask_id)
    return _ancestral_jit(fn, schedule, keys, x, mask_id=int(mask_id), steps=steps,
                          t_final=float(t_final), noise_removal=bool(noise_removal),
                          temperature=temperature, top_k=top_k, top_p=top_p, cached=cached,
                          time_conditioned=time_conditioned)


@functools.partial(jax.jit, static_argnames=(
    "fn", "schedule", "mask_id", "steps", "t_final", "noise_removal", "temperature", "top_k",
    "top_p", "cached", "time_conditioned"))
def _ancestral_jit(fn, schedule, keys, x, *, mask_id, steps, t_final, noise_removal,
                   temperature, top_k, top_p, cached, time_conditioned):
    B, L = x.shape
    ts = jnp.linspace(1.0, t_final, steps + 1, dtype=jnp.float32)
    move = schedule.move_prob(ts)
    sigma_bar = schedule.sigma_bar(ts)
    # (α_s − α_t)/(1 − α_t) = 1 − m(s)/m(t): no difference of nearly equal keep probabilities.
    p_reveal = 1.0 - move[1:] / move[:-1]

    def call(x, n):
        return fn(x, jnp.full((B,), sigma_bar[n], jnp.float32)).astype(jnp.float32)

    def fresh_or_cached(x, n, need, cache):
        if not cached:
            return call(x, n)
        # Skip the network when no row needs it; otherwise refresh only the rows that changed.
        return jax.lax.cond(need.any(),
                            lambda: jnp.where(need[:, None, None], call(x, n), cache),
                            lambda: cache)

    out = jax.eval_shape(lambda: call(x, 0))
    cache0 = jnp.zeros(out.shape, jnp.float32) if cached else None

    def body(carry, n):
        x, cache, need, nfe = carry
        lp = fresh_or_cached(x, n, need, cache)
        x_new = step_fns.ancestral_step(step_fns.row_keys(keys, n), x, lp,
                                        jnp.full((B,), p_reveal[n]), mask_id,
                                        temperature=temperature, top_k=top_k, top_p=top_p)
        nfe = nfe + need.astype(jnp.int32)
        if cached and not time_conditioned:
            need = (x_new != x).any(-1)
        return (x_new, lp if cached else None, need, nfe), None

    need0 = jnp.ones((B,), bool)
    carry = (x, cache0, need0, jnp.zeros((B,), jnp.int32))
    (x, cache, need, nfe), _ = jax.lax.scan(body, carry, jnp.arange(steps))

    if noise_removal:
        masked = x == mask_id
        need_f = need & masked.any(-1)
        # The greedy fill is a no-op without masks: skip the call when no row has any.
        lp = jax.lax.cond(
            need_f.any(),
            lambda: jnp.where(need_f[:, None, None], call(x, steps),
                              cache if cached else jnp.zeros(out.shape, jnp.float32)),
            lambda: cache if cached else jnp.zeros(out.shape, jnp.float32))
        greedy = jnp.argmax(_real_log_probs(lp, mask_id), axis=-1).astype(jnp.int32)
        x = jnp.where(masked, greedy, x)
        nfe = nfe + need_f.astype(jnp.int32)
    return x, nfe


# ---------------------------------------------------------------------------------------------
# First hitting
# ---------------------------------------------------------------------------------------------
def first_hitting(denoise, schedule, keys: Array, length: int, mask_id: int, *,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  prompt: Array | None = None, clamp: tuple[Array, Array] | None = None
                  ) -> tuple[Array, Array]:
    """First-hitting sampler (Zheng et al., 2025): exactly one unmasking per step.

    Going back from t = 1, with n positions of a row masked at "time" m = 1 − α_t (the schedule's
    move probability), each stays masked at s < t independently with probability m(s)/m(t), so
    all n still are with probability (m(s)/m(t))^n and the next event is where m falls to
    m·u^{1/n}, u ~ U(0, 1). The row's m is updated so, the denoiser is called at
    σ̄ = −log(1 − m), and one masked position chosen uniformly takes a token from p_θ(x_0 | x_t). This is exact for any schedule (the schedule only sets the start
    m = move_prob(1)); the time matters to time-conditioned denoisers only. Batched: every row
    has its own times and reveals one of its own positions per step; rows that are done wait.
    The loop (`lax.while_loop`) ends when no row has a masked position: ≤ L − P steps.

    Args as in `ancestral` (no `steps`: the number of events is the number of free positions).
    Returns tokens (B, L) int32 and nfe (B,) int32 = the row's number of free positions.
    """
    fn = Denoiser.function(denoise, "x0_log_probs", "denoise")
    temperature, top_k, top_p = _check_truncation(temperature, top_k, top_p)
    batch = _check_keys(keys)
    x, _, p_len = _initial(batch, length, mask_id, prompt, clamp)
    _check_output(fn, x, mask_id)
    return _first_hitting_jit(fn, schedule, keys, x, mask_id=int(mask_id),
                              max_steps=x.shape[1] - p_len, temperature=temperature,
                              top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("fn", "schedule", "mask_id", "max_steps",
                                             "temperature", "top_k", "top_p"))
def _first_hitting_jit(fn, schedule, keys, x, *, mask_id, max_steps, temperature, top_k, top_p):
    B = x.shape[0]
    m0 = jnp.full((B,), schedule.move_prob(jnp.float32(1.0)), jnp.float32)

    def cond(carry):
        n, x, _, _ = carry
        return (n < max_steps) & (x == mask_id).any()

    def body(carry):
        n, x, m, nfe = carry
        k = _split(step_fns.row_keys(keys, n), 2)
        count = (x == mask_id).sum(-1)
        live = count > 0
        u = jax.vmap(lambda kk: categorical.fine_uniform(kk, ()))(k[:, 1])
        m = jnp.where(live, m * jnp.exp(jnp.log(u) / jnp.maximum(count, 1)), m)
        lp = fn(x, -jnp.log1p(-m)).astype(jnp.float32)
        x = step_fns.first_hitting_step(k[:, 0], x, lp, mask_id, temperature=temperature,
                                        top_k=top_k, top_p=top_p)
        return n + 1, x, m, nfe + live.astype(jnp.int32)

    carry = (jnp.int32(0), x, m0, jnp.zeros((B,), jnp.int32))
    _, x, _, nfe = jax.lax.while_loop(cond, body, carry)
    return x, nfe


# ---------------------------------------------------------------------------------------------
# Confidence-ordered parallel decoding (Mask-Predict / LLaDA), ReMDM remasking, strides
# ---------------------------------------------------------------------------------------------
def confidence_decode(denoise, schedule, keys: Array, length: int, mask_id: int, *,
                      steps: int | None = None, strategy: str = "confidence",
                      threshold: float | None = None, stride: int | None = None,
                      remask: float = 0.0, remask_mode: str = "rescale",
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      prompt: Array | None = None, clamp: tuple[Array, Array] | None = None
                      ) -> tuple[Array, Array]:
    """Confidence-ordered parallel decoding (Mask-Predict, Ghazvininejad et al., 2019; LLaDA's
    low-confidence remasking, Nie et al., 2025). Not an exact sampler of p_θ.

    Each step calls the denoiser on the current x (at σ̄ = −log(1 − m), m = move_prob(1) × the
    row's masked fraction of free positions), draws a candidate x̂ at every masked position from
    p_θ(x_0 | x_t) (temperature 0 = argmax, the default; top-k / top-p), scores the masked
    positions by `strategy` on p_θ:
      "confidence": p_θ(x̂) (the max probability when greedy); "margin": top-1 − top-2
      probability; "entropy": −H(p_θ); "random": a uniform draw (LLaDA's random remasking),
    and reveals the best ones (ties: leftmost first):
      * top-k mode (`threshold=None`): after step j of J = steps (per stride) the number revealed
        is ceil(N·(1 − m(t_{j+1})/m(1))) on the grid t_j = 1 − j/J, N the free positions (of the
        stride): a linear schedule gives the even split (N/J per step), all revealed after J;
      * threshold mode: every masked position (of the current stride) whose score exceeds
        `threshold`, and at least the best one per step (Fast-dLLM's parallel rule, Wu et al., 2025); runs until done
        (`lax.while_loop`, ≤ L − P steps), `steps` unused.
    `remask` = η > 0 (top-k mode): ReMDM remasking (Wang et al., 2025): before revealing,
    each token revealed earlier by the sampler (never a prompt or clamped one) is masked again with
    probability σ_j, "rescale": σ_j = η·σ_max, "cap": σ_j = min(η, σ_max), with
    σ_max = min(1, (1 − α_s)/α_t) and α the scheduled revealed fraction at t_j, t_{j+1}; the
    count to reveal grows by the number remasked so the schedule is still met. σ_max = 0 at the
    last step, so everything is revealed at the end.
    `stride`: semi-autoregressive decoding of a bidirectional model (MDLM's semi-AR
    sampling; LLaDA's block_length): positions P … L − 1 are split into strides of `stride`, decoded left to right,
    only the current stride active (changed). Top-k mode gives each stride steps / num_strides
    steps (steps must be a multiple); threshold mode moves on once a stride is full.

    Returns tokens (B, L) int32 and nfe (B,) int32 (top-k mode: steps; threshold mode: the
    steps while the row still had a masked position).
    """
    fn = Denoiser.function(denoise, "x0_log_probs", "denoise")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown confidence strategy {strategy!r}; choose one of "
                         f"{list(STRATEGIES)}")
    if remask_mode not in REMASK_MODES:
        raise ValueError(f"unknown remask_mode {remask_mode!r}; choose one of "
                         f"{list(REMASK_MODES)}")
    if not 0.0 <= remask <= 1.0:
        raise ValueError(f"remask (ReMDM's eta) must be in [0, 1], got {remask}")
    temperature, top_k, top_p = _check_truncation(temperature, top_k, top_p)
    batch = _check_keys(keys)
    x, known, p_len = _initial(batch, length, mask_id, prompt, clamp)
    _check_output(fn, x, mask_id)
    L = x.shape[1]
    if stride is not None:
        stride = _check_int(stride, "stride", 1)
    num_strides = max(1, -(-(L - p_len) // stride)) if stride else 1
    if threshold is not None:
        if strategy == "random":
            raise ValueError("threshold decoding needs a confidence score; strategy 'random' "
                             "has none")
        if remask > 0:
            raise ValueError("ReMDM remasking (remask > 0) needs the fixed-step top-k schedule, "
                             "not threshold decoding")
        return _threshold_jit(fn, schedule, keys, x, known, mask_id=int(mask_id),
                              p_len=p_len, strategy=strategy, threshold=float(threshold),
                              stride=stride, temperature=temperature, top_k=top_k, top_p=top_p)
    if steps is None:
        raise ValueError("confidence_decode needs steps (or a threshold)")
    steps = _check_int(steps, "steps", 1)
    if steps % num_strides:
        raise ValueError(f"steps={steps} must be a multiple of the number of strides "
                         f"({num_strides} = ceil((L - P) / stride) with L={L}, P={p_len}, "
                         f"stride={stride})")
    return _topk_jit(fn, schedule, keys, x, known, mask_id=int(mask_id), p_len=p_len,
                     steps_per_stride=steps // num_strides, num_strides=num_strides,
                     strategy=strategy, stride=stride, remask=float(remask),
                     remask_mode=remask_mode, temperature=temperature, top_k=top_k,
                     top_p=top_p)


def _scores(key: Array, lp: Array, x_hat: Array, strategy: str) -> Array:
    """Per-position score of one row: lp (L, S) real-token log-probs, x_hat (L,) -> (L,)."""
    p = jnp.exp(lp)
    if strategy == "confidence":
        return jnp.take_along_axis(p, x_hat[:, None], axis=-1)[:, 0]
    if strategy == "margin":
        top2 = jax.lax.top_k(p, 2)[0]
        return top2[:, 0] - top2[:, 1]
    if strategy == "entropy":
        return jnp.where(p > 0, p * lp, 0.0).sum(-1)       # −H(p), 0·log 0 = 0
    return categorical.fine_uniform(key, (lp.shape[0],))


def _ranks(score: Array) -> Array:
    """Rank of each position by descending score, ties leftmost first: (B, L) -> (B, L) int."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def _propose(fn, schedule, k_tok, k_score, x, known, mask_id, strategy, temperature, top_k,
             top_p):
    """One denoiser call: candidate tokens x̂ (B, L) and their scores (B, L)."""
    free = ~known
    masked_free = ((x == mask_id) & free).sum(-1)
    frac = masked_free / jnp.maximum(free.sum(-1), 1)
    m = schedule.move_prob(jnp.float32(1.0)) * frac.astype(jnp.float32)
    lp = _real_log_probs(fn(x, -jnp.log1p(-m)), mask_id)
    x_hat = jax.vmap(lambda k, l: categorical.sample(
        k, l, temperature=temperature, top_k=top_k, top_p=top_p))(k_tok, lp)
    score = jax.vmap(lambda k, l, h: _scores(k, l, h, strategy))(k_score, lp, x_hat)
    return x_hat, score


@functools.partial(jax.jit, static_argnames=(
    "fn", "schedule", "mask_id", "p_len", "steps_per_stride", "num_strides", "strategy",
    "stride", "remask", "remask_mode", "temperature", "top_k", "top_p"))
def _topk_jit(fn, schedule, keys, x, known, *, mask_id, p_len, steps_per_stride, num_strides,
              strategy, stride, remask, remask_mode, temperature, top_k, top_p):
    B, L = x.shape
    J = steps_per_stride
    pos = jnp.arange(L)
    free = ~known
    # Scheduled revealed fraction after j of J steps, α_j = 1 − m(t_j)/m(1), t_j = 1 − j/J.
    t_grid = jnp.linspace(1.0, 0.0, J + 1, dtype=jnp.float32)
    alpha = 1.0 - schedule.move_prob(t_grid) / schedule.move_prob(jnp.float32(1.0))
    alpha = alpha.at[0].set(0.0).at[J].set(1.0)

    def body(x, n):
        b, j = n // J, n % J
        if stride:
            region = (pos >= p_len + b * stride) & (pos < p_len + (b + 1) * stride)
        else:
            region = jnp.ones((L,), bool)
        active = free & region[None, :]
        masked = x == mask_id
        m_act = masked & active
        n_free = active.sum(-1)
        revealed = (active & ~masked).sum(-1)
        k = _split(step_fns.row_keys(keys, n), 3)
        x_hat, score = _propose(fn, schedule, k[:, 0], k[:, 1], x, known, mask_id, strategy,
                                temperature, top_k, top_p)
        a_t, a_s = alpha[j], alpha[j + 1]
        target = jnp.ceil(n_free * a_s - _COUNT_TOL).astype(jnp.int32)
        target = jnp.where(j == J - 1, n_free, jnp.clip(target, 0, n_free))
        if remask > 0:
            sig_max = jnp.where(a_t > 0, jnp.minimum(1.0, (1.0 - a_s) / jnp.maximum(a_t, 1e-30)),
                                1.0)
            sig = remask * sig_max if remask_mode == "rescale" else jnp.minimum(remask, sig_max)
            u = jax.vmap(lambda kk: categorical.fine_uniform(kk, (L,)))(k[:, 2])
            back = active & ~masked & (u < sig)
        else:
            back = jnp.zeros_like(active)
        count = jnp.clip(target - (revealed - back.sum(-1)), 0, m_act.sum(-1))
        rank = _ranks(jnp.where(m_act, score, -jnp.inf))
        reveal = m_act & (rank < count[:, None])
        x_new = jnp.where(reveal, x_hat, x)
        return jnp.where(back, mask_id, x_new), None

    x, _ = jax.lax.scan(body, x, jnp.arange(J * num_strides))
    return x, jnp.full((B,), J * num_strides, jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "fn", "schedule", "mask_id", "p_len", "strategy", "threshold", "stride", "temperature",
    "top_k", "top_p"))
def _threshold_jit(fn, schedule, keys, x, known, *, mask_id, p_len, strategy, threshold, stride,
                   temperature, top_k, top_p):
    B, L = x.shape
    pos = jnp.arange(L)
    free = ~known
    # Stride of each position (prompt positions are known, so their index never matters).
    stride_of = jnp.where(pos >= p_len, (pos - p_len) // (stride or L), -1)

    def cond(carry):
        n, x, _ = carry
        return (n < L - p_len) & ((x == mask_id) & free).any()

    def body(carry):
        n, x, nfe = carry
        masked = x == mask_id
        m_free = masked & free
        if stride:
            # The row's current stride: the leftmost one with a masked free position.
            current = jnp.where(m_free, stride_of[None, :], L).min(-1)
            active = free & (stride_of[None, :] == current[:, None])
        else:
            active = free
        m_act = masked & active
        k = _split(step_fns.row_keys(keys, n), 2)
        x_hat, score = _propose(fn, schedule, k[:, 0], k[:, 1], x, known, mask_id, strategy,
                                temperature, top_k, top_p)
        score = jnp.where(m_act, score, -jnp.inf)
        reveal = m_act & ((score > threshold) | (_ranks(score) == 0))
        return n + 1, jnp.where(reveal, x_hat, x), nfe + m_free.any(-1).astype(jnp.int32)

    _, x, nfe = jax.lax.while_loop(cond, body, (jnp.int32(0), x, jnp.zeros((B,), jnp.int32)))
    return x, nfe


# ---------------------------------------------------------------------------------------------
# D3PM
# ---------------------------------------------------------------------------------------------
def d3pm_ancestral(reverse_log_probs_fn, process, keys: Array, length: int, *,
                   steps: int | None = None) -> tuple[Array, Array]:
    """D3PM ancestral sampling (Austin et al., 2021, eq. 4): x_T ~ π (uniform draws, or
    all-mask for absorbing), then x_{t−1} ~ p_θ(x_{t−1} | x_t) for t = T, …, 1.

    Args:
      reverse_log_probs_fn: (xt (B, L) int32, t (B,) int32) -> (B, L, S) log p_θ(x_{t−1} | x_t),
        e.g. `DiscreteTime.reverse_log_probs(model)` (x0-parameterised; at t = 1 the decoder).
      process: the `D3PM` process (T = num_steps, the prior π).
      keys: (B,) typed keys; key i's fold_in(·, 0) draws the prior, fold_in(·, n) step n ≥ 1.
      length: L.
      steps: the number of reverse steps; must be T (None = T). The one-step reverse of
        p_θ(x_{t−1} | x_t) cannot skip steps.
    Returns:
      tokens x_0 (B, L) int32; nfe (B,) int32 = T.
    """
    if isinstance(reverse_log_probs_fn, Denoiser) or not callable(reverse_log_probs_fn):
        raise ValueError("d3pm_ancestral needs the one-step reverse function (xt, t) -> log "
                         "p(x_{t-1} | x_t), e.g. DiscreteTime.reverse_log_probs(model); got "
                         f"{reverse_log_probs_fn!r}")
    T = process.num_steps
    if steps is not None:
        steps = _check_int(steps, "steps", 1)
        if steps != T:
            raise ValueError(f"d3pm_ancestral runs every step of the process: steps={steps} must "
                             f"equal process.num_steps={T}")
    batch = _check_keys(keys)
    length = _check_int(length, "length", 1)
    out = jax.eval_shape(reverse_log_probs_fn, jax.ShapeDtypeStruct((batch, length), jnp.int32),
                         jax.ShapeDtypeStruct((batch,), jnp.int32))
    if getattr(out, "shape", None) != (batch, length, process.num_states):
        raise ValueError(f"reverse_log_probs_fn must return (B, L, S) = ({batch}, {length}, "
                         f"{process.num_states}) log-probs, got {out}")
    return _d3pm_jit(reverse_log_probs_fn, process, keys, length=length)


@functools.partial(jax.jit, static_argnames=("fn", "process", "length"))
def _d3pm_jit(fn, process, keys, *, length):
    B = keys.shape[0]
    T = process.num_steps
    x = jax.vmap(lambda k: process.sample_prior(k, (length,)))(step_fns.row_keys(keys, 0))

    def body(x, n):
        lp = fn(x, jnp.full((B,), T - n, jnp.int32)).astype(jnp.float32)
        x = jax.vmap(categorical.sample)(step_fns.row_keys(keys, n + 1), lp)
        return x.astype(jnp.int32), None

    x, _ = jax.lax.scan(body, x.astype(jnp.int32), jnp.arange(T))
    return x, jnp.full((B,), T, jnp.int32)


# ---------------------------------------------------------------------------------------------
# By name
# ---------------------------------------------------------------------------------------------
SAMPLERS = {
    "ancestral": ancestral,
    "ancestral_cached": ancestral_cached,
    "first_hitting": first_hitting,
    "confidence": confidence_decode,
}


def get_sampler(name: str) -> Callable:
    """The masked-diffusion sampler called `name` (common signature (denoise, schedule, keys,
    length, mask_id, *, ...)); ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown masked-diffusion sampler {name!r}; choose one of "
                         f"{sorted(SAMPLERS)}")
    return SAMPLERS[name]
