"""The DiT-style transformer shared by SEDD, MDLM and BD3-LM, and its causal (AR) variant.

Architecture (the DiT of Peebles & Xie, 2023, as used for text by SEDD, MDLM and BD3-LM): token
embedding (untied) → N pre-norm blocks with adaLN(-zero) modulation from c = SiLU(MLP(φ(σ))) and rotary positions → final layer
(weight-only LN, adaLN shift/scale, Linear with bias). Modulation and output layers start at zero,
so a fresh model outputs exactly 0.

Shapes: B batch, L length, Lb block length, V vocabulary (including the mask token where the
process has one), D width, H heads, Dh = D/H, C cond_dim, N depth.

Modes:
  * ``__call__``: one forward with an explicit boolean attention mask (default: full, i.e. MDLM /
    SEDD bidirectional; the AR model always ANDs in the causal mask).
  * ``two_pass``: BD3-LM training in one pass over [x_t ⊕ x_0] (2L) with the two-pass mask
    (computed block-sparsely by `layers.attend_two_pass`) and rotary positions 0…L−1 reused for
    both halves; only the x_t half reaches the output layer.
  * ``init_cache`` / ``decode_block``: block-by-block decoding with an explicit KV-cache pytree.

Causal (AR) variant, ``causal=True``: the BD3-LM code's causal DDiT block: no σ embedder,
no adaLN modulation layers anywhere (they do not exist as parameters); blocks compute
``h += attn_out(attn(LN₁ h))`` and ``h += mlp(LN₂ h)`` (gates 1, weight-only LN, rotary, causal
mask), and the head is ``linear(LN_f h)``. σ is accepted and ignored; ``time_conditioning`` is
ignored. With ``history_noise`` (PnF's noisy-history AR model over an ordinal vocabulary) σ is
the noise level of the (real-valued) history instead, an additive input of the embedding; the KV
cache path (``decode_block``) is its σ = 0 model.

Layer layouts: by default ``blocks`` is an ``nnx.List`` of N `DiTBlock`s (params
``blocks[i][...]``) applied by a Python loop, so the compiled program holds N copies of the block
and its compile time grows with N. With ``scan_layers=True`` ``blocks`` is ONE `DiTBlock` whose
parameters carry a leading depth axis (logical axis "layers": params ``blocks[...]`` (N, *S)),
applied as one `jax.lax.scan` (`scan_blocks`; remat per layer inside the scanned body; per-layer
dropout keys as the loop's; the KV-cache decode scans over a stacked cache too): one compiled
body, whatever N. The two-pass forward's last layer computes only the x_t query rows, so there it
is peeled off the scan. Both layouts start from the same values for the same seed and compute
the same function; `models.layout` converts parameters (checkpoints convert on restore).

Time conditioning off (``time_conditioning=False``, the released MDLM/BD3-LM setting): σ is replaced
by 0 and the adaLN path stays fully active (c is then a constant vector), as in the reference.

Functional use: modules hold parameters only (no RNG state, no caches), so
``graphdef, state = nnx.split(model)`` / ``nnx.merge`` inside ``jax.jit`` works; dropout keys come
in through ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` stream, an ``RngStream``, or a typed key).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dlm_jax.config import REMAT_POLICIES as REMAT_NAMES, ConfigError, ModelConfig
from dlm_jax.masks import causal_mask
from dlm_jax.models.attention import MaskPattern, attend, check_backend, model_mask
from dlm_jax.models.cache import KVCache
from dlm_jax.models.layout import stack_modules
from dlm_jax.models.layers import (Attention, Embed, LayerNorm, Mlp, Modulation, SigmaEmbedder,
                                   make_param, zeros,
                                   Dense, apply_rotary, attend_with_prefix, constrain_batch,
                                   SIGMA_FEATURES, SIGMA_MAX_PERIOD, dropout, dropout_key, modulate,
                                   per_row, rotary_cos_sin)

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Size presets
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Width D, depth N, heads H and cond_dim C of a preset."""

    width: int
    depth: int
    heads: int
    cond_dim: int


