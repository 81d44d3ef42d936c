"""Generative evaluation: perplexity of samples under an AR judge, and their unigram entropy.

Generative perplexity (as in SEDD, MDLM and BD3-LM, which use GPT-2 Large as the judge):
exp(Σ NLL / Σ scored tokens) of the samples' tokens under an autoregressive model. Each sample
is re-tokenized with the judge's tokenizer from its text (its token ids directly when both use
the same tokenizer, or there is none), preceded by the judge's document-boundary token so every
token is scored, and scored in windows of the judge's context with stride context/2 (each window scores only the
tokens the previous one did not; the BD3-LM protocol). EOS tokens are not scored. Reported
beside it: the mean per-sample unigram entropy in nats, since repetitive text fools the
perplexity (low PPL, low entropy).

Shapes: W windows, C judge context.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.generation import document_boundary


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of one sample's token histogram (0 for an empty sample)."""
    if len(tokens) == 0:
        return 0.0
    _, counts = np.unique(np.asarray(tokens), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def score_windows(ids: Sequence[int], context: int, stride: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Windows over one token sequence: (tokens (W, C) int32, weights (W, C) float32), where
    weights[w, j] = 1 when the token at j+1 of window w is scored there (by the logits at j).

    Window w starts at w·stride; the first scores every target in it, later ones only targets
    past the previous window's end. Short windows are padded (weight 0).
    """
    stride = stride or max(context // 2, 1)
    n = len(ids)
    starts = [0]
    while starts[-1] + context < n:
        starts.append(starts[-1] + stride)
    toks = np.zeros((len(starts), context), np.int32)
    weights = np.zeros((len(starts), context), np.float32)
    scored_until = 1  # position of the next unscored target
    for w, s in enumerate(starts):
        chunk = ids[s:s + context]
        toks[w, :len(chunk)] = chunk
        for j in range(len(chunk) - 1):
            if s + j + 1 >= scored_until:
                weights[w, j] = 1.0
        scored_until = max(scored_until, s + len(chunk))
    return toks, weights


def generative_perplexity(judge, params, samples: Sequence[dict], *, batch: int = 8,
                          same_tokenizer: bool = False) -> dict:
    """Generative perplexity and entropy of `samples` (rows with "text" and "tokens") under the
    AR `judge` (an Experiment) with parameters `params`. same_tokenizer: the samples' token ids
    are the judge's (no re-tokenization of the text).

    Returns {"gen_ppl": token-weighted, "gen_ppl_mean": mean of per-sample PPLs, "entropy":
    mean unigram entropy (nats) of the re-tokenized samples, "scored_tokens"}.
    """
    if not judge.method.causal:
        raise ValueError(f"the judge must be an AR run, got method {judge.method.name!r}")
    tok, context = judge.tokenizer, judge.cfg.data.seq_len
    boundary = document_boundary(judge)
    eos = None if tok is None else tok.eos_id
    model_fn = jax.jit(lambda p, x: jax.nn.log_softmax(judge.model(p)(x, None), axis=-1))
    per_sample, entropies = [], []
    for row in samples:
        retokenize = tok is not None and row.get("text") is not None and not same_tokenizer
        ids = list(tok.encode(row["text"])) if retokenize else list(row["tokens"])
        entropies.append(unigram_entropy(ids))
        toks, weights = score_windows([boundary] + ids, context)
        targets = np.concatenate([toks[:, 1:], np.zeros((len(toks), 1), np.int32)], 1)
        if eos is not None:
            weights = weights * (targets != eos)
        nll, count = 0.0, 0.0
        for i in range(0, len(toks), batch):
            x = np.zeros((batch, context), np.int32)
            x[:len(toks[i:i + batch])] = toks[i:i + batch]
            lp = np.asarray(model_fn(params, jnp.asarray(x)))[:len(toks[i:i + batch])]
            picked = np.take_along_axis(lp, targets[i:i + batch, :, None], -1)[..., 0]
            nll -= float((picked * weights[i:i + batch]).sum())
            count += float(weights[i:i + batch].sum())
        per_sample.append((nll, count))
    total_nll = sum(n for n, _ in per_sample)
    total = sum(c for _, c in per_sample)
    return {"gen_ppl": math.exp(total_nll / max(total, 1.0)),
            "gen_ppl_mean": float(np.mean([math.exp(n / max(c, 1.0)) for n, c in per_sample])),
            "entropy": float(np.mean(entropies)), "scored_tokens": int(total)}
