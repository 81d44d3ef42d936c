"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") as a
member of the AR family: a drop-in replacement for the causal `DiT` wherever the
`Autoregressive` method uses a model (training, AR sampling, generative perplexity).

Architecture (the semantics of HF `GPT2LMHeadModel`): h = wte[tokens] + wpe[positions]; N
blocks of h += attn(LN₁ h) and h += mlp(LN₂ h) with pre-LayerNorm (weight and bias, eps
`layer_norm_eps`), causal multi-head attention (fused q/k/v projection with bias, scale
1/sqrt(Dh), output projection with bias) and an MLP D → F → D with biases and tanh-GELU
("gelu_new"); then h = LN_f h and logits = h · wteᵀ (tied, no bias). Dropout (rate `dropout`,
active only with deterministic=False) on the embedding sum, the attention probabilities and
both residual branches, as in the reference. Initialisation as GPT-2: N(0, 0.02) matrices and
tables, N(0, 0.02/sqrt(2N)) for the two residual output projections, zero biases, unit LN.

Learned positions cap the length: positions ≥ n_positions do not exist. A static length beyond
the table raises ValueError; a traced out-of-range position (a KV cache that has slid past the
table) reads NaN rows (`jnp.take` fill mode), so the logits are NaN, never silently clamped: in
a full forward the whole sequence's (masked-out values still enter the probability × value
contraction as 0·NaN), in cached decoding those from that position on.

Shapes: B batch, L length, Lb block length, V vocabulary, P n_positions, D width, H heads,
Dh = D/H, F MLP hidden width (default 4D), N depth, W KV-cache window.

Parameters (`nnx.to_pure_dict(nnx.split(model)[1])`) and their logical axes (`layers.py`):
  wte (V, D) vocab·embed; wpe (P, D) ·embed (positions replicated);
  blocks[i].ln_1 / ln_2 / ln_f: weight, bias (D,) embed;
  blocks[i].attn.qkv (D, 3, H, Dh) embed·qkv·heads·kv, qkv_bias (3, H, Dh);
  blocks[i].attn.out (H, Dh, D) heads·kv·embed, out_bias (D,);
  blocks[i].mlp.fc.kernel (D, F) embed·mlp, bias (F,); blocks[i].mlp.proj.kernel (F, D), bias (D,).
With `scan_layers` the blocks are one stacked GPT2Block: blocks.ln_1.weight (N, D) layers·embed
and so on (`models.layout`), applied as one `jax.lax.scan` over layers.
`gpt2_from_state_dict` / `gpt2_to_state_dict` map them to and from HF GPT-2 PyTorch names
(import gives the unrolled layout, `layout.stack_layers` stacks it; export takes either).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm_jax.masks import causal_mask
from dlm_jax.models.attention import MaskPattern, attend, check_backend, model_mask
from dlm_jax.models.cache import KVCache
from dlm_jax.models.layers import (LayerNorm, attend_with_prefix, constrain_batch, dropout,
                                   dropout_key, make_param, matmul_rows, zeros)
from dlm_jax.models.layout import stack_layers, stack_modules, unstack_layers
from dlm_jax.models.transformer import (REMAT_POLICIES, _split_keys, layer_keys, scan_blocks,
                                       scan_blocks_then_last)

Array = jax.Array