# What the backward pass may keep from a block's forward (`jax.checkpoint` policies).
REMAT_POLICIES = {
    "none": None,  # no checkpointing: keep everything
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_NAMES, "config.REMAT_POLICIES and the policies disagree"

MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(width=64, depth=2, heads=4, cond_dim=32),      # tests
    "bench": ModelSize(width=256, depth=4, heads=4, cond_dim=128),   # CPU benchmarks / quickstart
    "small": ModelSize(width=768, depth=12, heads=12, cond_dim=128),  # SEDD/MDLM/BD3-LM small
    "medium": ModelSize(width=1024, depth=24, heads=16, cond_dim=128),
}


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

def _split_keys(key: Array | None, n: int) -> list[Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def layer_keys(key: Array | None, n: int) -> Array | None:
    """The n per-layer dropout keys as one (n,) key array (the scanned stack's xs), equal to
    `_split_keys` (the unrolled stack's list); None when dropout is off."""
    return None if key is None else jax.random.split(key, n)


def layer_of(blocks: nnx.Module, i: int) -> nnx.Module:
    """Layer i of a stacked block module (`layout.stack_modules`): its parameters (N, *S)[i]."""
    graphdef, params = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))


def scan_blocks(blocks: nnx.Module, carry, xs, step, *, remat: str = "none",
                layers: slice | None = None):
    """A stacked block module (parameters (N, *S), `layout.stack_modules`) applied as ONE
    `jax.lax.scan` over its layers: ``carry, y_i = step(block_i, carry, x_i)``.

    xs: a pytree of per-layer inputs with leading axis N (or n, the length of `layers`), or
    None; `layers` a slice of the layers to run (default all). remat: a `REMAT_POLICIES` name;
    other than "none", each layer's step is under `jax.checkpoint` with that policy, as
    `DiT._apply_block` does per block of the unrolled stack (one compiled body, not N copies).
    Returns (carry, ys stacked along a leading axis).
    """
    graphdef, params = nnx.split(blocks)
    if layers is not None:
        params = jax.tree.map(lambda a: a[layers], params)

    def layer(p, carry, x):
        return step(nnx.merge(graphdef, p), carry, x)
    if remat != "none":  # scan already keeps the body from being CSE'd across iterations
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(lambda c, px: layer(px[0], c, px[1]), carry, (params, xs))


def scan_blocks_then_last(blocks: nnx.Module, h, keys, step, last, *, depth: int,
                          remat: str = "none"):
    """`scan_blocks` over layers 0…depth−2 of a stacked block module, then the last layer
    applied on its own, ``h = last(block, h, key)`` (e.g. with fewer query rows: the two-pass
    forward). keys: per-layer keys with leading axis depth, or None. Returns h."""
    scanned = depth - 1
    if scanned:
        h, _ = scan_blocks(blocks, h, None if keys is None else keys[:scanned], step,
                           remat=remat, layers=slice(0, scanned))
    return last(layer_of(blocks, depth - 1), h, None if keys is None else keys[-1])


