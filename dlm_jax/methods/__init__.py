"""Families as `Method`s: the only code that knows what a family is (see `methods.base`).

  Autoregressive          ar.py      causal transformer, next-token NLL
  Masked                  masked.py  MDLM (one block) and BD3-LM (blocks), SUBS + masked NELBO
  ScoreEntropy            sedd.py    SEDD score entropy over any process and block size
  DiscreteTime            d3pm.py    D3PM, x0-parameterised, VLB + λ·CE
  ContinuousTimeELBO      ctmc.py    the continuous-time framework's bound (x0 reverse rate)
  ConcreteScoreMatching   csm.py     concrete score matching over Hamming neighbours
"""
from dlm_jax.methods.ar import Autoregressive
from dlm_jax.methods.base import ContinuousTime, Denoiser, Method
from dlm_jax.methods.csm import ConcreteScoreMatching
from dlm_jax.methods.ctmc import ContinuousTimeELBO
from dlm_jax.methods.d3pm import DiscreteTime
from dlm_jax.methods.masked import Masked
from dlm_jax.methods.sedd import ScoreEntropy, sedd_log_score

__all__ = ["Autoregressive", "ConcreteScoreMatching", "ContinuousTime", "ContinuousTimeELBO",
           "Denoiser", "DiscreteTime", "Masked", "Method", "ScoreEntropy", "sedd_log_score"]
