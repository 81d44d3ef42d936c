"""Validation loss: the method's evaluation objective averaged over fixed validation batches.

For likelihood bounds (every method but CSM) `val/loss` is the NELBO (or AR NLL) in nats/token,
estimated with unclipped times; `val/ppl` is its exponential and `val/bpb` the same in bits per
byte for byte-level text. Any other scalar the method reports at evaluation becomes `val/<name>`.
"""
from __future__ import annotations

import math

import jax
import numpy as np


class Validation:
    """`batches` eval steps of `eval_step(params, batch, index)` (keys fold_in(seed + 1, index))."""

    name = "validation"

    def __init__(self, exp, eval_step, batches: int):
        self.exp, self.eval_step, self.batches = exp, eval_step, batches
        data = exp.cfg.data
        from dlm_jax.data.pipeline import TOKEN_SOURCES
        self.bits_per_byte = data.source not in TOKEN_SOURCES and data.tokenizer == "byte"

    def __call__(self, params, batches) -> tuple[dict, dict]:
        with jax.set_mesh(self.exp.mesh):
            rows = [self.eval_step(params, next(batches), i) for i in range(self.batches)]
        means = {k: float(np.mean(jax.device_get([r[k] for r in rows]))) for k in rows[0]}
        nats = means.pop("loss")
        out = {"val/loss": nats}
        if self.exp.method.likelihood_bound:
            out["val/ppl"] = float(math.exp(min(nats, 50.0)))
            if self.bits_per_byte:
                out["val/bpb"] = nats / math.log(2.0)
        out.update({f"val/{k}": v for k, v in means.items()})
        return out, {}
