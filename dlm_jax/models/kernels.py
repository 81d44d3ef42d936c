"""The accelerator attention backends: Pallas splash attention (TPU) and cuDNN fused attention (GPU).

Both compute `attention.dense_attention` (scale 1/sqrt(Dh), softmax in float32) for a
`MaskPattern`, flash-style: key/value tiles with an online softmax, never the (Lq, Lk) score
matrix (Dao et al., 2022, "FlashAttention"). Shapes: q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), queries
the first Lq key positions; output (B, Lq, H, Dh) in q's dtype.

What runs natively and what falls back to the plain-JAX flash attention (`models.flash`):

  pattern            splash (TPU)                   cudnn (GPU)
  full               FullMask                       NO_MASK
  causal             CausalMask (in-kernel)         CAUSAL (Lq = Lk only)
  block_causal       NumpyMask                      fallback
  two_pass           NumpyMask                      fallback
  any, with a band   fallback                       fallback
  float32 / float64  native (f32 MXU)               fallback

Why the fallbacks:
  * band: the annealed band is a traced scalar that changes every step; splash needs its mask as
    static numpy (the block-sparsity tables are built at trace time), and cuDNN's only window is a
    static left window (k > q - w), while the band is a right bound inside blocks (k' ≤ q' + band).
  * cuDNN, block-causal / two-pass: cuDNN's fused kernel knows no-mask, causal, padding and a left
    sliding window (NVIDIA cuDNN fused attention, "mask types"). Anything else enters
    `jax.nn.dot_product_attention` as a dense additive bias, which skips no masked tiles (half the
    two-pass tiles are empty), and whose gradient jax always requests; cuDNN does not support a
    bias gradient for a (1, 1, Lq, Lk) broadcast bias in the versions we know of. So these run
    the flash fallback, which skips the empty tiles.
  * cuDNN, causal with Lq < Lk: our queries are the first Lq keys (top-left diagonal); cuDNN's
    causal alignment for rectangular shapes is not something we rely on.
  * cuDNN, float32: the fused kernel takes fp16/bf16 only; casting would silently lower the
    precision of a float32 model, so float32 inputs use the fallback (bf16 models get cuDNN).
  * cuDNN, head dim: a multiple of 8 and ≤ 128 (≤ 256 on Hopper and later), else the fallback.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlm_jax.config import MeshConfig
from dlm_jax.models.attention import MaskPattern
from dlm_jax.sharding import mesh_axes_for

Array = jax.Array

# Splash tiles: query and key tiles are multiples of the TPU lane width (128); the largest of
# these that divides a length is the default (512 is the usual TPU sweet spot).
SPLASH_TILES = (512, 256, 128)
# The mesh axes the default rules (`config.MeshConfig.rules`) shard the batch and heads over:
# the shard_map around the kernel splits the same way unless the model passes its run's rules
# (`shard_axes`), so nothing is resharded.
BATCH_AXES = mesh_axes_for("batch", dict(MeshConfig().rules))
HEAD_AXES = mesh_axes_for("heads", dict(MeshConfig().rules))


def lowering_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the current trace is lowered for: that of the mesh in
    context — an AbstractMesh lowered for a platform this machine lacks names it, as
    `compile_check.lower_for_platform` does — else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _gpu_present() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this process
        return False


# ---------------------------------------------------------------------------------------------
# splash (TPU)
# ---------------------------------------------------------------------------------------------

def splash_mask(pattern: MaskPattern, lq: int, lk: int):
    """The splash-attention mask object (Lq, Lk) of a band-free `pattern`: structured masks where
    the library has them (computed in-kernel), else a NumpyMask, whose fully masked tiles the
    kernel's mask info skips and whose partial tiles it loads (deduplicated)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    if pattern.band is not None:
        raise ValueError("a banded pattern has no static splash mask")
    if pattern.kind == "full":
        return sm.FullMask((lq, lk))
    if pattern.kind == "causal":
        return sm.CausalMask((lq, lk))  # q ≥ k with offset 0: queries are the first Lq keys
    q, k = np.arange(lq)[:, None], np.arange(lk)[None, :]
    return sm.NumpyMask(np.asarray(pattern.allowed(q, k, lk, use_band=False, xp=np)))