INIT_STD = 0.02


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel (Din, Dout) as HF Conv1D stores it; matmul in `dtype`."""

    def __init__(self, din: int, dout: int, names: tuple[str, str], *, std: float = INIT_STD,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = make_param(rngs, _normal(std), (din, dout), names, param_dtype)
        self.bias = make_param(rngs, zeros, (dout,), (names[1],), param_dtype)

    def __call__(self, x: Array) -> Array:
        """(..., Din) -> (..., Dout) in `dtype`."""
        return (matmul_rows(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
                + self.bias[...].astype(self.dtype))


class GPT2Attention(nnx.Module):
    """Fused q/k/v projection and output projection, both with bias.

    qkv (D, 3, H, Dh) is c_attn.weight (D, 3D) with its output axis split as (three, H, Dh):
    [q | k | v] outermost, then heads; qkv_bias (3, H, Dh) likewise. out (H, Dh, D) is
    c_proj.weight (D, D) with its input axis split into heads.
    """

    def __init__(self, width: int, heads: int, *, out_std: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads, self.head_dim, self.dtype = heads, width // heads, dtype
        hd = (heads, self.head_dim)
        self.qkv = make_param(rngs, _normal(INIT_STD), (width, 3) + hd,
                              ("embed", "qkv", "heads", "kv"), param_dtype)
        self.qkv_bias = make_param(rngs, zeros, (3,) + hd, ("qkv", "heads", "kv"), param_dtype)
        self.out = make_param(rngs, _normal(out_std), hd + (width,), ("heads", "kv", "embed"),
                              param_dtype)
        self.out_bias = make_param(rngs, zeros, (width,), ("embed",), param_dtype)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """x (B, L, D) -> q, k, v, each (B, L, H, Dh) in `dtype`."""
        qkv = (matmul_rows(x.astype(self.dtype), self.qkv[...].astype(self.dtype))
               + self.qkv_bias[...].astype(self.dtype))
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def output(self, o: Array) -> Array:
        """o (B, L, H, Dh) -> (B, L, D) in `dtype`."""
        return (matmul_rows(o.astype(self.dtype), self.out[...].astype(self.dtype), n_in=2)
                + self.out_bias[...].astype(self.dtype))


def attend_with_dropout(q: Array, k: Array, v: Array, mask: Array | None, rate: float,
                        key: Array) -> Array:
    """Softmax attention with dropout on the probabilities (training only; the backends of
    `attention.attend` have none). q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), mask bool
    (B|1, Lq, Lk) or None (full). Returns (B, Lq, H, Dh) in q's dtype."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    s = s / math.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask[:, None], s, jnp.float32(-1e30))
    p = dropout(jax.nn.softmax(s, axis=-1), rate, key, False)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v).astype(q.dtype)


