"""Neural networks: the DiT-style backbone (SEDD / MDLM / BD3-LM), its AR variant, GPT-2 (an AR
drop-in), the KV cache and the PyTorch checkpoint importer. Nothing here knows about objectives:
turning raw outputs into log-probabilities or log-scores is the `methods/` layer's job.

Shapes: B batch, L length, V vocabulary (with the mask token), D width, H heads, Dh head width.
"""
from dlm_jax.models.cache import KVCache
from dlm_jax.models.transformer import (MODEL_SIZES, DiT, DiTBlock, FinalLayer, ModelSize,
                                        build_model, model_dims)
from dlm_jax.models.gpt2 import GPT2, gpt2_from_state_dict, gpt2_to_state_dict

__all__ = ["DiT", "DiTBlock", "FinalLayer", "GPT2", "KVCache", "MODEL_SIZES", "ModelSize",
           "build_model", "gpt2_from_state_dict", "gpt2_to_state_dict", "model_dims"]