def splash_block_sizes(lq: int, lk: int):
    """Default `BlockSizes`: for each length the largest of `SPLASH_TILES` dividing it, the same
    tiles for the forward and both backward kernels. Raises ValueError when none divides."""
    from jax.experimental.pallas.ops.tpu.splash_attention import BlockSizes

    def tile(n, name):
        for t in SPLASH_TILES:
            if n % t == 0:
                return t
        raise ValueError(f"splash attention needs the {name} length to be a multiple of "
                         f"{SPLASH_TILES[-1]} (got Lq={lq}, Lk={lk}); use model.attention='xla'")
    bq, bk = tile(lq, "query"), tile(lk, "key")
    return BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                      block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)


@functools.lru_cache(maxsize=64)
def _splash_kernel(kind: str, block_size: int, heads: int, lq: int, lk: int, block_sizes,
                   interpret: bool, context_mesh):
    """The (cached) splash MHA kernel for (H, Lq, Dh) × (H, Lk, Dh): building its mask info walks
    the whole (Lq, Lk) mask in numpy, once per shape rather than once per trace. Built eagerly
    (`ensure_compile_time_eval`): its mask-info arrays must be constants, not tracers of the
    trace (e.g. a shard_map) that first asked for it. Those constants take the type of the mesh
    in context (`context_mesh`, the abstract mesh of the shard_map's manual axes), so it is part
    of the cache key: a kernel built under one mesh fails to trace under another."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = splash_mask(MaskPattern(kind, block_size), lq, lk)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), block_sizes=block_sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _mesh_spec(mesh, batch: int, heads: int,
               shard_axes: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> P | None:
    """The shard_map spec (B, L, H, Dh) under `mesh`, or None when nothing is sharded: the batch
    over those of the batch axes in the mesh (when their product divides B, else replicated),
    the heads likewise over the head axes. shard_axes: (batch axes, head axes); None: the
    default rules' (`BATCH_AXES`, `HEAD_AXES`)."""
    def axes_for(names, size):
        axes = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            return None
        return axes if len(axes) > 1 else axes[0]
    if mesh.empty or mesh.size == 1:
        return None
    batch_axes, head_axes = shard_axes if shard_axes is not None else (BATCH_AXES, HEAD_AXES)
    b, h = axes_for(batch_axes, batch), axes_for(head_axes, heads)
    return None if b is None and h is None else P(b, None, h, None)


