"""Neural networks: the DiT-style backbone (SEDD / MDLM / BD3-LM), its AR variant, the KV cache,
output heads and the PyTorch checkpoint importer.

Shapes: B batch, L length, V vocabulary (with the mask token), D width, H heads, Dh head width.
"""
from dlm_jax.models.cache import KVCache
from dlm_jax.models.heads import log_expm1, sedd_log_score
from dlm_jax.models.transformer import MODEL_SIZES, DiT, DiTBlock, FinalLayer, ModelSize

__all__ = ["DiT", "DiTBlock", "FinalLayer", "KVCache", "MODEL_SIZES", "ModelSize", "log_expm1",
           "sedd_log_score"]
