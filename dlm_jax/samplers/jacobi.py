"""Training-free Jacobi (fixed-point) parallel decoding of an autoregressive model.

Sequential decoding computes x_{i+1} = c_i(x_{≤i}) for i = P−1, …, L−2, where c_i picks a token
from log p(· | x_{≤i}) with noise fixed in advance. Read as a system of L − P equations in the
unknown tokens, it can be solved by Jacobi iteration: guess all of them, then update every
position at once from one causal pass over the current guess, x ← F(x), until nothing changes
(Song et al., 2021, "Accelerating Feedforward Computation via Parallel Nonlinear Equation
Solving"; for greedy and sampled decoding of transformers, Santilli et al., 2023, "Accelerating
Transformer Inference for Translation via Parallel Decoding"). The fixed point is the sequential
answer, token for token, for greedy and for sampled decoding alike, because the noise of the token
at position i + 1 is a function of (row key, i) only: Gumbel noise −log E from
`fold_in(key_row, i)`, the very draw `samplers.block.generate_ar` makes, so the results equal
`generate_ar`'s too (same keys, same decoder numerics).

Convergence. After an iteration whose first change is at position j, every position ≤ j is final
(the unchanged prefix x_{<j} satisfies the equations, so x_j = c_{j−1}(x_{<j}) is the sequential
token). The number of final positions thus grows by at least one per iteration and a row stops as
soon as all of its positions are final: at most L − P network calls (a causal model's worst case,
one token per call, as sequential decoding), fewer when guesses happen to be right. No extra call
is spent to confirm a fixed point that the frontier already proves.

`jacobi_decode` iterates the whole sequence with a full causal pass per iteration;
`jacobi_decode_windows` is the Gauss–Seidel–Jacobi variant: windows of `window` tokens left to
right, the finished prefix in a KV cache, each window iterated Jacobi-style with the cache only read
and committed once when final. `sequential_decode` is the token-by-token twin with the same noise.

Shapes: B batch, L length, P prompt length (≥ 1: position 0 has no conditional), V vocabulary,
W window, K = L / W windows.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.samplers import categorical
from dlm_jax.samplers.block import BlockDecoder

Array = jax.Array
NextLogProbs = Callable[[Array], Array]   # tokens (B, L) -> (B, L, V): log p(x_{i+1} | x_≤i)


# ---------------------------------------------------------------------------------------------
# the per-position choice, with noise fixed per (row, position)
# ---------------------------------------------------------------------------------------------

def position_noise(keys: Array, positions: Array, vocab: int) -> Array:
    """Gumbel noise of the tokens that follow `positions`: keys (B,), positions (n,) int ->
    (B, n, V) float32, entry [b, k] = gumbel(fold_in(keys[b], positions[k]), (V,)) — the draw
    `categorical.sample` makes in `generate_ar` for the token at positions[k] + 1."""
    positions = jnp.maximum(jnp.asarray(positions, jnp.int32), 0)   # position −1 is never used

    def row(key):
        return jax.vmap(lambda i: categorical.gumbel(jax.random.fold_in(key, i), (vocab,)))(
            positions)
    return jax.vmap(row)(keys)


def _pick(log_probs: Array, noise: Array | None, *, temperature: float, top_k: int,
          top_p: float, greedy: bool) -> Array:
    """(..., V) log-probs and their Gumbel noise -> (...) int32 tokens: `categorical.sample`'s
    rule with the noise given (so each position's draw is fixed before any iteration)."""
    lp = jnp.asarray(log_probs, jnp.float32)
    if greedy or temperature == 0.0:
        return jnp.argmax(lp, axis=-1).astype(jnp.int32)
    if temperature != 1.0:
        lp = lp / temperature
    lp = categorical.truncate(lp, top_k=top_k, top_p=top_p)
    return jnp.argmax(lp + noise, axis=-1).astype(jnp.int32)


def _first_change(new: Array, old: Array) -> Array:
    """(B, n) pair -> (B,) int32: the first position where they differ, n where none."""
    diff = new != old
    return jnp.where(diff.any(-1), jnp.argmax(diff, -1), new.shape[1]).astype(jnp.int32)


def _validate(keys, length, prompt, window=None, decoder=None):
    if prompt is None or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError("Jacobi decoding needs a (B, P) prompt of at least one token (e.g. BOS)")
    if prompt.shape[1] > length:
        raise ValueError(f"the prompt has {prompt.shape[1]} tokens, more than the length {length}")
    if prompt.shape[0] != keys.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys for a prompt of {prompt.shape[0]} rows: "
                         f"one key per row")
    if window is not None and (window < 1 or length % window):
        raise ValueError(f"the window {window} must divide the length {length}")
    if decoder is not None and decoder.max_tokens is not None and length > decoder.max_tokens:
        raise ValueError(f"length {length} exceeds what this decoder can hold "
                         f"({decoder.max_tokens})")


