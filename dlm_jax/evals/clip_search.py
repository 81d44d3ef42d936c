"""BD3-LM's clip search (Arriola et al., 2025, §5): choose the training time interval [β_l, β_u]
that minimises the variance of the per-block NELBO estimate on validation batches.

Candidates: (eps, 1) and, per width w, the intervals (i·δ, i·δ + w) on a δ grid; for block size
1 {(eps, 1), (1, 1)} (the latter trains exactly an AR model). One jitted function scores every
candidate (the bounds are traced: one compile), and the winner becomes the run's `clip` state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def clip_candidates(block_size: int, eps: float, widths, delta: float
                    ) -> list[tuple[float, float]]:
    """The candidate intervals, (eps, 1) first."""
    if block_size == 1:
        return [(eps, 1.0), (1.0, 1.0)]
    out = [(eps, 1.0)]
    for w in widths:
        n = int(round((1.0 - w) / delta))
        for i in range(n + 1):  # integer grid: no float-arange endpoint surprises
            lo = i * delta
            out.append((max(round(lo, 6), eps), max(round(lo + w, 6), eps)))
    return out


class ClipSearch:
    """Scores each candidate by Σ over `batches` validation batches of Var(per-block NELBO)."""

    name = "clip_search"

    def __init__(self, exp, batches: int):
        cfg, method = exp.cfg, exp.method
        self.exp, self.batches = exp, batches
        self.candidates = clip_candidates(method.block_size, cfg.diffusion.sampling_eps,
                                          cfg.diffusion.clip_search_widths,
                                          cfg.diffusion.clip_search_delta)
        seed = cfg.train.seed

        def block_nelbo(params, batch, bounds, index):
            key = jax.random.fold_in(jax.random.key(seed + 2), index)
            return jnp.var(method.block_nelbo(nnx.merge(exp.graphdef, params), batch["tokens"],
                                              key, (bounds[0], bounds[1])))

        self.score = jax.jit(block_nelbo, in_shardings=(exp.param_shardings, exp.batch_sharding,
                                                        None, None))

    def __call__(self, params, batches) -> tuple[dict, dict]:
        data = [next(batches) for _ in range(self.batches)]
        with jax.set_mesh(self.exp.mesh):
            scores = [jnp.sum(jnp.stack([self.score(params, b, jnp.asarray(c, jnp.float32), j)
                                         for j, b in enumerate(data)]))
                      for c in self.candidates]
        scores = np.asarray(jax.device_get(scores))
        best = int(np.argmin(scores))
        lo, hi = self.candidates[best]
        metrics = {"clip/beta_l": lo, "clip/beta_u": hi,
                   "clip/var": float(scores[best]) / len(data)}
        return metrics, {"clip": jnp.asarray((lo, hi), jnp.float32)}
