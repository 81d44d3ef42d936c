"""Validation loss: the method's evaluation objective over validation sequences, with its error.

For likelihood bounds (every method but CSM) `val/loss` is the NELBO (or AR NLL) in nats/token,
estimated with unclipped times; `val/ppl` is its exponential and `val/bpb` the same in bits per
byte for byte-level text. Any other scalar the method reports at evaluation becomes `val/<name>`.

The estimate and its standard error. Sequence j contributes y_j, the sum of its per-token
objective (averaged over its `t_samples` time draws, `Method.sequence_loss`), over c_j real
tokens; the estimate is the ratio R̂ = Σ y_j / Σ c_j (the token-weighted mean, nats/token) and
its standard error the ratio estimator's (delta method; Cochran, 1977, "Sampling Techniques",
§6.4):  SE² = n/(n − 1) · Σ_j (y_j − R̂ c_j)² / (Σ_j c_j)²,  which for equal lengths is the
sample standard deviation of the per-sequence means over √n. It counts every source of spread
at once (the sequences, their times and their x_t draws). With `times="iid"` or `"quadrature"`
the sequences' draws are independent, so it is the honest error of R̂; with `"stratified"`
(times stratified across each batch) the draws are negatively correlated and the same formula
over-states the error (stratification only removes variance): an upper bound.

Metrics: `val/loss`, `val/loss_se`, `val/sequences` (n), `val/t_samples` (time draws per
sequence; 0 for a method whose evaluation draws none, e.g. AR), `val/bpb_se` beside `val/bpb`,
and with the synthetic Markov source `val/source_entropy`, the exact entropy per token of one
segment, H(X_1..X_L) / L (`MarkovChain.sequence_entropy`): the loss a perfect model reaches.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MOMENT_KEYS = ("seq_n", "seq_sum", "seq_tokens", "seq_tokens_sq", "seq_resid_sq",
               "seq_resid_tokens")


def batch_moments(sums: jax.Array, tokens: jax.Array) -> dict:
    """What validation needs of one batch, as scalars: sums y (B,) and token counts c (B,) of its
    sequences → "mean" r = Σy / Σc and `MOMENT_KEYS`: the count of sequences with tokens, Σy, Σc,
    Σc², Σ(y − r c)² and Σ(y − r c)·c (residuals about the batch's own ratio, so that combining
    batches in float64 on the host (`combine_moments`) loses no precision)."""
    sums = sums.astype(jnp.float32)
    tokens = tokens.astype(jnp.float32)
    total_c = tokens.sum()
    r = sums.sum() / jnp.maximum(total_c, 1.0)
    resid = sums - r * tokens
    return {"mean": r, "seq_n": (tokens > 0).sum().astype(jnp.float32), "seq_sum": sums.sum(),
            "seq_tokens": total_c, "seq_tokens_sq": (tokens * tokens).sum(),
            "seq_resid_sq": (resid * resid).sum(), "seq_resid_tokens": (resid * tokens).sum()}


def combine_moments(rows) -> tuple[float, float, int]:
    """(R̂, SE, n) of the batches' `batch_moments` (host values): the ratio estimate over all
    their sequences and its standard error (module docstring). SE is nan for n < 2."""
    get = lambda k: np.asarray([r[k] for r in rows], np.float64)  # noqa: E731
    n = int(get("seq_n").sum())
    y, c = get("seq_sum"), get("seq_tokens")
    ratio = float(y.sum() / max(c.sum(), 1.0))
    r_b = y / np.maximum(c, 1.0)
    d = r_b - ratio
    resid_sq = (get("seq_resid_sq") + 2 * d * get("seq_resid_tokens")
                + d * d * get("seq_tokens_sq")).sum()
    if n < 2:
        return ratio, float("nan"), n
    se = math.sqrt(max(resid_sq, 0.0) * n / (n - 1)) / max(c.sum(), 1.0)
    return ratio, se, n


def source_entropy(data) -> float | None:
    """Exact entropy per token (nats) of one validation segment of the Markov source
    (H(X_1..X_L) / L of the stationary chain), None for other sources."""
    if data.source != "markov":
        return None
    from dlm_jax.data.pipeline import markov_chain
    chain = markov_chain(data.markov_vocab, data.markov_order, data.markov_seed,
                         data.markov_concentration)
    return chain.sequence_entropy(data.seq_len) / data.seq_len


def format_metrics(metrics: dict) -> str:
    """One line of evaluation metrics: `val/loss 0.669 ± 0.004 (4096 seq × 1 t) | val/ppl 1.952
    | …`; a metric with a `_se` twin is printed with it."""
    parts = []
    skip = {"val/sequences", "val/t_samples"}
    for k, v in metrics.items():
        if k in skip or k.endswith("_se"):
            continue
        if not isinstance(v, (int, float)):
            parts.append(f"{k} {v}")
            continue
        text = f"{k} {v:.4g}"
        se = metrics.get(k + "_se")
        if se is not None:
            text += f" ± {se:.2g}" if math.isfinite(se) else " ± ?"
        if k == "val/loss" and "val/sequences" in metrics:
            t = int(metrics.get("val/t_samples", 0))
            text += f" ({int(metrics['val/sequences'])} seq" + (f" × {t} t)" if t else ")")
        parts.append(text)
    return " | ".join(parts)


class Validation:
    """`batches` eval steps of `eval_step(params, batch, index)` (keys fold_in(seed + 1, index)).

    With `target_se` (evaluate's sizing): the `batches` first (a pilot), then as many more as
    make the standard error about `target_se` (nats/token), estimated from the pilot's
    per-sequence spread (a two-stage design; Stein, 1945), at most `max_batches` in all; an
    exhausted (non-repeating) iterator ends it early.
    """

    name = "validation"

    def __init__(self, exp, eval_step, batches: int, *, target_se: float | None = None,
                 max_batches: int | None = None):
        self.exp, self.eval_step, self.batches = exp, eval_step, batches
        self.target_se, self.max_batches = target_se, max_batches or batches
        data = exp.cfg.data
        from dlm_jax.data.pipeline import TOKEN_SOURCES
        self.bits_per_byte = data.source not in TOKEN_SOURCES and data.tokenizer == "byte"
        self.source_entropy = source_entropy(data)
        t = exp.cfg.train
        self.t_samples = t.eval_t_samples if exp.method.time_schemes else 0
        self.exhausted = False

    def _run(self, params, batches, start: int, stop: int) -> list:
        rows = []
        with jax.set_mesh(self.exp.mesh):
            for i in range(start, stop):
                try:
                    batch = next(batches)
                except StopIteration:
                    self.exhausted = True
                    break
                rows.append(self.eval_step(params, batch, i))
        return jax.device_get(rows)

    def __call__(self, params, batches) -> tuple[dict, dict]:
        self.exhausted = False
        rows = self._run(params, batches, 0, self.batches)
        if not rows:
            raise ValueError("validation has no batches: the validation split is empty")
        if self.target_se and not self.exhausted and self.max_batches > len(rows):
            _, se, n = combine_moments(rows)
            if math.isfinite(se) and se > self.target_se:
                per_batch = n / len(rows)
                want = math.ceil(n * (se / self.target_se) ** 2 / per_batch)
                rows += self._run(params, batches, len(rows), min(want, self.max_batches))
        nats, se, n = combine_moments(rows)
        out = {"val/loss": nats, "val/loss_se": se, "val/sequences": n,
               "val/t_samples": self.t_samples}
        if self.exp.method.likelihood_bound:
            out["val/ppl"] = float(math.exp(min(nats, 50.0)))
            if self.bits_per_byte:
                out["val/bpb"] = nats / math.log(2.0)
                out["val/bpb_se"] = se / math.log(2.0)
        if self.source_entropy is not None:
            out["val/source_entropy"] = self.source_entropy
        others = [k for k in rows[0] if k not in MOMENT_KEYS and k not in ("loss", "mean")]
        out.update({f"val/{k}": float(np.mean([r[k] for r in rows])) for k in others})
        return out, {}