# ---------------------------------------------------------------------------------------------
# the sequential twin and whole-sequence Jacobi
# ---------------------------------------------------------------------------------------------

def sequential_decode(next_log_probs: NextLogProbs, keys: Array, *, length: int, prompt: Array,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      greedy: bool = False) -> dict[str, Array]:
    """Token-by-token decoding with the noise `jacobi_decode` uses: the twin it must equal.

    next_log_probs: tokens (B, L) -> (B, L, V), log p(x_{i+1} | x_{≤i}) at row i (causal: row i
    reads x_{≤i} only; e.g. `Autoregressive().denoiser(model).fn`). Called once per generated
    token on the whole (B, L) array, so its rows are computed exactly as Jacobi's are.
    keys (B,): one per row. prompt (B, P ≥ 1) int. temperature / top_k / top_p as
    `categorical.sample`; greedy (or temperature 0): argmax.

    Returns {"tokens": (B, L) int32, "nfe": int32[] = L − P network calls}.
    """
    _validate(keys, length, prompt)
    B, P = prompt.shape
    tokens = _fill(prompt, length)
    if P == length:
        return {"tokens": tokens, "nfe": jnp.int32(0)}
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

    def step(tokens, i):
        lp = jax.lax.dynamic_index_in_dim(next_log_probs(tokens), i, axis=1, keepdims=False)
        noise = None if greedy else position_noise(keys, i[None], lp.shape[-1])[:, 0]
        nxt = _pick(lp, noise, **kw)
        return jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i + 1, axis=1), None

    tokens, _ = jax.lax.scan(step, tokens, jnp.arange(P - 1, length - 1, dtype=jnp.int32))
    return {"tokens": tokens, "nfe": jnp.int32(length - P)}