class GPT2Mlp(nnx.Module):
    """fc (D → F, bias) → tanh-GELU ("gelu_new") → proj (F → D, bias), in `dtype`."""

    def __init__(self, width: int, hidden: int, *, out_std: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc = Linear(width, hidden, ("embed", "mlp"), **kw)
        self.proj = Linear(hidden, width, ("mlp", "embed"), std=out_std, **kw)

    def __call__(self, x: Array) -> Array:
        """(B, L, D) -> (B, L, D) in `dtype`."""
        return self.proj(jax.nn.gelu(self.fc(x), approximate=True))


class GPT2Block(nnx.Module):
    """h += Dropout(attn(LN₁ h)); h += Dropout(mlp(LN₂ h)); residual stream float32."""

    def __init__(self, width: int, heads: int, hidden: int, *, depth: int, eps: float,
                 dropout: float, attention: str = "xla",
                 shard_axes: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_std = INIT_STD / math.sqrt(2 * depth)  # GPT-2's residual-path scaling
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = dropout
        self.attention, self.shard_axes = attention, shard_axes
        self.ln_1 = LayerNorm(width, eps=eps, use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.attn = GPT2Attention(width, heads, out_std=out_std, **kw)
        self.ln_2 = LayerNorm(width, eps=eps, use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GPT2Mlp(width, hidden, out_std=out_std, **kw)

    def _residuals(self, h: Array, attn_branch: Array, *, deterministic: bool,
                      keys: list) -> Array:
        h = h + dropout(attn_branch, self.dropout_rate, keys[0], deterministic).astype(jnp.float32)
        branch = self.mlp(self.ln_2(h))
        return h + dropout(branch, self.dropout_rate, keys[1], deterministic).astype(jnp.float32)

    def __call__(self, h: Array, mask: Array | MaskPattern, *, q_rows: int | None = None,
                 deterministic: bool = True, key: Array | None = None) -> Array:
        """h (B, L, D) float32, mask: a `MaskPattern` or bool (B|1, L, L) (causal, maybe ANDed
        with the user's; full for the bidirectional variant) -> (B, L, D) float32. With
        q_rows, only the first q_rows rows are queries and outputs (keys still cover all L
        rows): returns (B, q_rows, D)."""
        k_attn, *keys = _split_keys(key, 3)
        q, k, v = self.attn.project(self.ln_1(h))
        if q_rows is not None:
            q, h = q[:, :q_rows], h[:, :q_rows]
            if isinstance(mask, jax.Array):  # a pattern adapts to q's length itself
                mask = mask[:, :q_rows]
        if deterministic or self.dropout_rate == 0.0:
            o = attend(q, k, v, mask, backend=self.attention, shard_axes=self.shard_axes)
        else:  # dropout on the probabilities needs them all: the dense path
            if isinstance(mask, MaskPattern):
                mask = mask.dense(q.shape[1], k.shape[1])[None]
            o = attend_with_dropout(q, k, v, mask, self.dropout_rate, k_attn)
        return self._residuals(h, self.attn.output(o), deterministic=deterministic, keys=keys)

    def decode(self, h: Array, k_cache: Array, v_cache: Array, cache_mask: Array,
               block_mask: Array) -> tuple[Array, Array, Array]:
        """One block over the cached prefix plus the current block (no dropout).

        h (B, Lb, D) float32; k_cache/v_cache (B, H, W, Dh); cache_mask bool (1, Lb, W) (slot
        valid); block_mask bool (1, Lb, Lb) (causal) or None. Returns the new h (B, Lb, D) and
        the block's k and v (B, Lb, H, Dh) for the cache.
        """
        q, k, v = self.attn.project(self.ln_1(h))
        o = attend_with_prefix(q, k_cache.astype(q.dtype), v_cache, cache_mask, k, v, block_mask)
        return self._residuals(h, self.attn.output(o), deterministic=True,
                                  keys=[None, None]), k, v


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class GPT2(nnx.Module):
    """GPT-2 language model with the causal `DiT`'s interface (`__call__`, `init_cache`,
    `decode_block`); σ is accepted and ignored. With causal=False, the same network as a masked
    diffusion model's denoiser (AR → diffusion adaptation of GPT-2 weights, `models.adapt`):
    attention follows the given mask only (full by default), and `two_pass` trains BD3-LM.

    Args:
      vocab_size: V. width, depth, heads: D, N, H (D % H == 0).
      n_positions: P, the learned position table (the longest sequence the model can read).
      mlp_hidden: F, the MLP hidden width (default 4D; HF `n_inner`).
      layer_norm_eps: eps of every LayerNorm (HF `layer_norm_epsilon`).
      causal: AND the causal mask into every attention (the language model); False: none.
      dropout: embedding / attention / residual dropout rate (deterministic=False only).
      remat: "none" | "block" | "dots", per block, as `DiT`'s (values unchanged).
      attention: the attention backend, as `DiT`'s (attention dropout takes the dense path).
      scan_layers: the blocks as one stacked GPT2Block applied by `jax.lax.scan`, as `DiT`'s
        (same initial values, outputs and gradients; `models.layout` converts parameters).
      batch_axes: mesh axes of the batch, kept by the residual stream under a mesh, as `DiT`'s.
      head_axes: mesh axes of the heads (with batch_axes, `splash`'s shard_map), as `DiT`'s.
      dtype: compute dtype of matmuls; params are `param_dtype`.
      rngs: parameter initialisation RNG (the ``params`` stream).
    """

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, *,
                 n_positions: int, mlp_hidden: int | None = None, layer_norm_eps: float = 1e-5,
                 dropout: float = 0.0, remat: str = "none", causal: bool = True,
                 attention: str = "xla", scan_layers: bool = False,
                 batch_axes: tuple[str, ...] = (), head_axes: tuple[str, ...] = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"GPT-2 width {width} must split into {heads} heads")
        if n_positions < 1:
            raise ValueError(f"GPT-2 n_positions must be >= 1, got {n_positions}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose from {sorted(REMAT_POLICIES)}")
        self.vocab_size, self.width, self.depth, self.heads = vocab_size, width, depth, heads
        self.causal = causal
        self.attention = check_backend(attention)
        self.batch_axes = tuple(batch_axes)
        shard_axes = (self.batch_axes, tuple(head_axes)) if batch_axes or head_axes else None
        self.head_dim = width // heads
        self.n_positions, self.mlp_hidden = n_positions, mlp_hidden or 4 * width
        self.layer_norm_eps, self.dropout, self.remat, self.dtype = (
            layer_norm_eps, dropout, remat, dtype)
        self.wte = make_param(rngs, _normal(INIT_STD), (vocab_size, width), ("vocab", "embed"),
                              param_dtype)
        self.wpe = make_param(rngs, _normal(INIT_STD), (n_positions, width), (None, "embed"),
                              param_dtype)
        blocks = [GPT2Block(width, heads, self.mlp_hidden, depth=depth, eps=layer_norm_eps,
                            dropout=dropout, attention=attention, shard_axes=shard_axes,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(depth)]
        self.scan_layers = bool(scan_layers)
        # Stacked from N blocks built in order, so both layouts start from the same values.
        self.blocks = stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
        self.ln_f = LayerNorm(width, eps=layer_norm_eps, use_bias=True, param_dtype=param_dtype,
                              rngs=rngs)

    # -- pieces ----------------------------------------------------------------------------------

    def _check_positions(self, length: int, positions) -> None:
        """Static checks: a length beyond the table, or concrete positions outside [0, P)."""
        if positions is None and length > self.n_positions:
            raise ValueError(f"GPT-2 has n_positions={self.n_positions} learned positions; a "
                             f"sequence of {length} tokens does not fit")
        if positions is None:
            return
        try:
            p = np.asarray(positions)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return  # traced: an out-of-range row reads NaN (`_embed`)
        if p.size and (p.min() < 0 or p.max() >= self.n_positions):
            raise ValueError(f"GPT-2 positions must be in [0, n_positions={self.n_positions}); "
                             f"got {p.min()} … {p.max()}")

    def _embed(self, tokens: Array, positions: Array) -> Array:
        """tokens (B, L), positions (B|1, L) -> wte[tokens] + wpe[positions] (B, L, D) float32;
        an out-of-range (traced) position reads a NaN row."""
        tok = jnp.take(self.wte[...], tokens, axis=0).astype(jnp.float32)
        pos = jnp.take(self.wpe[...], positions, axis=0, mode="fill",
                       fill_value=jnp.nan).astype(jnp.float32)
        return tok + pos

    def logits(self, h: Array) -> Array:
        """Tied head: h (B, L, D) (post-ln_f) -> h · wteᵀ (B, L, V) float32."""
        return matmul_rows(h.astype(self.dtype),
                           self.wte[...].T.astype(self.dtype)).astype(jnp.float32)

    def _apply_block(self, block: GPT2Block, h: Array, mask: Array, *, deterministic: bool,
                     key, q_rows: int | None = None) -> Array:
        """`block(h, …)`, under `jax.checkpoint` with the configured remat policy."""
        if self.remat == "none":
            return block(h, mask, q_rows=q_rows, deterministic=deterministic, key=key)
        graphdef, params = nnx.split(block)

        def run(params, h, key):
            return nnx.merge(graphdef, params)(h, mask, q_rows=q_rows,
                                               deterministic=deterministic, key=key)
        return jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])(params, h, key)

    # -- forward ---------------------------------------------------------------------------------

    def features(self, tokens: Array, *, mask: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True,
                 rngs=None, out_rows: int | None = None) -> Array:
        """The final hidden states LN_f(h) (B, L, D) float32 (HF `last_hidden_state`). With
        out_rows, the last layer computes only the first out_rows rows as queries (the
        two-pass noisy half): (B, out_rows, D)."""
        B, L = tokens.shape
        self._check_positions(L, positions)
        mask = model_mask(mask, L, causal=self.causal)
        if positions is None:
            positions = jnp.arange(L, dtype=jnp.int32)
        positions = jnp.asarray(positions)
        positions = positions[None] if positions.ndim == 1 else positions
        key = dropout_key(rngs, self.dropout, deterministic)
        if self.scan_layers:
            keys = layer_keys(key, self.depth + 1)  # the unrolled stack's keys, as one array
            k_embd, keys = (None, None) if keys is None else (keys[0], keys[1:])
        else:
            k_embd, *keys = _split_keys(key, self.depth + 1)
        h = dropout(self._embed(tokens, positions), self.dropout, k_embd, deterministic)
        h = constrain_batch(h, self.batch_axes)
        if self.scan_layers:
            def step(block, h, k):
                h = block(h, mask, deterministic=deterministic, key=k)
                return constrain_batch(h, self.batch_axes), None
            if out_rows is None:
                h, _ = scan_blocks(self.blocks, h, keys, step, remat=self.remat)
            else:  # the last layer has fewer query rows: peeled off the scan
                def last(block, h, k):
                    h = self._apply_block(block, h, mask, q_rows=out_rows,
                                          deterministic=deterministic, key=k)
                    return constrain_batch(h, self.batch_axes)
                h = scan_blocks_then_last(self.blocks, h, keys, step, last, depth=self.depth,
                                          remat=self.remat)
        else:
            last = self.depth - 1
            for i, (block, k) in enumerate(zip(self.blocks, keys)):
                h = self._apply_block(block, h, mask, q_rows=out_rows if i == last else None,
                                      deterministic=deterministic, key=k)
                h = constrain_batch(h, self.batch_axes)
        return self.ln_f(h)

    def __call__(self, tokens: Array, sigma: Array | None = None, *, mask: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True,
                 rngs=None) -> Array:
        """Logits (B, L, V) float32 for tokens (B, L) int32; position i predicts token i + 1.

        sigma: ignored (the AR interface). mask: a `MaskPattern`, bool (B|1, L, L) or (L, L),
        ANDed with the causal mask (causal=False: the mask alone; None: full).
        positions: (B|1, L) or (L,)
        indices into wpe, default 0…L−1 (a static L > n_positions, or concrete positions
        outside the table, raise ValueError).
        rngs: dropout randomness, needed only if deterministic=False.
        """
        del sigma
        return self.logits(self.features(tokens, mask=mask, positions=positions,
                                         deterministic=deterministic, rngs=rngs))

    def two_pass(self, xt: Array, x0: Array, sigma: Array | None, block_size: int, *,
                 band: Array | None = None, deterministic: bool = True, rngs=None) -> Array:
        """BD3-LM training forward over [x_t ⊕ x_0] (the bidirectional variant): positions
        0…L−1 for both halves, the two-pass mask (`masks.bd3lm_two_pass_mask`), narrowed
        inside blocks to keys j ≤ i + band when given (annealing). σ is ignored.
        Returns the logits of the x_t half (B, L, V) float32."""
        del sigma
        if self.causal:
            raise ValueError("two_pass is for the bidirectional (causal=False) GPT-2")
        L = xt.shape[1]
        if L % block_size:
            raise ValueError(f"length {L} is not a multiple of block_size {block_size}")
        mask = MaskPattern("two_pass", block_size, band)
        half = jnp.arange(L, dtype=jnp.int32)
        h = self.features(jnp.concatenate([xt, x0], axis=1), mask=mask,
                          positions=jnp.concatenate([half, half])[None],
                          deterministic=deterministic, rngs=rngs, out_rows=L)
        return self.logits(h)

    # -- KV-cache decoding -----------------------------------------------------------------------

    def _check_window(self, max_len: int) -> None:
        if max_len > self.n_positions:
            raise ValueError(f"a GPT-2 KV cache of {max_len} tokens exceeds n_positions="
                             f"{self.n_positions}: learned positions cannot slide past the table")

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """Empty KVCache: N per-layer buffers (B, H, max_len, Dh), length 0; max_len ≤ P (with
        `scan_layers`, one stacked (N, B, H, max_len, Dh) buffer each for k and v)."""
        self._check_window(max_len)
        return KVCache.zeros(self.depth, batch, max_len, self.heads, self.head_dim, dtype,
                             stacked=self.scan_layers)

    def decode_block(self, tokens: Array, sigma: Array | None, cache: KVCache, *,
                     commit: bool, causal: bool | None = None) -> tuple[Array, KVCache]:
        """Logits for one block given the committed prefix in `cache` (no dropout).

        tokens (B, Lb) int32 at absolute positions cache.length … cache.length+Lb−1 (wpe rows;
        NaN logits past n_positions) attend causally to the cache's valid slots and within the
        block (bidirectionally within it when the model, or `causal`, says not causal). commit (a
        Python bool): True appends the block's keys and values (`KVCache.append`), False leaves
        the cache unchanged. σ is ignored.
        Returns (logits (B, Lb, V) float32, the cache).
        """
        del sigma
        if not isinstance(commit, bool):
            raise TypeError("decode_block(commit=...) must be a Python bool: commit once per "
                            "finished block, outside the denoising loop")
        self._check_window(cache.max_len)
        Lb = tokens.shape[1]
        positions = (cache.length + jnp.arange(Lb, dtype=jnp.int32))[None]
        cache_mask = jnp.broadcast_to(cache.valid()[None, None, :], (1, Lb, cache.max_len))
        causal = self.causal if causal is None else causal
        block_mask = causal_mask(Lb)[None] if causal else None
        h = self._embed(tokens, positions)
        if self.scan_layers:
            def step(block, h, kv):
                h, k, v = block.decode(h, *kv, cache_mask, block_mask)
                return h, (k, v)
            h, (ks, vs) = scan_blocks(self.blocks, h, cache.stacked_kv(), step)
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                h, k, v = block.decode(h, cache.k[i], cache.v[i], cache_mask, block_mask)
                ks.append(k)
                vs.append(v)
        logits = self.logits(self.ln_f(h))
        return (logits, cache.append(ks, vs)) if commit else (logits, cache)

    # -- import ----------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, heads: int,
                        layer_norm_eps: float = 1e-5, **kwargs) -> "GPT2":
        """A GPT2 holding an HF GPT-2 state dict (`gpt2_from_state_dict`); kwargs (dropout,
        dtype, remat, scan_layers, …) go to the constructor. Parameters are built abstractly,
        never randomly initialised."""
        settings, params = gpt2_from_state_dict(state_dict, heads=heads,
                                                layer_norm_eps=layer_norm_eps)
        if kwargs.get("scan_layers"):
            params = stack_layers(params)
        model = nnx.eval_shape(lambda: cls(**settings, **kwargs, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# HF GPT-2 state dicts <-> our parameters
# ---------------------------------------------------------------------------------------------
#
#   transformer.wte.weight (V, D)                 → wte (V, D)
#   transformer.wpe.weight (P, D)                 → wpe (P, D)
#   transformer.h.i.ln_{1,2}.{weight,bias} (D,)   → blocks[i].ln_{1,2}.{weight,bias}
#   transformer.h.i.attn.c_attn.weight (D, 3D)    → blocks[i].attn.qkv (D, 3, H, Dh) (reshape)
#   transformer.h.i.attn.c_attn.bias (3D,)        → blocks[i].attn.qkv_bias (3, H, Dh)
#   transformer.h.i.attn.c_proj.weight (D, D)     → blocks[i].attn.out (H, Dh, D) (reshape)
#   transformer.h.i.attn.c_proj.bias (D,)         → blocks[i].attn.out_bias
#   transformer.h.i.mlp.c_fc.{weight (D, F), bias} → blocks[i].mlp.fc.{kernel, bias}
#   transformer.h.i.mlp.c_proj.{weight (F, D), bias} → blocks[i].mlp.proj.{kernel, bias}
#   transformer.ln_f.{weight,bias}                → ln_f.{weight,bias}
#   lm_head.weight (V, D)                         → (tied: must equal wte)
# Conv1D weights are stored (in, out), so no transposes: only the q/k/v and head axes are split.

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask constants, not params
_LAYER = re.compile(r"h\.(\d+)\.(.+)")
_LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
               "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
_TOP_KEYS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")


def _normalise(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drops the `transformer.` prefix (hub checkpoints saved from GPT2Model lack it)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if k in out:
            raise ValueError(f"GPT-2 state dict: {key!r} and another key both name {k!r}")
        out[k] = np.asarray(value)
    return out


def _expected_shapes(V: int, P: int, D: int, F: int, depth: int) -> dict[str, tuple]:
    shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,),
              "ln_f.bias": (D,)}
    layer = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D),
             "attn.c_attn.bias": (3 * D,), "attn.c_proj.weight": (D, D),
             "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
             "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, D),
             "mlp.c_proj.bias": (D,)}
    for i in range(depth):
        shapes.update({f"h.{i}.{k}": s for k, s in layer.items()})
    return shapes