class DiTBlock(nnx.Module):
    """Pre-norm transformer block with adaLN(-zero) modulation (or none, for the AR variant).

    adaLN chunks (shift, scale, gate) for attention then MLP; the gate multiplies the branch after
    dropout: h += gate·Dropout(branch). Without adaLN: shift = scale = 0, gate = 1.
    """

    def __init__(self, width: int, heads: int, cond_dim: int, *, mlp_ratio: int = 4,
                 dropout: float = 0.0, adaln: bool = True, attention: str = "xla",
                 shard_axes: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dropout_rate = dropout
        self.attention, self.shard_axes = attention, shard_axes
        self.norm1 = LayerNorm(width, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(width, heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(width, param_dtype=param_dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.adaln = (Modulation(cond_dim, 6, width, param_dtype=param_dtype, rngs=rngs)
                      if adaln else None)

    def _modulation(self, c: Array | None) -> Array | None:
        """(B, C) -> (B, 6, D) float32: shift/scale/gate (attention), shift/scale/gate (MLP)."""
        return None if self.adaln is None else self.adaln(c)

    def _attn_input(self, h: Array, mod: Array | None) -> Array:
        x = self.norm1(h)
        return x if mod is None else modulate(x, mod[..., 0, :], mod[..., 1, :])

    def _residuals(self, h: Array, attn_branch: Array, mod: Array | None, *, deterministic: bool,
                   key: Array | None) -> Array:
        """h (B, L, D) float32 plus the gated attention branch, then the gated MLP branch."""
        k_attn, k_mlp = _split_keys(key, 2)
        branch = dropout(attn_branch, self.dropout_rate, k_attn, deterministic).astype(jnp.float32)
        h = h + (branch if mod is None else per_row(mod[..., 2, :]) * branch)
        x = self.norm2(h)
        if mod is not None:
            x = modulate(x, mod[..., 3, :], mod[..., 4, :])
        branch = dropout(self.mlp(x), self.dropout_rate, k_mlp, deterministic).astype(jnp.float32)
        return h + (branch if mod is None else per_row(mod[..., 5, :]) * branch)

    def __call__(self, h: Array, c: Array | None, cos: Array, sin: Array,
                 mask: Array | MaskPattern | None, *,
                 q_rows: int | None = None, deterministic: bool = True,
                 key: Array | None = None) -> Array:
        """One block over h (B, L, D) float32 with conditioning c (B, C) (None without adaLN).

        cos/sin (B|1, L, Dh) rotary tables; mask: a `MaskPattern` (e.g. the BD3-LM layout over
        [x_t ⊕ x_0]), a bool array (B|1, L, L) or None (full); computed by `attention`.
        With q_rows, only the first q_rows rows are computed as queries/outputs (keys still
        cover all L rows): returns (B, q_rows, D).
        Returns (B, L, D) float32 otherwise.
        """
        mod = self._modulation(c)
        q, k, v = self.attn.project(self._attn_input(h, mod))
        k = apply_rotary(k, cos, sin)
        if q_rows is not None:
            q, h, cos, sin = q[:, :q_rows], h[:, :q_rows], cos[:, :q_rows], sin[:, :q_rows]
            if isinstance(mask, jax.Array):  # a pattern adapts to q's length itself
                mask = mask[:, :q_rows]
            if mod is not None and mod.ndim == 4:  # per-token conditioning
                mod = mod[:, :q_rows]
        q = apply_rotary(q, cos, sin)
        o = attend(q, k, v, mask, backend=self.attention, shard_axes=self.shard_axes)
        return self._residuals(h, self.attn.output(o), mod, deterministic=deterministic, key=key)

    def decode(self, h: Array, c: Array | None, k_cache: Array, v_cache: Array, cache_mask: Array,
               rope_block: tuple[Array, Array], block_mask: Array | None
               ) -> tuple[Array, Array, Array]:
        """One block for a decoding step over the cached prefix plus the current block.

        h (B, Lb, D) float32; k_cache/v_cache (B, H, W, Dh) post-rotary keys and values;
        cache_mask bool (1, Lb, W) (slot valid); rope_block cos/sin (1, Lb, Dh) at the block's
        absolute positions; block_mask (1, Lb, Lb) or None (bidirectional within the block).
        Returns the new h (B, Lb, D) and the block's post-rotary k and its v (B, Lb, H, Dh).
        No dropout.
        """
        mod = self._modulation(c)
        q, k, v = self.attn.project(self._attn_input(h, mod))
        q_r, k_r = apply_rotary(q, *rope_block), apply_rotary(k, *rope_block)
        o = attend_with_prefix(q_r, k_cache.astype(q.dtype), v_cache, cache_mask, k_r, v,
                               block_mask)
        h = self._residuals(h, self.attn.output(o), mod, deterministic=True, key=None)
        return h, k_r, v


class FinalLayer(nnx.Module):
    """logits = (LN_f(h)·(1 + scale) + shift) W + b; adaLN and W, b are zero-initialised."""

    def __init__(self, width: int, vocab_size: int, cond_dim: int, *, adaln: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = LayerNorm(width, param_dtype=param_dtype, rngs=rngs)
        self.adaln = (Modulation(cond_dim, 2, width, param_dtype=param_dtype, rngs=rngs)
                      if adaln else None)
        self.linear = Dense(width, vocab_size, ("embed", "vocab"), zero_init=True, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: Array, c: Array | None) -> Array:
        """h (B, L, D), c (B, C) or None -> (B, L, V) float32."""
        x = self.norm(h)
        if self.adaln is not None:
            mod = self.adaln(c)
            x = modulate(x, mod[..., 0, :], mod[..., 1, :])
        return self.linear(x).astype(jnp.float32)


def interpolated_embedding(table: Array, values: Array) -> Array:
    """Rows of an embedding table (V, D) at real-valued positions: values (...) float ->
    (..., D) float32, (1 − w)·E[k] + w·E[k + 1] with k = ⌊v⌋ (at most V − 2), w = v − k and v
    clipped to [0, V − 1]. The lookup itself at integers (w = 0), piecewise linear in between, so
    ∂/∂v = E[k + 1] − E[k]: the continuous input path of an ordinal vocabulary (token k stands
    for the value k) that Langevin sampling differentiates, with no new table."""
    V = table.shape[0]
    v = jnp.clip(jnp.asarray(values, jnp.float32), 0.0, V - 1.0)
    k = jnp.clip(jnp.floor(v), 0, max(V - 2, 0)).astype(jnp.int32)
    w = (v - k)[..., None]
    t = table.astype(jnp.float32)
    return (1.0 - w) * jnp.take(t, k, axis=0) + w * jnp.take(t, k + 1, axis=0)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class DiT(nnx.Module):
    """DiT backbone (SEDD / MDLM / BD3-LM) or, with ``causal=True``, the AR transformer.

    Args:
      vocab_size: V, the model vocabulary INCLUDING the mask token where the process has one.
      width, depth, heads: D, N, H (D % H == 0, Dh even).
      cond_dim: C, width of the σ conditioning (ignored when causal).
      mlp_ratio: MLP hidden width = mlp_ratio · D.
      dropout: residual-branch dropout rate (active only with deterministic=False).
      causal: AR variant (causal attention, no adaLN/σ embedder; see the module docstring).
      time_conditioning: False replaces σ by 0 (adaLN stays active), as released MDLM/BD3-LM.
      token_conditioning: a σ given per token (B, L) modulates each token by its own σ (block-wise
        noise levels, e.g. block SEDD); False averages it over L, as the reference code does. With a KV
        cache, commit clean blocks with σ = 0, as the clean half of the two-pass training input.
      remat: activation rematerialisation per block, trading compute for memory: "none",
        "block" (keep only each block's input; recompute the block in the backward pass) or
        "dots" (keep the matmul outputs, recompute the element-wise ops). Values are unchanged.
      attention: the attention backend (`models.attention`): "xla" (flash-style, every
        platform), "dense", "splash" (TPU), "cudnn" (GPU).
      scan_layers: the N blocks as ONE `DiTBlock` whose parameters carry a leading depth axis
        ("layers"; params["blocks"][...] (N, *S) instead of params["blocks"][i][...]), applied
        as one `jax.lax.scan` (remat per layer; the KV-cache decode scans too): compile time
        independent of depth. Same initial values, outputs and gradients as the unrolled stack
        (`models.layout` converts parameters between the two).
      history_noise: causal only — the noisy-history AR model of PnF (Jayaram & Thickstun, 2021)
        over an ordinal vocabulary: ``__call__``'s σ is the noise level of the history, added to
        every embedding as log(1 + σ)·u with one learned vector u (D,) (`noise_embed`,
        zero-initialised, created only with this option, after all other parameters, so the
        others keep their names and initial values). σ = 0 or None is the plain model.
      batch_axes: the mesh axes the batch is split over (the "batch" rule of `mesh.rules`):
        under a mesh the residual stream keeps that layout (`layers.constrain_batch`); () none.
      head_axes: the mesh axes the heads are split over (the "heads" rule). With batch_axes,
        how a per-shard attention backend (`splash`) splits its shard_map; both () means the
        default rules'.
      dtype: compute dtype of matmuls (e.g. jnp.bfloat16); params are `param_dtype` (float32).
      rngs: parameter initialisation RNG (only the ``params`` stream is used).
    """

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, *,
                 cond_dim: int = 128, mlp_ratio: int = 4, dropout: float = 0.1,
                 causal: bool = False, time_conditioning: bool = False,
                 token_conditioning: bool = True, sigma_features: int = SIGMA_FEATURES,
                 sigma_max_period: float = SIGMA_MAX_PERIOD, remat: str = "none",
                 attention: str = "xla", history_noise: bool = False,
                 scan_layers: bool = False, batch_axes: tuple[str, ...] = (),
                 head_axes: tuple[str, ...] = (),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of even width")
        self.vocab_size, self.width, self.depth, self.heads = vocab_size, width, depth, heads
        self.head_dim = width // heads
        self.cond_dim, self.mlp_ratio, self.dropout = cond_dim, mlp_ratio, dropout
        self.causal = causal
        self.adaln = not causal
        self.time_conditioning = bool(time_conditioning) and not causal
        self.token_conditioning = bool(token_conditioning)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose from {sorted(REMAT_POLICIES)}")
        self.remat = remat
        self.attention = check_backend(attention)
        self.batch_axes = tuple(batch_axes)
        shard_axes = (self.batch_axes, tuple(head_axes)) if batch_axes or head_axes else None
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embed(vocab_size, width, param_dtype=param_dtype, rngs=rngs)
        self.sigma_map = (SigmaEmbedder(cond_dim, features=sigma_features,
                                        max_period=sigma_max_period, param_dtype=param_dtype,
                                        rngs=rngs) if self.adaln else None)
        blocks = [DiTBlock(width, heads, cond_dim, mlp_ratio=mlp_ratio, dropout=dropout,
                           adaln=self.adaln, attention=attention, shard_axes=shard_axes, **kw)
                  for _ in range(depth)]
        self.scan_layers = bool(scan_layers)
        # Stacked from N blocks built in order, so both layouts start from the same values.
        self.blocks = stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
        self.final = FinalLayer(width, vocab_size, cond_dim, adaln=self.adaln, **kw)
        if history_noise and not causal:
            raise ValueError("history_noise is an option of the causal (AR) model")
        self.history_noise = bool(history_noise)
        self.noise_embed = (make_param(rngs, zeros, (width,), ("embed",), param_dtype)
                            if self.history_noise else None)

    @classmethod
    def from_size(cls, size: str | ModelSize, vocab_size: int, **kwargs) -> "DiT":
        """Builds a model from a `MODEL_SIZES` preset name (or a ModelSize); kwargs as __init__."""
        s = MODEL_SIZES[size] if isinstance(size, str) else size
        kwargs.setdefault("cond_dim", s.cond_dim)
        return cls(vocab_size, s.width, s.depth, s.heads, **kwargs)

    # -- conditioning ----------------------------------------------------------------------------

    def cond_embedding(self, sigma: Array) -> Array:
        """c = SiLU(sigma_map(σ)) for σ (B,) as given (no time-conditioning switch): (B, C) f32."""
        if self.sigma_map is None:
            raise ValueError("the causal (AR) model has no σ conditioning")
        return jax.nn.silu(self.sigma_map(jnp.asarray(sigma, jnp.float32)))

    def _conditioning(self, sigma: Array | None, batch: int, length: int | None = None,
                      clean_rows: int = 0) -> Array | None:
        """σ -> c: (B, C) per sequence, or (B, length + clean_rows, C) per token; None (AR).

        σ may be a scalar, (B,) or (B, L). A (B, L) σ is averaged over L like the reference,
        unless `token_conditioning` is on and time conditioning is active: then every token is
        modulated by its own σ (block-wise noise levels), and `clean_rows` rows of σ = 0 are
        appended (the clean x_0 half of the two-pass input).
        """
        if not self.adaln:
            return None
        if sigma is None:
            if self.time_conditioning:
                raise ValueError("sigma is required when time_conditioning=True")
            sigma = jnp.zeros((batch,), jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32)
        if sigma.ndim == 2 and self.token_conditioning and self.time_conditioning:
            sigma = jnp.broadcast_to(sigma, (batch, length))
            sigma = jnp.pad(sigma, ((0, 0), (0, clean_rows)))
            c = self.cond_embedding(sigma.reshape(-1))
            return c.reshape(sigma.shape + c.shape[-1:])
        if sigma.ndim == 2:
            sigma = sigma.mean(axis=-1)
        sigma = jnp.broadcast_to(sigma, (batch,))
        if not self.time_conditioning:
            sigma = jnp.zeros_like(sigma)
        return self.cond_embedding(sigma)

    def _dropout_key(self, rngs, deterministic: bool) -> Array | None:
        return dropout_key(rngs, self.dropout, deterministic)

    # -- forward ---------------------------------------------------------------------------------

    def _embed_input(self, tokens: Array, noise: Array | None) -> Array:
        """(B, L) int token ids, or float values of an ordinal vocabulary (token k = value k)
        embedded by `interpolated_embedding`; with `history_noise`, plus log(1 + σ)·u for the
        noise level σ (B,) or scalar (None: nothing added). Returns (B, L, D) float32."""
        if jnp.issubdtype(tokens.dtype, jnp.floating):
            h = interpolated_embedding(self.embed.embedding[...], tokens)
        else:
            h = self.embed(tokens)
        if self.noise_embed is not None and noise is not None:
            level = jnp.log1p(jnp.broadcast_to(jnp.asarray(noise, jnp.float32), tokens.shape[:1]))
            h = h + level[:, None, None] * self.noise_embed[...].astype(jnp.float32)
        return h

    def _forward(self, tokens: Array, c: Array | None, mask: Array | None, positions: Array, *,
                 out_rows: int | None, deterministic: bool, key: Array | None,
                 noise: Array | None = None) -> Array:
        """Shared trunk: embedding, blocks, final layer on the first out_rows rows (or all)."""
        h = constrain_batch(self._embed_input(tokens, noise), self.batch_axes)
        cos, sin = rotary_cos_sin(positions, self.head_dim)
        if self.scan_layers:
            h = self._scan_forward(h, c, cos, sin, mask, out_rows=out_rows,
                                   deterministic=deterministic, key=key)
        else:
            keys = _split_keys(key, self.depth)
            last = self.depth - 1
            for i, block in enumerate(self.blocks):
                h = self._apply_block(block, h, c, cos, sin, mask,
                                      q_rows=out_rows if i == last else None,
                                      deterministic=deterministic, key=keys[i])
                h = constrain_batch(h, self.batch_axes)
        if out_rows is not None:
            h = h[:, :out_rows]
            if c is not None and c.ndim == 3:
                c = c[:, :out_rows]
        return self.final(h, c)

    def _scan_forward(self, h: Array, c, cos, sin, mask, *, out_rows: int | None,
                      deterministic: bool, key: Array | None) -> Array:
        """The stacked blocks over h (B, L, D) as one scan. With out_rows (two-pass), the last
        layer computes only out_rows query rows, so it is peeled off the scan and applied on
        its own: returns (B, out_rows, D), else (B, L, D)."""
        keys = layer_keys(key, self.depth)

        def step(block, h, k):
            h = block(h, c, cos, sin, mask, deterministic=deterministic, key=k)
            return constrain_batch(h, self.batch_axes), None
        if out_rows is None:
            return scan_blocks(self.blocks, h, keys, step, remat=self.remat)[0]

        def last(block, h, k):
            h = self._apply_block(block, h, c, cos, sin, mask, q_rows=out_rows,
                                  deterministic=deterministic, key=k)
            return constrain_batch(h, self.batch_axes)
        return scan_blocks_then_last(self.blocks, h, keys, step, last, depth=self.depth,
                                     remat=self.remat)

    def _apply_block(self, block: DiTBlock, h: Array, c, cos, sin, mask, *, q_rows,
                     deterministic: bool, key) -> Array:
        """`block(h, …)`, under `jax.checkpoint` with the configured remat policy."""
        if self.remat == "none":
            return block(h, c, cos, sin, mask, q_rows=q_rows, deterministic=deterministic, key=key)
        graphdef, params = nnx.split(block)

        def run(params, h, c, cos, sin, key):
            return nnx.merge(graphdef, params)(h, c, cos, sin, mask, q_rows=q_rows,
                                               deterministic=deterministic, key=key)
        return jax.checkpoint(run, policy=REMAT_POLICIES[self.remat])(params, h, c, cos, sin, key)

    def __call__(self, tokens: Array, sigma: Array | None = None, *, mask: Array | None = None,
                 positions: Array | None = None, deterministic: bool = True,
                 rngs=None) -> Array:
        """Raw outputs (logits) for tokens (B, L) int32 at noise level σ (B,).

        tokens may be float values (B, L) of an ordinal vocabulary (`interpolated_embedding`);
        with `history_noise`, σ (B,) or scalar is the noise level of those values.
        mask: a `MaskPattern`, bool (B|1, L, L) or (L, L) (True = may attend), or None = full
        attention (the AR model always ANDs the causal mask in). positions: (B|1, L) or (L,)
        ints for rotary, default
        0…L−1. rngs: dropout randomness, needed only if deterministic=False.
        Returns (B, L, V) float32.
        """
        B, L = tokens.shape
        mask = model_mask(mask, L, causal=self.causal)
        if positions is None:
            positions = jnp.arange(L, dtype=jnp.int32)
        positions = jnp.asarray(positions)
        positions = positions[None] if positions.ndim == 1 else positions
        key = self._dropout_key(rngs, deterministic)
        c = self._conditioning(sigma, B, L)
        return self._forward(tokens, c, mask, positions, out_rows=None,
                             deterministic=deterministic, key=key,
                             noise=sigma if self.history_noise else None)

    def two_pass(self, xt: Array, x0: Array, sigma: Array | None, block_size: int, *,
                 band: Array | None = None, deterministic: bool = True, rngs=None) -> Array:
        """BD3-LM training forward over [x_t ⊕ x_0] in one pass; logits of the x_t half.

        xt, x0: (B, L) int32 with L % block_size == 0; σ (B,), or (B, L) per token of x_t with
        `token_conditioning` (the clean half is then conditioned on σ = 0). Rotary positions 0…L−1 for both
        halves; the two-pass mask keeps x_t blocks away from each other and from their own clean
        block. block_size = L reproduces the plain bidirectional call on x_t. band (int32,
        may be traced): attention inside each block only to keys j ≤ i + band (`MaskPattern`).
        Returns (B, L, V) float32.
        """
        if self.causal:
            raise ValueError("two_pass is for the diffusion (non-causal) model")
        B, L = xt.shape
        if L % block_size:
            raise ValueError(f"length {L} is not a multiple of block_size {block_size}")
        tokens = jnp.concatenate([xt, x0], axis=1)
        half = jnp.arange(L, dtype=jnp.int32)
        positions = jnp.concatenate([half, half])[None]
        mask = MaskPattern("two_pass", block_size, band)
        key = self._dropout_key(rngs, deterministic)
        c = self._conditioning(sigma, B, L, clean_rows=L)
        return self._forward(tokens, c, mask, positions, out_rows=L,
                             deterministic=deterministic, key=key)

    # -- KV-cache decoding -------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """Empty KVCache: N per-layer buffers (B, H, max_len, Dh) of `dtype`, length 0 (with
        `scan_layers`, one stacked (N, B, H, max_len, Dh) buffer each for k and v)."""
        return KVCache.zeros(self.depth, batch, max_len, self.heads, self.head_dim, dtype,
                             stacked=self.scan_layers)

    def decode_block(self, tokens: Array, sigma: Array | None, cache: KVCache, *,
                     commit: bool, causal: bool | None = None) -> tuple[Array, KVCache]:
        """Logits for one block given the committed prefix in `cache` (no dropout).

        tokens (B, Lb) int32 at absolute positions cache.length … cache.length+Lb−1 attend to the
        cache's valid slots and to the block itself (bidirectionally; causally for the AR model).
        commit (a Python bool): True writes the block's keys and values into the cache (sliding
        its window if full; `KVCache.append`), False leaves the cache unchanged. causal (default:
        the model's own) makes the block attend to itself causally: a jointly trained diffusion
        model decoding as an AR model. Cost per layer: O(Lb × (W + Lb)).
        Returns (logits (B, Lb, V) float32, the cache).
        """
        if not isinstance(commit, bool):
            raise TypeError("decode_block(commit=...) must be a Python bool: commit once per "
                            "finished block, outside the denoising loop")
        B, Lb = tokens.shape
        q_pos = cache.length + jnp.arange(Lb, dtype=jnp.int32)
        rope_block = rotary_cos_sin(q_pos[None], self.head_dim)
        cache_mask = jnp.broadcast_to(cache.valid()[None, None, :], (1, Lb, cache.max_len))
        causal = self.causal if causal is None else causal
        block_mask = causal_mask(Lb)[None] if causal else None
        c = self._conditioning(sigma, B, Lb)
        h = self.embed(tokens)
        if self.scan_layers:
            def step(block, h, kv):
                h, k, v = block.decode(h, c, *kv, cache_mask, rope_block, block_mask)
                return h, (k, v)
            h, (ks, vs) = scan_blocks(self.blocks, h, cache.stacked_kv(), step)
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                h, k, v = block.decode(h, c, cache.k[i], cache.v[i], cache_mask, rope_block,
                                       block_mask)
                ks.append(k)
                vs.append(v)
        logits = self.final(h, c)
        if not commit:
            return logits, cache
        return logits, cache.append(ks, vs)


# ---------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------

def model_dims(cfg: ModelConfig) -> dict[str, int]:
    """Width/depth/heads/cond_dim: the size preset, overridden by any non-zero explicit field."""
    if cfg.size not in MODEL_SIZES:
        raise ConfigError(f"config.model.size={cfg.size!r} is not allowed; choose one of "
                          f"{sorted(MODEL_SIZES)}")
    preset = dataclasses.asdict(MODEL_SIZES[cfg.size])
    dims = {k: (getattr(cfg, k) or preset[k]) for k in ("width", "depth", "heads", "cond_dim")}
    even = cfg.arch != "gpt2"  # rotary needs an even head width; GPT-2 has none
    if dims["width"] % dims["heads"] or (even and (dims["width"] // dims["heads"]) % 2):
        raise ConfigError(f"config.model.width={dims['width']} must split into "
                          f"config.model.heads={dims['heads']} heads"
                          + (" of even width" if even else ""))
    return dims


def build_model(cfg: ModelConfig, *, vocab_size: int, causal: bool,
                history_noise: bool = False, batch_axes: tuple[str, ...] = (),
                head_axes: tuple[str, ...] = (), rngs: nnx.Rngs) -> nnx.Module:
    """The DiT (causal: the AR variant), or with `arch="gpt2"` the `GPT2` (causal: the language
    model; otherwise its bidirectional variant, a masked-diffusion denoiser), described by the
    model section of a config (validated: `n_positions` resolved). history_noise: the DiT's
    noise-level input of noisy-history AR training (`diffusion.history_noise`); batch_axes: the
    mesh axes of the batch, which the residual stream keeps under a mesh; head_axes: those of
    the heads (with batch_axes, how `splash` splits its shard_map)."""
    dims = model_dims(cfg)
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    if cfg.arch == "gpt2":
        from dlm_jax.models.gpt2 import GPT2  # gpt2 imports this module
        if history_noise:
            raise ConfigError("config.diffusion.history_noise needs model.arch='dit' (GPT-2 has "
                              "no noise-level input)")
        if cfg.n_positions < 1:
            raise ConfigError(f"config.model.n_positions={cfg.n_positions} is unresolved: "
                              f"config.validate sets 0 to data.seq_len")
        return GPT2(vocab_size, dims["width"], dims["depth"], dims["heads"],
                    n_positions=cfg.n_positions, mlp_hidden=cfg.mlp_ratio * dims["width"],
                    layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout, remat=cfg.remat,
                    causal=causal, attention=cfg.attention, scan_layers=cfg.scan_layers,
                    batch_axes=batch_axes, head_axes=head_axes, dtype=dtype, rngs=rngs)
    return DiT(vocab_size, dims["width"], dims["depth"], dims["heads"], cond_dim=dims["cond_dim"],
               mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, causal=causal,
               time_conditioning=cfg.time_conditioning,
               token_conditioning=cfg.token_conditioning, sigma_features=cfg.sigma_features,
               sigma_max_period=cfg.sigma_max_period, remat=cfg.remat,
               attention=cfg.attention, history_noise=history_noise,
               scan_layers=cfg.scan_layers, batch_axes=batch_axes, head_axes=head_axes,
               dtype=dtype, rngs=rngs)
