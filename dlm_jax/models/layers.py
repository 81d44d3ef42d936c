"""Transformer building blocks for the DiT-style backbone (Flax NNX, used functionally).

The backbone is the diffusion transformer (DiT) of Peebles & Xie (2023), "Scalable Diffusion
Models with Transformers", in the form used for text by SEDD's DDiT (Lou et al., 2024) and by
BD3-LM's DiT (Arriola et al., 2025, "Block Diffusion: Interpolating Between Autoregressive and
Diffusion Language Models"): weight-only LayerNorm in float32 (eps 1e-5), adaLN modulation
`LN(x)·(1 + scale) + shift`, half-split (GPT-NeoX) rotary embeddings (Su et al., 2021, RoFormer)
on q and k only, tanh-GELU MLP ×4 with biases, and the 256-feature σ embedder (cos first)
followed by Linear → SiLU → Linear (the model applies one more SiLU).

Shapes: B batch, L length (Lq queries, Lk keys), D width, H heads, Dh = D / H head width,
C cond_dim, F σ-feature count (256), V vocabulary.

Numerics: parameters are float32 (``param_dtype``); matmuls run in ``dtype`` (e.g. bfloat16) with
inputs and kernels cast to it; LayerNorm, rotary tables, the σ embedder, the adaLN modulation and
the attention softmax are computed in float32. Callers keep the residual stream in float32.

Logical axis names. Every parameter carries ``out_sharding`` metadata naming its axes, so that one
rules table (``sharding.py``) can map them to mesh axes:

  ``vocab``        vocabulary rows of the embedding / columns of the output head (V)
  ``embed``        model width D (residual stream)
  ``mlp``          MLP hidden width (mlp_ratio · D)
  ``heads``        attention heads H
  ``kv``           per-head width Dh
  ``qkv``          the size-3 q/k/v axis of the fused projection (never sharded)
  ``modulation``   the 6 (block) or 2 (final layer) adaLN chunks (never sharded)
  ``freq``         σ sinusoid features F (never sharded)
  ``cond_hidden``  hidden width C of the σ embedder's MLP
  ``cond``         conditioning width C fed to the adaLN layers
  ``layers``       the depth axis N of stacked blocks (``model.scan_layers``; never sharded by
                   default), added by `layout.stack_modules`

Parameters are always created with ``eager_sharding=False``: they are plain arrays that carry the
names, so models build anywhere (tests, CPU, under any mesh context, with or without logical rules)
and ``sharding.py`` places them (``nnx.get_partition_spec`` + its rules table, jit out_shardings).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dlm_jax.masks import band_mask, bd3lm_two_pass_mask

Array = jax.Array
DType = jnp.dtype | type

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv", "qkv", "modulation", "freq",
                "cond_hidden", "cond", "layers")

LN_EPS = 1e-5
ROPE_BASE = 1e4
SIGMA_FEATURES = 256
SIGMA_MAX_PERIOD = 1e4

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None],
               param_dtype: DType = jnp.float32) -> nnx.Param:
    """Creates an `nnx.Param` of `shape` initialised by `init`, tagged with logical axis `names`."""
    assert len(names) == len(shape), (names, shape)
    for n in names:
        assert n is None or n in LOGICAL_AXES, n
    value = init(rngs.params(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def torch_like_init(in_axis=-2, out_axis=-1):
    """Initializer with variance 1/(3·fan_in) (torch's default nn.Linear), uniform."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                             in_axis=in_axis, out_axis=out_axis)


# ---------------------------------------------------------------------------------------------
# Simple layers
# ---------------------------------------------------------------------------------------------

def matmul_rows(x: Array, w: Array, n_in: int = 1) -> Array:
    """Contracts the last `n_in` axes of x (..., *I) with the first `n_in` of w (*I, *O).

    Returns (..., *O). Computed over the flattened rows (N, *I) of x. Why: the weight gradient of
    a (B, L, ...) dot contracts two row axes (B, L), for which XLA:CPU makes a transposed copy of
    the output gradient, and fusion recomputes the whole residual-stream gradient chain inside
    each such copy (quadratic in depth; ~30% of an MDLM step at the benchmark size). With one row
    axis the weight gradient is a plain matmul. Weight axes are never merged, so their shardings
    (e.g. heads over "tensor") stay as they are.
    """
    lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    if inner != w.shape[:n_in]:
        raise ValueError(f"matmul_rows: the last {n_in} axes of x {x.shape} must equal the first "
                         f"{n_in} of w {w.shape}")
    y = jax.lax.dot_general(x.reshape((-1,) + inner), w,
                            ((tuple(range(1, n_in + 1)), tuple(range(n_in))), ((), ())))
    return y.reshape(lead + w.shape[n_in:])


def constrain_batch(x: Array, axes: Sequence[str]) -> Array:
    """x (B, …) laid out with B split over the mesh axes `axes` and every other axis whole.

    The residual stream's layout under data parallelism and FSDP. Without it GSPMD may give an
    activation the layout of a parameter sharded over "fsdp" along its width (the embedding
    table) and replicate work across the fsdp shards: for the BD3-LM small preset at L 1024,
    2 sequences per device, fsdp 8, the compiled step had 1.09× an even share of the FLOPs and
    22.3 GiB of temporaries per device instead of 5.1. Applied under the current mesh
    (`jax.set_mesh`, Auto axes): a no-op outside one, for axes it lacks or of size 1, under
    Explicit axes (the type carries the layout), and when they do not divide B.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not axes:
        return x
    present = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if (not present or x.shape[0] % math.prod(mesh.shape[a] for a in present)
            or any(types[a] != jax.sharding.AxisType.Auto for a in present)):
        return x
    spec = jax.sharding.PartitionSpec(present if len(present) > 1 else present[0])
    return jax.lax.with_sharding_constraint(x, spec)


class Dense(nnx.Module):
    """y = x @ kernel + bias. kernel (Din, Dout) float32, matmul in `dtype`, output in `dtype`."""

    def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], *,
                 use_bias: bool = True, zero_init: bool = False, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = make_param(rngs, zeros if zero_init else torch_like_init(), (din, dout),
                                 names, param_dtype)
        self.bias = make_param(rngs, zeros, (dout,), (names[1],), param_dtype) if use_bias else None

    def __call__(self, x: Array) -> Array:
        """(..., Din) -> (..., Dout) in `dtype`."""
        y = matmul_rows(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table E (V, D); lookup returns float32 rows `E[tokens]`."""

    def __init__(self, vocab_size: int, width: int, *, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.embedding = make_param(rngs, torch_like_init(in_axis=-1, out_axis=-2),
                                    (vocab_size, width), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: Array) -> Array:
        """(B, L) int -> (B, L, D) float32."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32, eps 1e-5, biased variance; weight only (the DiT) unless
    `use_bias` (GPT-2), which adds a zero-initialised bias (D,)."""

    def __init__(self, width: int, *, eps: float = LN_EPS, use_bias: bool = False,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = make_param(rngs, ones, (width,), ("embed",), param_dtype)
        self.bias = make_param(rngs, zeros, (width,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x: Array) -> Array:
        """(..., D) -> (..., D) float32."""
        x = x.astype(jnp.float32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        y = (x - mu) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


def per_row(v: Array) -> Array:
    """A modulation chunk as rows: (B, D) per sequence -> (B, 1, D); (B, L, D) per token as is."""
    return v[:, None, :] if v.ndim == 2 else v


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x (B, L, D) · (1 + scale) + shift, with shift/scale (B, D) or per token (B, L, D)."""
    return x * (1.0 + per_row(scale)) + per_row(shift)


class Modulation(nnx.Module):
    """adaLN(-zero) projection c (B, C) -> n chunks (B, n, D); zero-initialised, float32.

    kernel (C, n, D) is torch's `adaLN_modulation.weight` (n·D, C) transposed and reshaped, so chunk
    j of the output is torch output rows j·D … (j+1)·D − 1 (shift, scale, gate, … in order).
    """

    def __init__(self, cond_dim: int, n: int, width: int, *, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.kernel = make_param(rngs, zeros, (cond_dim, n, width), ("cond", "modulation", "embed"),
                                 param_dtype)
        self.bias = make_param(rngs, zeros, (n, width), ("modulation", "embed"), param_dtype)

    def __call__(self, c: Array) -> Array:
        """(B, C) -> (B, n, D), or per token (B, L, C) -> (B, L, n, D); float32."""
        return (jnp.einsum("...c,cnd->...nd", c.astype(jnp.float32),
                           self.kernel[...].astype(jnp.float32))
                + self.bias[...].astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# σ conditioning
# ---------------------------------------------------------------------------------------------

def sigma_features(sigma: Array, dim: int = SIGMA_FEATURES,
                   max_period: float = SIGMA_MAX_PERIOD) -> Array:
    """Sinusoid features of σ, cos first: (B,) -> (B, dim) float32.

    f_j = exp(−ln(max_period)·j/half), φ(σ) = [cos(σ f), sin(σ f)] (zero-padded if dim is odd).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = sigma.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class SigmaEmbedder(nnx.Module):
    """σ (B,) -> Linear_{F→C} → SiLU → Linear_{C→C}, float32 (the caller applies the outer SiLU)."""

    def __init__(self, cond_dim: int, *, features: int = SIGMA_FEATURES,
                 max_period: float = SIGMA_MAX_PERIOD, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.features, self.max_period = features, max_period
        self.fc1 = Dense(features, cond_dim, ("freq", "cond_hidden"), param_dtype=param_dtype,
                         rngs=rngs)
        self.fc2 = Dense(cond_dim, cond_dim, ("cond_hidden", "cond"), param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, sigma: Array) -> Array:
        """(B,) -> (B, C) float32."""
        return self.fc2(jax.nn.silu(self.fc1(sigma_features(sigma, self.features,
                                                            self.max_period))))


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (half-split / rotate_half, GPT-NeoX style)
# ---------------------------------------------------------------------------------------------

def rotary_inv_freq(head_dim: int, base: float = ROPE_BASE) -> Array:
    """inv_freq_j = base^(−2j/Dh), j < Dh/2: (Dh/2,) float32 (torch's `rotary_emb.inv_freq`)."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotary_cos_sin(positions: Array, head_dim: int, base: float = ROPE_BASE) -> tuple[Array, Array]:
    """Rotary tables for integer positions (..., L) -> cos, sin (..., L, Dh) float32.

    Angles θ_{p,j} = p·inv_freq_j are concatenated with themselves over the full head width.
    """
    angles = positions.astype(jnp.float32)[..., None] * rotary_inv_freq(head_dim, base)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, L, H, Dh), cos/sin (B|1, L, Dh) -> x·cos + rotate_half(x)·sin, in x's dtype.

    rotate_half([a, b]) = [−b, a] with a = dims < Dh/2, b = the rest (computed in float32).
    """
    xf = x.astype(jnp.float32)
    a, b = jnp.split(xf, 2, axis=-1)
    rot = jnp.concatenate([-b, a], axis=-1)
    out = xf * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attend_dense(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Softmax attention, scale 1/sqrt(Dh), with the whole score matrix; softmax in float32
    (`_score_dtype`: float64 for float64 inputs).

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), mask bool (B|1, Lq, Lk) (True = may attend) or None
    (full). Returns (B, Lq, H, Dh) in q's dtype. Models call `models.attention.attend`, which
    takes structured masks and picks the backend.
    """
    if q.dtype == jnp.float64:  # jax.nn.dot_product_attention's softmax is float32 only
        p, = _joint_softmax(_scores(q, k, mask))
        return _weighted_values(p, v).astype(q.dtype)
    m = None if mask is None else mask[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, scale=1.0 / math.sqrt(q.shape[-1]),
                                        implementation="xla")


def _score_dtype(q: Array) -> jnp.dtype:
    """Scores and softmax run in float32 (float64 when the inputs are float64)."""
    return jnp.promote_types(q.dtype, jnp.float32)


def _scores(q: Array, k: Array, mask: Array | None, *, heads_first: bool = False) -> Array:
    """Scaled scores (B, H, Lq, Lk) of q (B, Lq, H, Dh) against k (B, Lk, H, Dh), or against
    k (B, H, Lk, Dh) with `heads_first` (the KV cache's layout) (`_score_dtype`).

    Masked-out entries (mask bool (B|1, Lq, Lk) False) get a large negative score.
    """
    spec = "bqhd,bhkd->bhqk" if heads_first else "bqhd,bkhd->bhqk"
    s = jnp.einsum(spec, q, k.astype(q.dtype),
                   preferred_element_type=_score_dtype(q)) * (1.0 / math.sqrt(q.shape[-1]))
    return s if mask is None else jnp.where(mask[:, None], s, jnp.asarray(-1e30, s.dtype))


def _joint_softmax(*scores: Array) -> list[Array]:
    """Softmax over the concatenation of score segments (…, Lq, Lk_i) along the key axis.

    Returns one probability array per segment, without materialising the concatenation. Every
    row must have at least one unmasked entry in some segment.
    """
    m = jax.lax.stop_gradient(  # any shift is exact; stopping it skips the max's backward
        functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores]))
    exps = [jnp.exp(s - m) for s in scores]
    denom = functools.reduce(jnp.add, [e.sum(-1, keepdims=True) for e in exps])
    return [e / denom for e in exps]


def _weighted_values(p: Array, v: Array, *, heads_first: bool = False) -> Array:
    """p (B, H, Lq, Lk) probabilities, v (B, Lk, H, Dh) (or (B, H, Lk, Dh) with `heads_first`)
    -> (B, Lq, H, Dh) in v's dtype."""
    if heads_first:  # contract into (B, H, Lq, Dh) first: XLA:CPU would otherwise transpose v
        return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v), 1, 2)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)


def attend_with_prefix(q: Array, k_pre: Array, v_pre: Array, mask_pre: Array,
                       k: Array, v: Array, mask: Array | None) -> Array:
    """Attention of q over two key segments [prefix ; current] with one joint softmax.

    Used by the KV cache, whose buffer is read in place: no concatenation, and no transpose,
    since it is stored heads first (the layout the score and value contractions want).
    q (B, Lq, H, Dh); k_pre/v_pre (B, H, Lp, Dh), mask_pre bool (B|1, Lq, Lp); k/v (B, Lk, H, Dh),
    mask bool (B|1, Lq, Lk) or None (full). Every query row must be allowed at least one key.
    Returns (B, Lq, H, Dh) in q's dtype.
    """
    p_pre, p_cur = _joint_softmax(_scores(q, k_pre, mask_pre, heads_first=True),
                                  _scores(q, k, mask))
    o = (_weighted_values(p_pre, v_pre.astype(v.dtype), heads_first=True)
         + _weighted_values(p_cur, v))
    return o.astype(q.dtype)


def attend_two_pass(q: Array, k: Array, v: Array, block_size: int, *,
                    band: Array | None = None) -> Array:
    """BD3-LM two-pass attention over [x_t ⊕ x_0] without the dense (2L, 2L) score matrix.

    Equals `attend_dense(q, k, v, bd3lm_two_pass_mask(L, block_size)[:, :Lq])`: a noisy query
    in block b sees its own noisy block (bidirectionally) and the clean blocks < b; a clean
    query in block b sees the clean blocks ≤ b; no query sees another noisy block. So the noisy keys are needed
    only block-diagonally: scores are (L, Lb) within the noisy blocks plus (Lq, L) against the
    clean half, instead of (Lq, 2L) — half the work and memory of the dense form, for any Lb.

    q (B, Lq, H, Dh) with Lq = 2L (both halves) or L (noisy rows only, as in the last layer);
    k/v (B, 2L, H, Dh); band: see `attention.MaskPattern` (the same band in both halves).
    Returns (B, Lq, H, Dh) in q's dtype.
    """
    B, Lq, H, Dh = q.shape
    L = k.shape[1] // 2
    if k.shape[1] != 2 * L or Lq not in (L, 2 * L) or L % block_size:
        raise ValueError(f"two-pass attention needs k of length 2L with L % {block_size} == 0 and "
                         f"q of length L or 2L; got q {q.shape}, k {k.shape}")
    nb = L // block_size
    full = bd3lm_two_pass_mask(L, block_size)[None]
    if band is not None:  # the band applies inside blocks: earlier blocks are always before i
        banded = band_mask(L, band)
        full = full & jnp.tile(banded, (2, 2))[None]
    k_noisy, k_clean, v_noisy, v_clean = k[:, :L], k[:, L:], v[:, :L], v[:, L:]

    # Noisy queries: their own noisy block (no mask inside a block) and the clean prefix.
    def blocks(x):
        return x.reshape(B, nb, block_size, H, Dh)
    s_own = jnp.einsum("bnqhd,bnkhd->bhnqk", blocks(q[:, :L]), blocks(k_noisy).astype(q.dtype),
                       preferred_element_type=_score_dtype(q)) * (1.0 / math.sqrt(Dh))
    if band is not None:
        s_own = jnp.where(band_mask(block_size, band), s_own, jnp.asarray(-1e30, s_own.dtype))
    s_pre = _scores(q[:, :L], k_clean, full[:, :L, L:])       # (B, H, L, L)
    p_own, p_pre = _joint_softmax(s_own.reshape(B, H, L, block_size), s_pre)
    o_own = jnp.einsum("bhnqk,bnkhd->bnqhd", p_own.reshape(B, H, nb, block_size, block_size)
                       .astype(v.dtype), blocks(v_noisy))
    o = o_own.reshape(B, L, H, Dh) + _weighted_values(p_pre, v_clean)
    if Lq == 2 * L:  # clean queries: block-causal over the clean half only
        p_clean, = _joint_softmax(_scores(q[:, L:], k_clean, full[:, L:, L:]))
        o = jnp.concatenate([o, _weighted_values(p_clean, v_clean)], axis=1)
    return o.astype(q.dtype)


class Attention(nnx.Module):
    """Fused q/k/v projection and output projection, both without bias.

    qkv kernel (D, 3, H, Dh): torch `attn_qkv.weight` (3D, D) transposed, output axis split as
    (three, H, Dh) — [q | k | v] outermost, then heads. out kernel (H, Dh, D): `attn_out.weight`ᵀ.
    """

    def __init__(self, width: int, heads: int, *, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        assert width % heads == 0, (width, heads)
        self.heads, self.head_dim, self.dtype = heads, width // heads, dtype
        self.qkv = make_param(rngs, torch_like_init(in_axis=0, out_axis=(1, 2, 3)),
                              (width, 3, heads, self.head_dim), ("embed", "qkv", "heads", "kv"),
                              param_dtype)
        self.out = make_param(rngs, torch_like_init(in_axis=(0, 1), out_axis=2),
                              (heads, self.head_dim, width), ("heads", "kv", "embed"), param_dtype)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """x (B, L, D) -> pre-rotary q, k, v, each (B, L, H, Dh) in `dtype`."""
        qkv = matmul_rows(x.astype(self.dtype), self.qkv[...].astype(self.dtype))
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def output(self, o: Array) -> Array:
        """o (B, L, H, Dh) -> (B, L, D) in `dtype`."""
        return matmul_rows(o.astype(self.dtype), self.out[...].astype(self.dtype), n_in=2)


class Mlp(nnx.Module):
    """Linear (D → r·D, bias) → tanh-GELU → Linear (r·D → D, bias), in `dtype`."""

    def __init__(self, width: int, mlp_ratio: int = 4, *, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        hidden = mlp_ratio * width
        self.fc1 = Dense(width, hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
        self.fc2 = Dense(hidden, width, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """(B, L, D) -> (B, L, D) in `dtype`."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------

def dropout(x: Array, rate: float, key: Array | None, deterministic: bool) -> Array:
    """Inverted dropout: keep with prob 1 − rate and rescale; identity when deterministic/rate 0."""
    if deterministic or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout needs a key (pass rngs=...) when deterministic=False")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def dropout_key(rngs, rate: float, deterministic: bool) -> Array | None:
    """The key a model's dropout draws from: None when off (deterministic or rate 0); `rngs` may
    be nnx.Rngs (its dropout stream), an RngStream or a key."""
    if deterministic or rate == 0.0:
        return None
    if rngs is None:
        raise ValueError("deterministic=False with dropout > 0 needs rngs (nnx.Rngs or a key)")
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs
