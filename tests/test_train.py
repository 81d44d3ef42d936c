"""The trainer end to end on tiny configs: every family learns, sharding and resuming are exact."""
import json
import math
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.cli import cpu_xla_flags
from dlm_jax.config import ConfigError, validate
from dlm_jax.data.pipeline import markov_chain
from dlm_jax.evaluate import evaluate_run
from dlm_jax.trainer import NonFiniteLossError, Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(arg="mdlm", **train):
    cfg = tiny.get_config(arg)
    cfg.mesh.shape = (1, 1, 1)
    if arg == "csm":  # the exact estimator runs the model at all L·(V−1) neighbours: run-bound
        cfg.train.batch_size = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _fixed_batch(cfg, seed=0):
    chain = markov_chain(cfg.data.markov_vocab, cfg.data.markov_order, cfg.data.markov_seed)
    return {"tokens": chain.sample(cfg.train.batch_size, cfg.data.seq_len, seed).astype(np.int32)}


FAMILIES = ["ar", "mdlm", "bd3lm,block=8", "sedd", "sedd,process=uniform", "d3pm",
            # a combination no paper ran: block diffusion with score entropy over a uniform process
            "sedd,process=uniform,block=8",
            "ctmc", "ctmc,process=uniform", "csm"]


@pytest.mark.parametrize("arg", FAMILIES)
def test_family_learns_a_fixed_batch(arg, tmp_path):
    cfg = _cfg(arg)
    cfg.optim.warmup_steps = 1
    trainer = Trainer(cfg, str(tmp_path), devices=jax.devices()[:1], measure_mfu=False)
    state = trainer.init_state()
    batch = _fixed_batch(cfg)

    def fixed_loss(params):  # same times and noise every call: a deterministic comparison
        with jax.set_mesh(trainer.exp.mesh):
            batch_global = {k: jax.device_put(v, trainer.exp.batch_sharding) for k, v in batch.items()}
            return float(trainer.program.eval_step(params, batch_global, 0)["loss"])

    before = fixed_loss(state.params)
    losses = []
    for _ in range(20):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    after = fixed_loss(state.params)
    assert all(math.isfinite(x) for x in losses + [before, after]), losses
    assert after < 0.95 * before, (before, after, losses)
    trainer.close()


def _loss_and_grads(trainer, state, batch):
    def f(params):
        model = trainer.exp.model(params)
        return trainer.exp.method.loss(model, batch, jax.random.key(7), train=True,
                                       clip=state.clip)[0]

    with jax.set_mesh(trainer.exp.mesh):
        batch = {k: jax.device_put(v, trainer.exp.batch_sharding) for k, v in batch.items()}
        return jax.jit(jax.value_and_grad(f))(state.params)


@pytest.mark.parametrize("arg", ["bd3lm,block=8"])
def test_sharded_step_equals_single_device(arg, tmp_path):
    cfg = _cfg(arg)
    single = Trainer(cfg, str(tmp_path / "a"), devices=jax.devices()[:1], measure_mfu=False)
    cfg8 = _cfg(arg)
    cfg8.mesh.shape = (2, 2, 2)
    sharded = Trainer(cfg8, str(tmp_path / "b"), devices=jax.devices()[:8], measure_mfu=False)
    s1, s8 = single.init_state(), sharded.init_state()
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(s8.params)), "no parameter is sharded on the 2x2x2 mesh"
    batch = _fixed_batch(cfg)
    l1, g1 = _loss_and_grads(single, s1, batch)
    l8, g8 = _loss_and_grads(sharded, s8, batch)
    np.testing.assert_allclose(float(l1), float(l8), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(g1), jax.device_get(g8), atol=1e-5, rtol=1e-5)
    # The full train step (optimizer, EMA) agrees too.
    n1, m1 = single.train_step(s1, batch)
    n8, m8 = sharded.train_step(s8, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(n1.params), jax.device_get(n8.params), atol=1e-5)
    single.close()
    sharded.close()


def test_resumed_run_equals_uninterrupted(tmp_path):
    kw = dict(steps=8, log_every=4, eval_every=8, ckpt_every=4, eval_batches=1)
    full = Trainer(_cfg("bd3lm,block=8", **kw), str(tmp_path / "full"), measure_mfu=False)
    full.run()

    first = Trainer(_cfg("bd3lm,block=8", **{**kw, "steps": 4}), str(tmp_path / "resumed"),
                    measure_mfu=False)
    first.run()
    first.close()
    second = Trainer(_cfg("bd3lm,block=8", **kw), str(tmp_path / "resumed"), measure_mfu=False)
    summary = second.run()
    assert summary["start_step"] == 4
    # The evaluation CLI's function restores the same run and reproduces its final validation
    # (with the trainer's batch count; by default it sizes the evaluation to a standard error).
    np.testing.assert_allclose(evaluate_run(str(tmp_path / "resumed"), batches=1)["val/loss"],
                               summary["val/loss"], rtol=1e-6)
    chex.assert_trees_all_equal(jax.device_get(full.state.params),
                                jax.device_get(second.state.params))
    # The data iterators of both runs continue with the same batch.
    it_full = full.train_iterator()
    full.restore_or_init(it_full)
    it_resumed = second.train_iterator()
    second.restore_or_init(it_resumed)
    np.testing.assert_array_equal(next(it_full)["tokens"], next(it_resumed)["tokens"])
    full.close()
    second.close()


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = _cfg("mdlm", steps=2, log_every=1, eval_every=2, ckpt_every=2, eval_batches=1)
    first = Trainer(cfg, str(tmp_path), devices=jax.devices()[:1], measure_mfu=False)
    first.run()
    first.close()
    cfg8 = _cfg("mdlm", steps=2)
    cfg8.mesh.shape = (2, 2, 2)
    other = Trainer(cfg8, str(tmp_path), devices=jax.devices()[:8], measure_mfu=False)
    restored = other.restore_or_init(other.train_iterator())
    assert int(restored.step) == 2
    chex.assert_trees_all_equal(jax.device_get(first.state.params),
                                jax.device_get(restored.params))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.params))
    other.close()


