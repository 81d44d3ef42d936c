"""Sampling from trained runs: `dlm_jax.generation`, the `dlm_jax.sample` CLI, generative
perplexity (`evals.generative`) and their errors."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.config import ConfigError
from dlm_jax.evals import restore_run
from dlm_jax.evals.generative import generative_perplexity, score_windows, unigram_entropy
from dlm_jax.generation import generate_samples, sample_run
from dlm_jax.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, family):
    cfg = tiny.get_config(family)
    cfg.data.source, cfg.data.max_bytes = "stdlib", 200_000
    cfg.train.steps, cfg.train.eval_every, cfg.train.ckpt_every = 4, 4, 4
    cfg.mesh.shape = (1, 1, 1)
    trainer = Trainer(cfg, str(workdir), measure_mfu=False)
    trainer.run()
    trainer.close()
    return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {f: _train(tmp_path_factory.mktemp(f.split(",")[0]), f) for f in ("bd3lm,block=8", "ar")}


def test_sample_cli(runs):
    out = subprocess.run(
        [sys.executable, "-m", "dlm_jax.sample", "--workdir", runs["bd3lm,block=8"],
         "--num_samples", "3", "--prompt", "def ", "--length", "64",
         "--config.sampling.batch_size=2", "--config.sampling.top_p=0.9"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("--- sample") == 3 and "tok/s" in out.stdout
    rows = [json.loads(x) for x in open(os.path.join(runs["bd3lm,block=8"],
                                                     "samples_step4.jsonl"))]
    assert [r["sample"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["text"].startswith("def ") and len(r["tokens"]) == r["length"] == 64
        assert r["settings"]["top_p"] == 0.9 and r["nfe_per_batch"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "dlm_jax.sample", "--workdir", runs["bd3lm,block=8"],
         "--config.sampling.top_q=0.9"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: config.sampling.top_q is not a known key; did you mean config.sampling.top_p?"]


def _set(**fields):
    def edit(cfg):
        for k, v in fields.items():
            setattr(cfg.sampling, k, v)
    return edit


def test_samples_do_not_depend_on_the_batch_size(runs):
    exp, _, _, state = restore_run(runs["ar"])
    one, _ = generate_samples(exp, state.params, dataclasses.replace(
        exp.cfg.sampling, num_samples=3, batch_size=1, length=24))
    three, summary = generate_samples(exp, state.params, dataclasses.replace(
        exp.cfg.sampling, num_samples=3, batch_size=3, length=24))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in three]
    assert summary["sampler"] == "ar" and summary["nfe_per_batch"] == 23


def test_ar_jacobi_sampler_draws_what_the_ar_sampler_draws(runs):
    """`sampler=jacobi` (whole length, and windows through the KV cache) gives the AR sampler's
    samples token for token, in fewer network calls when the fixed point comes early."""
    exp, _, _, state = restore_run(runs["ar"])
    base = dataclasses.replace(exp.cfg.sampling, num_samples=3, batch_size=3, length=32)
    ar, _ = generate_samples(exp, state.params, base)
    for window in (0, 8):
        jac, summary = generate_samples(exp, state.params, dataclasses.replace(
            base, sampler="jacobi", window=window))
        assert [r["tokens"] for r in jac] == [r["tokens"] for r in ar], window
        assert summary["sampler"] == "jacobi" and summary["nfe_per_batch"] <= 31 + 4


@pytest.mark.parametrize("sampler", ["speculative", "mh"])
def test_ar_samplers_with_a_diffusion_drafter(runs, sampler):
    """`sampler=speculative | mh --drafter RUN`: the AR run's exact samplers driven by a
    masked-diffusion run over the same bytes (the BD3-LM run here) end to end."""
    exp, _, _, state = restore_run(runs["ar"])
    rows, summary = generate_samples(exp, state.params, dataclasses.replace(
        exp.cfg.sampling, sampler=sampler, drafter=runs["bd3lm,block=8"], num_samples=2,
        batch_size=2, length=24, steps=8 if sampler == "mh" else 2, draft_tokens=4))
    tokens = np.asarray([r["tokens"] for r in rows])
    assert tokens.shape == (2, 24) and tokens.min() >= 0 and tokens.max() < exp.token_vocab
    assert 0.0 <= summary["acceptance"] <= 1.0 and summary["draft_nfe"] >= 1
    assert summary["nfe_per_batch"] == (9 if sampler == "mh" else summary["nfe_per_batch"])
    with pytest.raises(ConfigError, match="needs a drafter: --drafter DIR"):
        generate_samples(exp, state.params, dataclasses.replace(exp.cfg.sampling,
                                                                sampler=sampler))
    with pytest.raises(ConfigError, match="the drafter must be a masked-diffusion run"):
        generate_samples(exp, state.params, dataclasses.replace(
            exp.cfg.sampling, sampler=sampler, drafter=runs["ar"]))


def test_drafted_samplers_follow_the_truncated_target(runs):
    """speculative / mh draw from the AR model under temperature / top-k: with top_k=1 the target
    is the greedy sequence, which speculative decoding must return token for token."""
    exp, _, _, state = restore_run(runs["ar"])
    base = dataclasses.replace(exp.cfg.sampling, num_samples=2, batch_size=2, length=24,
                               top_k=1)
    greedy, _ = generate_samples(exp, state.params, dataclasses.replace(base, sampler="ar"))
    spec, _ = generate_samples(exp, state.params, dataclasses.replace(
        base, sampler="speculative", drafter=runs["bd3lm,block=8"], steps=2, draft_tokens=4))
    assert [r["tokens"] for r in spec] == [r["tokens"] for r in greedy]
    with pytest.raises(ConfigError, match="temperature=0 .* use sampler 'ar' or 'jacobi'"):
        generate_samples(exp, state.params, dataclasses.replace(
            base, sampler="mh", drafter=runs["bd3lm,block=8"], temperature=0.0))


@pytest.mark.parametrize("run,edit,message", [
    ("bd3lm,block=8", _set(sampler="gibbs"), "sampler='gibbs' does not fit bd3lm"),
    ("ar", _set(sampler="first_hitting"), "does not fit the AR family"),
    ("ar", _set(sampler="jacobi", window=5), "window=5 must divide the length"),
    ("bd3lm,block=8", _set(length=30), "length=30 must be a multiple of the block size 8"),
    ("bd3lm,block=8", _set(length=8), "prompt has 12 tokens, more than the sample length 8"),
])
def test_sampling_errors(runs, run, edit, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        sample_run(runs[run], prompt="import numpy", overrides=edit,
                   out=str(tmp_path / "x.jsonl"))
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_score_windows_score_every_target_once():
    ids = list(range(1, 12))                       # 11 tokens, 10 targets
    toks, weights = score_windows(ids, context=4)
    scored = [s + j + 1 for w, s in enumerate(range(0, 12, 2)[:len(toks)])
              for j in range(4) if weights[w, j]]
    assert sorted(scored) == list(range(1, 11))
    for w, s in enumerate(range(0, 12, 2)[:len(toks)]):
        chunk = ids[s:s + 4]
        np.testing.assert_array_equal(toks[w, :len(chunk)], chunk)


def test_generative_perplexity_equals_the_direct_nll(runs):
    """Samples that fit the judge's context: one window, so the perplexity is exactly the NLL of
    [EOS] + sample under one causal forward; EOS targets are not scored."""
    judge, _, _, state = restore_run(runs["ar"])
    C, eos = judge.cfg.data.seq_len, judge.tokenizer.eos_id
    rng = np.random.default_rng(0)
    rows = [{"text": None, "tokens": rng.integers(0, 256, n).tolist()} for n in (12, C - 1)]
    rows[0]["tokens"][5] = eos
    got = generative_perplexity(judge, state.params, rows, same_tokenizer=True)
    model = judge.model(state.params)
    nll, count = 0.0, 0
    for row in rows:
        x = jnp.asarray([[eos] + row["tokens"]])
        lp = np.asarray(jax.nn.log_softmax(model(x, None)[0], -1))
        for i, t in enumerate(row["tokens"]):
            if t != eos:
                nll, count = nll - float(lp[i, t]), count + 1
    assert got["scored_tokens"] == count == 12 + C - 2
    np.testing.assert_allclose(np.log(got["gen_ppl"]), nll / count, rtol=1e-5)
    assert got["entropy"] == pytest.approx(np.mean([unigram_entropy(r["tokens"]) for r in rows]))
    with pytest.raises(ValueError, match="the judge must be an AR run"):
        generative_perplexity(restore_run(runs["bd3lm,block=8"])[0], state.params, rows)


@pytest.mark.parametrize("family,sampler", [("mdlm", "ancestral"), ("mdlm", "first_hitting"),
                                            ("mdlm", "margin"), ("d3pm", "auto"),
                                            ("bd3lm,block=8", "first_hitting"),
                                            ("sedd", "auto"), ("sedd,process=uniform", "euler"),
                                            ("ctmc", "pc"),
                                            ("sedd,block=8,process=uniform", "auto")])
def test_every_family_samples(family, sampler):
    """Fresh parameters, the family's samplers through `generate_samples`: every position is a
    real token, the prompt is kept (where the family takes one), batch-independent rows."""
    from flax import nnx

    from dlm_jax import registry
    cfg = tiny.get_config(family)
    cfg.data.source = "stdlib"
    cfg.diffusion.d3pm_steps = min(cfg.diffusion.d3pm_steps, 50)
    cfg.mesh.shape = (1, 1, 1)
    exp = registry.build(cfg)
    params = nnx.to_pure_dict(nnx.split(exp.new_model(0))[1])
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          params)                                    # not the zero init
    prompt = None if family == "d3pm" else "def "
    sampling = dataclasses.replace(cfg.sampling, sampler=sampler, num_samples=3, batch_size=3,
                                   steps=8)
    rows, summary = generate_samples(exp, params, sampling, prompt)
    alone, _ = generate_samples(exp, params, dataclasses.replace(sampling, batch_size=1), prompt)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in alone]
    for r in rows:
        assert len(r["tokens"]) == cfg.data.seq_len and max(r["tokens"]) < exp.token_vocab
        assert prompt is None or r["text"].startswith(prompt)
    assert summary["nfe_per_batch"] > 0


def test_evaluate_with_samples_reports_generative_metrics(runs):
    from dlm_jax.evaluate import evaluate_run
    before = sorted(os.listdir(runs["bd3lm,block=8"]))
    out = evaluate_run(runs["bd3lm,block=8"], batches=1, samples=2, evaluator=runs["ar"])
    assert out["gen/samples"] == 2 and out["gen/sampler"] == "ancestral"
    assert 1.0 < out["gen/gen_ppl"] < 1e4 and 0.0 < out["gen/entropy"] < np.log(258)
    assert out["gen/scored_tokens"] > 0 and out["gen/nfe_per_batch"] > 0 and "val/loss" in out
    assert sorted(os.listdir(runs["bd3lm,block=8"])) == before        # writes nothing
    with pytest.raises(ValueError, match="the judge must be an AR run"):
        evaluate_run(runs["ar"], batches=1, samples=1, evaluator=runs["bd3lm,block=8"])