def _fill(prompt: Array, length: int) -> Array:
    """(B, P) prompt -> (B, L): the initial guess repeats the prompt's last token (any fixed
    guess gives the same fixed point; this one costs nothing)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    tokens = jnp.broadcast_to(prompt[:, -1:], (prompt.shape[0], length))
    return jax.lax.dynamic_update_slice_in_dim(tokens, prompt, 0, axis=1)


def jacobi_decode(next_log_probs: NextLogProbs, keys: Array, *, length: int, prompt: Array,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False, max_iters: int | None = None) -> dict[str, Array]:
    """Jacobi decoding of the whole sequence: x ← F(x), one causal pass per iteration.

    F sets every generated position i + 1 ≥ P to the token picked from row i of
    next_log_probs(x) with the noise of (row, i) (`position_noise`, drawn once up front; greedy:
    argmax). Rows stop independently once all their positions are final (see the module
    docstring); the loop runs until every row has, or for max_iters iterations (default L − P,
    the bound, so the default always converges). A row cut short keeps its current guess past its
    final prefix (`converged` False).

    next_log_probs, keys, prompt, temperature, top_k, top_p, greedy: as `sequential_decode`.
    Returns {"tokens": (B, L) int32 (equal to `sequential_decode`'s when converged),
    "iterations": (B,) int32 network calls each row took (≤ L − P), "converged": (B,) bool,
    "nfe": int32[] batched network calls (max of iterations)}.
    """
    _validate(keys, length, prompt)
    B, P = prompt.shape
    bound = length - P
    max_iters = bound if max_iters is None else int(max_iters)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    gen = jnp.arange(1, length) >= P                       # positions 1 … L−1 that are generated
    tokens = _fill(prompt, length)
    noise = None
    if not (greedy or temperature == 0.0):
        V = jax.eval_shape(next_log_probs, tokens).shape[-1]
        noise = position_noise(keys, jnp.arange(length - 1), V)   # (B, L−1, V), drawn once

    def body(carry):
        x, frontier, iters, it = carry
        prop = _pick(next_log_probs(x)[:, :-1], noise, **kw)   # rows 0 … L−2 predict 1 … L−1
        y = jnp.concatenate([x[:, :1], jnp.where(gen, prop, x[:, 1:])], axis=1)
        done = frontier >= length
        y = jnp.where(done[:, None], x, y)
        # Positions ≤ the first change are final; the frontier is their count.
        frontier = jnp.where(done, frontier, jnp.minimum(_first_change(y, x) + 1, length))
        return y, frontier, iters + (~done).astype(jnp.int32), it + 1

    def cond(carry):
        _, frontier, _, it = carry
        return jnp.any(frontier < length) & (it < max_iters)

    init = (tokens, jnp.full((B,), P, jnp.int32), jnp.zeros((B,), jnp.int32), jnp.int32(0))
    tokens, frontier, iters, nfe = jax.lax.while_loop(cond, body, init)
    return {"tokens": tokens, "iterations": iters, "converged": frontier >= length, "nfe": nfe}


# ---------------------------------------------------------------------------------------------
# windowed (Gauss–Seidel–Jacobi) decoding over a KV cache
# ---------------------------------------------------------------------------------------------

def jacobi_decode_windows(decoder: BlockDecoder, keys: Array, *, length: int, window: int,
                          prompt: Array, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, greedy: bool = False,
                          max_iters: int | None = None) -> dict[str, Array]:
    """Windowed Jacobi decoding: windows [kW, (k+1)W) left to right, each iterated to its fixed
    point against the cached prefix, then committed once.

    Window rule: W must divide L; windows are aligned at 0 like `generate_blocks`' blocks. Prompt
    positions in a window are clamped; a window inside the prompt is committed as it is. The first
    token of a window that starts at or after P is picked before any iteration from the last
    committed position's log-probs (what the previous commit returned), so a window costs at most
    W − 1 iterations (a W = 1 run is `generate_ar`: commits only). The last window is not
    committed (nothing reads it).

    decoder: `log_probs(block (B, W), None, cache) -> (B, W, V)` next-token log-probs of the
    block given the committed prefix, cache only read; `commit(block, cache) -> (log-probs,
    cache)` (`Autoregressive.block_decoder` or any twin). max_iters: cap per window (default W,
    never reached). keys, prompt, temperature, top_k, top_p, greedy: as `jacobi_decode`.

    Returns {"tokens": (B, L) int32, "iterations": (B,) int32 scoring calls each row took over all
    windows, "window_iterations": (B, K) int32, "converged": (B,) bool, "nfe": int32[] batched
    network calls (scoring iterations plus commits), "commits": int32[]}.
    """
    _validate(keys, length, prompt, window, decoder)
    B, P = prompt.shape
    w = window
    max_iters = w if max_iters is None else int(max_iters)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    sampled = not (greedy or temperature == 0.0)
    tokens = _fill(prompt, length)
    cache0 = decoder.init(B)
    V = jax.eval_shape(lambda c: decoder.commit(tokens[:, :w], c)[0], cache0).shape[-1]
    j = jnp.arange(w)

    def one_window(carry, k):
        tokens, cache, last_lp, nfe, commits = carry
        s = k * w
        x = jax.lax.dynamic_slice_in_dim(tokens, s, w, axis=1)
        # noise[:, j] is the noise of the token at s + j (drawn at position s + j − 1), once.
        noise = position_noise(keys, s - 1 + j, V) if sampled else None
        # A window that starts after the prompt gets its first token from the last commit.
        first = _pick(last_lp, None if noise is None else noise[:, 0], **kw)
        starts_free = s >= P
        x = x.at[:, 0].set(jnp.where(starts_free, first, x[:, 0]))
        frontier = jnp.full((B,), jnp.clip(P - s, 1, w), jnp.int32)
        frontier = jnp.where(starts_free, 1, frontier)

        def body(c):
            x, frontier, iters, it = c
            lp = decoder.log_probs(x, None, cache)                     # cache only read
            prop = _pick(lp[:, :-1], None if noise is None else noise[:, 1:], **kw)
            y = jnp.concatenate([x[:, :1], prop], axis=1)
            y = jnp.where(j[None] < frontier[:, None], x, y)           # prompt and final kept
            done = frontier >= w
            y = jnp.where(done[:, None], x, y)
            frontier = jnp.where(done, frontier, jnp.minimum(_first_change(y, x) + 1, w))
            return y, frontier, iters + (~done).astype(jnp.int32), it + 1

        def cond(c):
            return jnp.any(c[1] < w) & (c[3] < max_iters)

        x, frontier, iters, it = jax.lax.while_loop(
            cond, body, (x, frontier, jnp.zeros((B,), jnp.int32), jnp.int32(0)))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, x, s, axis=1)
        last = k == length // w - 1

        def do_commit(cache):
            lp, cache = decoder.commit(x, cache)
            return lp[:, -1], cache
        last_lp, cache = jax.lax.cond(last, lambda c: (last_lp, c), do_commit, cache)
        made = (~last).astype(jnp.int32)
        return (tokens, cache, last_lp, nfe + it + made, commits + made), (iters, frontier >= w)

    init = (tokens, cache0, jnp.zeros((B, V), jnp.float32), jnp.int32(0), jnp.int32(0))
    (tokens, _, _, nfe, commits), (iters, ok) = jax.lax.scan(
        one_window, init, jnp.arange(length // w, dtype=jnp.int32))
    return {"tokens": tokens, "iterations": iters.sum(0), "window_iterations": iters.T,
            "converged": ok.all(0), "nfe": nfe, "commits": commits}