def gpt2_from_state_dict(state_dict: Mapping[str, Any], *, heads: int,
                         layer_norm_eps: float = 1e-5) -> tuple[dict, dict]:
    """HF GPT-2 PyTorch names → (settings, params).

    state_dict: name → array, with or without the `transformer.` prefix; `lm_head.weight` is
    optional (tied: it must equal wte); buffers `h.i.attn.bias` / `h.i.attn.masked_bias` are
    ignored. heads (H) and layer_norm_eps cannot be read from tensor shapes.
    Returns settings {vocab_size, n_positions, width, depth, heads, mlp_hidden, layer_norm_eps}
    (`GPT2(**settings, rngs=…)`) and params, a float32 numpy pure dict in the layout of
    `nnx.to_pure_dict(nnx.split(model)[1])`. Unknown keys, missing keys and wrong shapes each
    raise one ValueError listing all of them; an untied lm_head raises ValueError.
    """
    sd = _normalise(state_dict)
    layer_ids, unknown = set(), []
    for k in sd:
        if k in _TOP_KEYS or k == LM_HEAD or _BUFFER.fullmatch(k):
            continue
        m = _LAYER.fullmatch(k)
        if m and m.group(2) in _LAYER_KEYS:
            layer_ids.add(int(m.group(1)))
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"GPT-2 state dict: unknown keys {sorted(unknown)}")
    depth = max(layer_ids) + 1 if layer_ids else 0
    names = list(_TOP_KEYS) + [f"h.{i}.{k}" for i in range(depth) for k in _LAYER_KEYS]
    missing = [k for k in names if k not in sd]
    if missing or depth == 0:
        raise ValueError(f"GPT-2 state dict: missing keys {missing or ['h.0.*']}")
    sizing = ("wte.weight", "wpe.weight", "h.0.mlp.c_fc.weight")  # V, D, P and F come from these
    flat = [f"{k}: expected 2 axes, got {tuple(sd[k].shape)}" for k in sizing if sd[k].ndim != 2]
    if flat:
        raise ValueError("GPT-2 state dict: wrong shapes: " + "; ".join(flat))
    (V, D), P, F = sd[sizing[0]].shape, sd[sizing[1]].shape[0], sd[sizing[2]].shape[1]
    want = _expected_shapes(V, P, D, F, depth)
    if LM_HEAD in sd:
        want[LM_HEAD] = (V, D)
    bad = [f"{k}: expected {want[k]}, got {tuple(sd[k].shape)}" for k in want
           if tuple(sd[k].shape) != want[k]]
    if bad:
        raise ValueError("GPT-2 state dict: wrong shapes: " + "; ".join(bad))
    if D % heads:
        raise ValueError(f"GPT-2 width {D} (wte.weight) does not split into heads={heads}")
    if LM_HEAD in sd and not np.array_equal(sd[LM_HEAD], sd["wte.weight"]):
        diff = float(np.max(np.abs(sd[LM_HEAD].astype(np.float64) - sd["wte.weight"])))
        raise ValueError(f"GPT-2 state dict: lm_head.weight is not tied to transformer.wte.weight "
                         f"(max |diff| {diff:.3g}); untied heads are not supported")

    H, Dh = heads, D // heads

    def f32(k, shape=None):
        a = np.asarray(sd[k], np.float32)
        return a if shape is None else a.reshape(shape)

    def layer(i):
        p = f"h.{i}."

        def ln(n):
            return {"weight": f32(p + n + ".weight"), "bias": f32(p + n + ".bias")}
        return {"ln_1": ln("ln_1"), "ln_2": ln("ln_2"),
                "attn": {"qkv": f32(p + "attn.c_attn.weight", (D, 3, H, Dh)),
                         "qkv_bias": f32(p + "attn.c_attn.bias", (3, H, Dh)),
                         "out": f32(p + "attn.c_proj.weight", (H, Dh, D)),
                         "out_bias": f32(p + "attn.c_proj.bias")},
                "mlp": {"fc": {"kernel": f32(p + "mlp.c_fc.weight"),
                               "bias": f32(p + "mlp.c_fc.bias")},
                        "proj": {"kernel": f32(p + "mlp.c_proj.weight"),
                                 "bias": f32(p + "mlp.c_proj.bias")}}}

    params = {"wte": f32("wte.weight"), "wpe": f32("wpe.weight"),
              "blocks": {i: layer(i) for i in range(depth)},
              "ln_f": {"weight": f32("ln_f.weight"), "bias": f32("ln_f.bias")}}
    settings = dict(vocab_size=int(V), n_positions=int(P), width=int(D), depth=depth,
                    heads=int(heads), mlp_hidden=int(F), layer_norm_eps=float(layer_norm_eps))
    return settings, params