def test_sigterm_saves_and_exits(tmp_path):
    cfg = _cfg("ar", steps=50, log_every=10, eval_every=50, ckpt_every=50, eval_batches=1)
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    step_fn = trainer.train_step

    def step_then_preempt(state, batch):
        out = step_fn(state, batch)
        if int(out[0].step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_preempt
    summary = trainer.run()
    trainer.close()
    assert summary["preempted_at"] == 3
    assert trainer.ckpt.latest_step() == 3


def test_non_finite_loss_stops_with_a_message(tmp_path):
    cfg = _cfg("mdlm", steps=6, log_every=2, eval_every=6, ckpt_every=2, eval_batches=1)
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    step_fn = trainer.train_step

    def poisoned(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) >= 3:
            metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
        return state, metrics

    trainer.train_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last good checkpoint: .*2"):
        trainer.run()
    trainer.close()


@pytest.mark.parametrize("field,value,match", [
    ("diffusion.block_size", 5, "diffusion.block_size=5: must divide data.seq_len=32"),
    ("diffusion.objective", "gpt", "diffusion.objective='gpt' is not allowed"),
    ("optim.lr", -1.0, "optim.lr=-1.0: must be finite and > 0"),
    ("optim.lr", float("inf"), "optim.lr=inf: must be finite and > 0"),
    ("data.tokenizer", "gpt2", "data.tokenizer_path=''"),
    ("diffusion.clip", (0.8, 0.2), "diffusion.clip"),
    ("mesh.shape", (3, -1), "mesh.shape"),
    ("model.remat", "all", "model.remat='all' is not allowed"),
])
def test_bad_config_raises_one_clear_error(field, value, match):
    cfg = _cfg("mdlm")
    section, key = field.split(".")
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_nelbo_with_uniform_process_is_rejected():
    cfg = _cfg("mdlm")
    cfg.diffusion.process = "uniform"
    with pytest.raises(ConfigError, match="needs the absorbing process"):
        validate(cfg)


def test_cli_trains_and_reports_bad_config(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",  # 2 fake devices: a sharded run, few threads
           "XLA_FLAGS": cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), devices=2)}
    run = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config", "configs/tiny.py:bd3lm,block=8",
         "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=4",
         "--config.train.ckpt_every=4", "--config.train.eval_batches=1",
         "--workdir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step      4/4" in run.stdout and "val/loss" in run.stdout and "done:" in run.stdout
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("train/loss" in r for r in rows) and any("val/loss" in r for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()

    bad = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config", "configs/tiny.py:bd3lm",
         "--config.diffusion.block_size=3", "--workdir", str(tmp_path / "bad")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: config.diffusion.block_size=3: must divide data.seq_len=32" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("family,steps,margin", [("mdlm", 800, 0.15), ("ar", 300, 0.05)])
def test_markov_validation_loss_approaches_entropy(family, steps, margin, tmp_path, optimized):
    """A short run's validation loss lies between the source's exact entropy and a loose margin.

    MDLM's NELBO bounds the per-token sequence entropy H(X_1..L)/L from above; AR's next-token NLL
    (targets 2..L) estimates the entropy rate. A value below the floor means a broken loss; one
    near log V (2.08 here) means nothing was learned.
    """
    cfg = _cfg(family, steps=steps, log_every=steps, eval_every=steps, ckpt_every=steps,
               eval_batches=8, batch_size=16)
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 10
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    summary = trainer.run()
    trainer.close()
    chain = markov_chain(cfg.data.markov_vocab, cfg.data.markov_order, cfg.data.markov_seed)
    L = cfg.data.seq_len
    floor = chain.entropy_rate() if family == "ar" else chain.sequence_entropy(L) / L
    val = summary["val/loss"]
    assert floor - 0.03 <= val <= floor + margin, (floor, val)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """AR has no sampled noise: two microbatches of 4 give the step of one batch of 8."""
    cfg1 = _cfg("ar")
    cfg2 = _cfg("ar")
    cfg2.optim.accum_steps = 2
    t1 = Trainer(cfg1, str(tmp_path / "a"), measure_mfu=False)
    t2 = Trainer(cfg2, str(tmp_path / "b"), measure_mfu=False)
    batch = _fixed_batch(cfg1)
    s1, m1 = t1.train_step(t1.init_state(), batch)
    s2, m2 = t2.train_step(t2.init_state(), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    chex.assert_trees_all_close(jax.device_get(s1.params), jax.device_get(s2.params), atol=1e-6)
    t1.close()
    t2.close()


def test_bfloat16_compute_trains(tmp_path):
    cfg = _cfg("bd3lm,block=8")
    cfg.model.compute_dtype = "bfloat16"
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    state = trainer.init_state()
    batch = _fixed_batch(cfg)
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        assert math.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    trainer.close()


def test_searched_clip_interval_survives_a_restart(tmp_path):
    """BD3-LM with the clip search: the interval chosen at step 4 is train state, so a run that
    stops right after the search (checkpoint at 4) and resumes trains steps 5..8 with it, exactly
    like the uninterrupted run; `evaluate` reports it."""
    kw = dict(steps=8, log_every=4, eval_every=4, ckpt_every=4, eval_batches=1)

    def cfg(**over):
        c = _cfg("bd3lm,block=8", **{**kw, **over})
        c.diffusion.var_min, c.diffusion.resample = True, True
        c.diffusion.clip_search_batches = 1
        return c

    full = Trainer(cfg(), str(tmp_path / "full"), measure_mfu=False)
    full_summary = full.run()
    first = Trainer(cfg(steps=4), str(tmp_path / "resumed"), measure_mfu=False)
    first_summary = first.run()
    first.close()
    searched = (first_summary["clip/beta_l"], first_summary["clip/beta_u"])
    assert searched != tuple(cfg().diffusion.clip), "the search kept the default interval"
    np.testing.assert_allclose(np.asarray(first.state.clip), searched, rtol=1e-6)

    second = Trainer(cfg(), str(tmp_path / "resumed"), measure_mfu=False)
    restored = second.restore_or_init(second.train_iterator())
    np.testing.assert_allclose(np.asarray(restored.clip), searched, rtol=1e-6)
    summary = second.run()
    assert summary["start_step"] == 4
    chex.assert_trees_all_equal(jax.device_get(full.state.params),
                                jax.device_get(second.state.params))
    assert summary["clip/beta_l"] == full_summary["clip/beta_l"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    reported = evaluate_run(str(tmp_path / "resumed"))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # writes nothing
    # Sized to the target standard error, within one pass of the split; the protocol says so.
    protocol = reported["protocol"]
    assert protocol["sequences"] == reported["val/sequences"] > cfg().train.batch_size
    assert protocol["split_exhausted"] or reported["val/loss_se"] < 2 * 0.003  # 2-stage: ≈
    assert (protocol["split"], protocol["times"], protocol["t_samples"], protocol["seed"]) == (
        "validation", "stratified", 1, 0)
    assert (reported["clip/beta_l"], reported["clip/beta_u"]) == pytest.approx(
        (full_summary["clip/beta_l"], full_summary["clip/beta_u"]))
    full.close()
    second.close()


def test_clip_interval_is_traced_state_of_one_compiled_step(tmp_path):
    """A new interval changes the training times (and so the loss) without a recompile."""
    cfg = _cfg("bd3lm,block=8")
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    batch = _fixed_batch(cfg)
    state = trainer.init_state()
    narrow = state.replace(clip=jax.device_put(jnp.asarray([0.9, 1.0], jnp.float32),
                                               trainer.program.state_shardings.clip))
    _, wide_metrics = trainer.train_step(jax.tree.map(jnp.copy, state), batch)
    _, narrow_metrics = trainer.train_step(narrow, batch)
    assert trainer.program.step._cache_size() == 1
    assert float(wide_metrics["loss"]) != float(narrow_metrics["loss"])
    trainer.close()


@pytest.mark.parametrize("arg,keys,absent", [
    ("ctmc", ("val/loss", "val/ppl"), ()),
    ("csm", ("val/loss", "val/pseudo_nll"), ("val/ppl",)),
])
def test_new_objectives_train_and_validate_from_a_config(arg, keys, absent, tmp_path):
    """CTMC reports its bound in nats/token (with perplexity); CSM its objective J and the
    pseudo-likelihood, and no perplexity (J is not a likelihood)."""
    cfg = _cfg(arg, steps=4, log_every=4, eval_every=4, ckpt_every=4, eval_batches=1)
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    summary = trainer.run()
    trainer.close()
    for k in keys:
        assert math.isfinite(summary[k]), (k, summary)
    for k in absent:
        assert k not in summary
    if arg == "ctmc":  # a bound on the NLL per token can't beat the source's entropy
        chain = markov_chain(cfg.data.markov_vocab, cfg.data.markov_order, cfg.data.markov_seed)
        assert summary["val/loss"] >= chain.sequence_entropy(cfg.data.seq_len) / cfg.data.seq_len