def splash_attention(q: Array, k: Array, v: Array, pattern: MaskPattern, *,
                     interpret: bool | None = None, block_sizes=None,
                     shard_axes: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> Array:
    """Attention with the JAX Pallas splash-attention kernel ("SPLASH: sparse flash attention",
    `jax.experimental.pallas.ops.tpu.splash_attention`), forward and its custom-VJP backward.

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh) → (B, Lq, H, Dh) in q's dtype. The pattern becomes a
    static block mask (`splash_mask`), so the kernel skips every fully masked tile. A pattern with
    a band (attention-mask annealing: traced, new every step) cannot be a static mask and runs
    `flash.flash_attention` instead. Lq and Lk must be multiples of 128 (`splash_block_sizes`).
    interpret: run the kernel in the Pallas interpreter (None: iff the trace is not for a TPU,
    `lowering_platform`: tests, and `--compile_only`'s compile on fake CPU devices; a lowering
    for TPU gets the Mosaic kernels, with or without a TPU here). Under a mesh
    (`jax.set_mesh`) with more than one device the kernel runs in a `jax.shard_map` — a Pallas
    call is opaque to GSPMD — with the batch and heads split over shard_axes = (batch axes, head
    axes): the run's mesh rules, which the models pass; None: the default rules'.
    """
    if pattern.band is not None:
        from dlm_jax.models.flash import flash_attention
        return flash_attention(q, k, v, pattern)
    B, lq, H, dh = q.shape
    lk = k.shape[1]
    pattern.stream_length(lk)  # validates the two-pass shape
    if interpret is None:
        interpret = lowering_platform() != "tpu"
    if block_sizes is None:
        block_sizes = splash_block_sizes(lq, lk)

    def run(q, k, v):  # the local shard: (b, Lq, h, Dh)
        kernel = _splash_kernel(pattern.kind, pattern.block_size, q.shape[2], lq, lk,
                                block_sizes, interpret, jax.sharding.get_abstract_mesh())
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's (H, L, Dh) per example
        # The kernel does not scale the scores: scale q (exact for Dh a power of 4).
        qs = (q * (1.0 / math.sqrt(dh))).astype(q.dtype)
        o = jax.vmap(kernel)(heads_first(qs), heads_first(k), heads_first(v))
        return heads_first(o).astype(q.dtype)

    spec = _mesh_spec(jax.sharding.get_abstract_mesh(), B, H, shard_axes)
    if spec is None:
        return run(q, k, v)
    # check_vma=False: the kernel's pallas_call declares no varying-mesh-axis types.
    return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


# ---------------------------------------------------------------------------------------------
# cudnn (GPU)
# ---------------------------------------------------------------------------------------------

def cudnn_plan(pattern: MaskPattern, lq: int, lk: int, dtype, head_dim: int, *,
               max_head_dim: int = 128) -> tuple[str, str]:
    """("cudnn", mask type) when NVIDIA cuDNN fused attention computes `pattern` natively, else
    ("xla", why) for the flash fallback; see the module docstring for the reasons. max_head_dim:
    128, or 256 on Hopper and later GPUs."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla", f"cuDNN fused attention takes fp16/bf16, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > max_head_dim:
        return "xla", f"head dim {head_dim} is not a multiple of 8 ≤ {max_head_dim}"
    if pattern.band is not None:
        return "xla", "a traced band is no cuDNN mask type"
    if pattern.kind == "full":
        return "cudnn", "no mask"
    if pattern.kind == "causal":
        if lq != lk:
            return "xla", f"causal with Lq={lq} ≠ Lk={lk}"
        return "cudnn", "causal"
    return "xla", f"{pattern.kind} is no cuDNN mask type (only a dense bias could express it)"


def _max_head_dim() -> int:
    """256 on a Hopper (compute capability 9.0) or later GPU, else 128."""
    cap = getattr(jax.devices()[0], "compute_capability", None)
    return 256 if cap is not None and float(cap) >= 9.0 else 128


def cudnn_attention(q: Array, k: Array, v: Array, pattern: MaskPattern) -> Array:
    """Attention with NVIDIA cuDNN fused attention (`jax.nn.dot_product_attention(...,
    implementation="cudnn")`) where `cudnn_plan` allows it, else `flash.flash_attention`.
    Also the flash attention where the trace is not for a GPU present here (`--compile_only`
    for a GPU target on a CPU machine: JAX lowers cuDNN attention only where it finds cuDNN).

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh) → (B, Lq, H, Dh) in q's dtype. The cuDNN custom call
    carries its own sharding rule (batch and heads), so no shard_map is needed.
    """
    plan, _ = cudnn_plan(pattern, q.shape[1], k.shape[1], q.dtype, q.shape[-1],
                         max_head_dim=_max_head_dim())
    if plan == "xla" or lowering_platform() != "gpu" or not _gpu_present():
        from dlm_jax.models.flash import flash_attention
        return flash_attention(q, k, v, pattern)
    o = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                     scale=1.0 / math.sqrt(q.shape[-1]),
                                     is_causal=pattern.kind == "causal", implementation="cudnn")
    return o.astype(q.dtype)
