"""Training objectives. Every loss returns `(per_token_values, aux_dict_of_scalars)`; the caller
reduces (sum over positions, mean over the batch, divide by accumulation steps).

  * `ar_nll`: next-token NLL (logits at i predict token i + 1).
  * `subs_log_probs`, `masked_nelbo`, `mdlm_loss`: MDLM / BD3-LM continuous-time masked NELBO.
  * `score_entropy`: SEDD denoising score entropy for any forward process.
"""
from dlm_jax.objectives.ar import ar_nll
from dlm_jax.objectives.nelbo import (NEG_INF, masked_nelbo, mdlm_loss, per_token_time,
                                      subs_log_probs)
from dlm_jax.objectives.score_entropy import (bregman, log_expm1, scale_by_sigma_offset,
                                              score_entropy, true_log_ratios)

__all__ = [
    "NEG_INF", "ar_nll", "bregman", "log_expm1", "masked_nelbo", "mdlm_loss", "per_token_time",
    "scale_by_sigma_offset", "score_entropy", "subs_log_probs", "true_log_ratios",
]