def gpt2_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params (a pure dict, numpy or jax arrays) → HF GPT-2 names with the `transformer.`
    prefix and the tied `lm_head.weight` (a copy of wte): the inverse of `gpt2_from_state_dict`.
    Either layout of the blocks (unrolled, or stacked by `scan_layers`).
    """
    def np_(x):
        return np.asarray(x)

    params = unstack_layers(jax.tree.map(np_, dict(params)))
    wte = np_(params["wte"])
    D = wte.shape[1]
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": np_(params["wpe"])}
    for i in sorted(params["blocks"], key=int):  # restored checkpoints may key layers by str
        b, p = params["blocks"][i], f"transformer.h.{int(i)}."
        a, m = b["attn"], b["mlp"]
        sd.update({
            p + "ln_1.weight": np_(b["ln_1"]["weight"]), p + "ln_1.bias": np_(b["ln_1"]["bias"]),
            p + "attn.c_attn.weight": np_(a["qkv"]).reshape(D, 3 * D),
            p + "attn.c_attn.bias": np_(a["qkv_bias"]).reshape(3 * D),
            p + "attn.c_proj.weight": np_(a["out"]).reshape(D, D),
            p + "attn.c_proj.bias": np_(a["out_bias"]),
            p + "ln_2.weight": np_(b["ln_2"]["weight"]), p + "ln_2.bias": np_(b["ln_2"]["bias"]),
            p + "mlp.c_fc.weight": np_(m["fc"]["kernel"]),
            p + "mlp.c_fc.bias": np_(m["fc"]["bias"]),
            p + "mlp.c_proj.weight": np_(m["proj"]["kernel"]),
            p + "mlp.c_proj.bias": np_(m["proj"]["bias"]),
        })
    sd["transformer.ln_f.weight"] = np_(params["ln_f"]["weight"])
    sd["transformer.ln_f.bias"] = np_(params["ln_f"]["bias"])
    sd[LM_HEAD] = wte.copy()
    return sd
