"""Reliability: every fault is injected, not hoped about.

  * kill -9 and SIGTERM at chosen moments (before, during and after an evaluation with the BD3-LM
    clip search, during an asynchronous save), then resume: every array of the final checkpoint
    equals the uninterrupted run's, bit for bit, and metrics.jsonl has no duplicate step;
  * a corrupt newest checkpoint: the run falls back to the previous one and says so in one
    line, keeping the bad one; a failed save (the file-size limit, as on a full disk) stops the run at once
    with one line naming the directory;
  * a changed config on resume: shape-changing fields are one error, others one warning;
  * bad command-line input: one `error:` line, exit code 2, nothing written.
"""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from dlm_jax.cli import cpu_xla_flags
from dlm_jax.config import ConfigError
from dlm_jax.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "fault_run.py")
# BD3-LM with the clip search (eval every 4) and async checkpoints every 2 steps.
FLAGS = ["--config", "configs/tiny.py:bd3lm,block=8", "--config.diffusion.var_min=True",
         "--config.diffusion.resample=True", "--config.diffusion.clip_search_batches=1",
         "--config.train.steps=12", "--config.train.eval_every=4", "--config.train.ckpt_every=2",
         "--config.train.log_every=1", "--config.train.eval_batches=1",
         "--config.mesh.shape=(1,1,1)"]


def _run(workdir, fault="none", *extra, expect=0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, DRIVER, fault, *FLAGS, *extra, "--workdir",
                          str(workdir)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    if expect is not None:
        assert out.returncode == expect, (fault, out.returncode, out.stdout[-1500:],
                                          out.stderr[-3000:])
    return out


def _final_state(workdir):
    cfg = tiny.get_config("bd3lm,block=8")
    cfg.diffusion.var_min = cfg.diffusion.resample = True
    cfg.mesh.shape = (1, 1, 1)
    trainer = Trainer(cfg, str(workdir), measure_mfu=False)
    step, state = trainer.ckpt.restore_state_only(trainer.program.abstract_state)
    trainer.close()
    return step, jax.device_get(state)


def _metric_steps(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r["step"] for r in rows if "train/loss" in r]
    eval_rows = [r["step"] for r in rows if "val/loss" in r]
    return train_rows, eval_rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    _run(workdir)
    return workdir, _final_state(workdir)


@pytest.mark.parametrize("kind", ["kill", "term"])
def test_interrupted_runs_resume_bit_identically(kind, uninterrupted, tmp_path):
    """One run interrupted three times: during the step-4 evaluation (after validation, before
    the clip search), while the step-6 checkpoint is being written, and after step 9 (after the
    step-8 search). Each restart resumes; the end state equals the uninterrupted run's."""
    full_dir, (full_step, full_state) = uninterrupted
    for fault in (f"{kind}:eval:4", f"{kind}:save:6", f"{kind}:step:9"):
        out = _run(tmp_path, fault, expect=None)
        if kind == "kill":
            assert out.returncode == -9, (fault, out.returncode, out.stderr[-2000:])
        else:  # a clean stop: exit 0, one saved step, no trace
            assert out.returncode == 0, (fault, out.stderr[-2000:])
            assert "stopped by SIGTERM: step" in out.stdout and "Traceback" not in out.stderr
    out = _run(tmp_path)
    assert "resumed from step" in out.stdout
    step, state = _final_state(tmp_path)
    assert step == full_step == 12
    chex.assert_trees_all_equal(state, full_state)   # params, EMA, optimizer, clip, step
    train_steps, eval_steps = _metric_steps(tmp_path)
    assert train_steps == list(range(1, 13)), train_steps      # no step logged twice
    assert eval_steps == [4, 8, 12]
    assert (train_steps, eval_steps) == _metric_steps(full_dir)
    again = _run(tmp_path)   # a finished run says so and trains nothing
    assert "already complete: step 12" in again.stdout


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    """Resuming through the CLI onto a truncated newest checkpoint: the run falls back to the
    one before and says so in one line naming the bad array; nothing else reaches stderr (orbax
    leaves its other reads pending, whose debris printed thousands of traceback lines)."""
    cfg = tiny.get_config("mdlm")
    cfg.mesh.shape = (1, 1, 1)
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.eval_every = 4, 2, 100
    first = Trainer(cfg, str(tmp_path), measure_mfu=False)
    first.run()
    first.close()
    ckpt4 = tmp_path / "checkpoints" / "4"
    files = sorted((p for p in ckpt4.rglob("*") if p.is_file() and p.stat().st_size > 1000),
                   key=lambda p: -p.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[:100])      # truncate the largest array file
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), devices=2)}
    out = subprocess.run(
        [sys.executable, "-m", "dlm_jax.train", "--config", "configs/tiny.py:mdlm",
         "--config.mesh.shape=(1,1,1)", "--config.train.steps=6", "--config.train.ckpt_every=2",
         "--config.train.eval_every=100", "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert lines[0] == ("warning: resuming step 4 with a changed config: train.steps: 4 -> 6 "
                        "(the previous config is kept as config.4.json)")
    warning = [ln for ln in lines if ln.startswith("warning: checkpoint")]
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {ckpt4} is "
                                                       "unreadable (")
    assert "caused by ValueError: OUT_OF_RANGE: Error reading" in warning[0]
    assert warning[0].endswith(f"kept as {ckpt4}.unreadable")
    # the library's own log line of the same event (absl, "W…] checkpoint … is unreadable")
    logged = [ln for ln in lines[1:] if ln not in warning]
    assert len(logged) == 1 and "is unreadable" in logged[0] and "TensorStore" not in out.stderr
    assert (tmp_path / "checkpoints" / "4.unreadable").is_dir()     # kept, never deleted
    steps = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert {4, 6} <= steps                                           # 4 saved afresh


def test_failed_save_stops_the_run_at_once(tmp_path):
    """A file-size limit makes every checkpoint write fail (EFBIG, as ENOSPC on a full disk)."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "sys.argv[1:] = " + repr(["--config", "configs/tiny.py:mdlm", "--config.train.steps=20",
                                  "--config.train.ckpt_every=2", "--config.train.log_every=1",
                                  "--config.train.eval_every=100", "--workdir",
                                  str(tmp_path)]) + "; "
        "from dlm_jax import train; from absl import app; import jax; jax.devices(); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "app.run(lambda a: sys.exit(train.main(a)), flags_parser=train.parse_flags)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu",   # no cache entries cut
                              "JAX_ENABLE_COMPILATION_CACHE": "false"},  # short by the limit
                         timeout=300)
    assert out.returncode == 3, (out.returncode, out.stderr[-2000:])
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"saving step 2 to {tmp_path}/checkpoints failed" in errors[0]
    # and nothing else: no traces from orbax's writer threads or asyncio beside it.
    assert out.stderr.strip().splitlines() == errors, out.stderr[:3000]
    logged = [int(ln.split()[1].split("/")[0]) for ln in out.stdout.splitlines()
              if ln.startswith("step ")]
    assert max(logged) <= 4, logged          # stopped at the failed save, not an interval later
    assert not os.path.isdir(tmp_path / "checkpoints" / "2")


def test_changed_config_on_resume(tmp_path, capsys):
    cfg = tiny.get_config("mdlm")
    cfg.mesh.shape = (1, 1, 1)
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.eval_every = 2, 2, 100
    Trainer(cfg, str(tmp_path), measure_mfu=False).run()
    wider = tiny.get_config("mdlm")
    wider.mesh.shape = (1, 1, 1)
    wider.model.width, wider.data.markov_vocab, wider.train.steps = 96, 9, 4
    with pytest.raises(ConfigError, match="cannot change on resume: data.markov_vocab: 8 -> 9; "
                                          "model.width: 0 -> 96"):
        Trainer(wider, str(tmp_path), measure_mfu=False).run()
    faster = tiny.get_config("mdlm")
    faster.mesh.shape = (1, 1, 1)
    faster.optim.lr, faster.train.steps = 1e-3, 4
    capsys.readouterr()
    summary = Trainer(faster, str(tmp_path), measure_mfu=False).run()
    err = capsys.readouterr().err
    assert "warning: resuming step 2 with a changed config: optim.lr: 0.003 -> 0.001" in err
    assert "train.steps: 2 -> 4" in err and summary["final_step"] == 4
    old = json.load(open(tmp_path / "config.2.json"))
    assert old["optim"]["lr"] == 0.003
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 0.001


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/tiny.py:mdlm", "--config.train.stepz=5"],
     "config.train.stepz is not a known key (did you mean config.train.steps?)"),
    (["--config", "configs/nope.py"], "--config configs/nope.py: no such config file"),
    (["--config", "configs/tiny.py:bd3lm,blok=4"], "unknown option 'blok' (did you mean 'block'?)"),
    (["--config", "configs/tiny.py:mdlm", "--config.optim.lr=inf"],
     "config.optim.lr=inf: must be finite and > 0"),
    (["--config", "configs/tiny.py:mdlm,source=stdlib", "--config.data.source=text",
      "--config.data.paths=('/nonexistent/*.txt',)"], "data.paths: the glob"),
    (["--config", "configs/tiny.py:mdlm,source=stdlib", "--config.data.tokenizer=hf",
      "--config.data.tokenizer_path=BADTOK"], "cannot read tokenizer file"),
    (["--config", "configs/tiny.py:mdlm,source=stdlib", "--config.data.source=tfds",
      "--config.data.tfds_name=lm1b", "--config.data.tfds_data_dir=/nonexistent/tfds"],
     "data.tfds_data_dir '/nonexistent/tfds' does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("not json")
    args = [a.replace("BADTOK", str(bad_tok)) for a in args]
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "dlm_jax.train", *args, "--workdir",
                          str(workdir)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, (out.returncode, out.stderr[-2000:])
    assert message in errors[0], errors
    assert "Traceback" not in out.stderr and not workdir.exists()


def test_workdir_that_is_a_file_and_config_help(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "dlm_jax.train", "--config",
                          "configs/tiny.py:mdlm", "--workdir", str(afile)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"error: --workdir {afile} exists and is not a directory" \
        in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "dlm_jax.train", "--config_help"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    assert help_out.returncode == 0
    assert "  train.steps = 1000" in help_out.stdout and "  optim.lr = 0.0003" in help_out.stdout


def test_exploding_loss_warns_once(tmp_path, capsys):
    cfg = tiny.get_config("ar")
    cfg.mesh.shape = (1, 1, 1)
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = 8, 1, 100
    trainer = Trainer(cfg, str(tmp_path), measure_mfu=False)
    step_fn = trainer.train_step

    def exploding(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) >= 4:
            metrics = {**metrics, "loss": metrics["loss"] * 1e22}
        return state, metrics

    trainer.train_step = exploding
    capsys.readouterr()
    summary = trainer.run()
    trainer.close()
    err = capsys.readouterr().err
    assert err.count("warning: the training loss grew from") == 1 and "(step 4)" in err
    assert summary["final_step"] == 8


def _mdlm_final_state(workdir):
    cfg = tiny.get_config("mdlm")
    trainer = Trainer(cfg, str(workdir), measure_mfu=False)
    step, state = trainer.ckpt.restore_state_only(trainer.program.abstract_state)
    trainer.close()
    return step, jax.device_get(state)


def test_sigterm_to_one_of_two_hosts_then_resume_on_one_host(tmp_path):
    """Two local processes (jax.distributed): SIGTERM reaches host 1 only; the hosts agree on
    the stop step, save it together and exit 0 (no deadlock), through the launcher. The run then
    resumes on one process (the same 4 devices) and follows a run that trained on one process
    throughout: the global batches and the checkpoint do not depend on the host count. (Equal up
    to float rounding: a cross-process all-reduce adds in another order, ~1e-8 per step.)"""
    import signal
    import time
    flags = ["--config.train.steps=100", "--config.train.log_every=5", "--config.optim.lr=1e-3",
             "--config.train.eval_every=5000", "--config.train.ckpt_every=5000",
             "--config.train.stop_check_every=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PORT": "12391",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PY": sys.executable}
    launcher = subprocess.Popen(
        ["bash", "launch/local_multiprocess.sh", "2", "configs/tiny.py:mdlm",
         str(tmp_path / "run"), *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in launcher.stdout:  # wait until both hosts train
            if line.startswith("step "):
                break
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGTERM)        # host 1 only
        t0 = time.time()
        rest = launcher.stdout.read()
        rc = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert rc == 0 and time.time() - t0 < 120, rest[-2000:]
    stopped = [ln for ln in rest.splitlines() if ln.startswith("stopped by SIGTERM: step")]
    assert len(stopped) == 1, rest[-2000:]   # host 0 reports for both
    step = int(stopped[0].split()[4])
    assert step % 5 == 0 and step < 100
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(step)]
    two_host_losses = _losses(tmp_path / "run")

    one = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for workdir in ("run", "alone"):  # resume on one process; an uninterrupted one-process run
        out = subprocess.run([sys.executable, "-m", "dlm_jax.train", "--config",
                              "configs/tiny.py:mdlm", *flags, "--workdir",
                              str(tmp_path / workdir)], cwd=REPO, env=one, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        if workdir == "run":
            assert f"resumed from step {step}" in out.stdout
    resumed, alone = _losses(tmp_path / "run"), _losses(tmp_path / "alone")
    assert sorted(resumed) == sorted(alone) == list(range(5, 101, 5))
    np.testing.assert_allclose([two_host_losses[s] for s in sorted(two_host_losses)],
                               [alone[s] for s in sorted(two_host_losses)], rtol=1e-5)
    np.testing.assert_allclose([resumed[s] for s in sorted(alone)],
                               [alone[s] for s in sorted(alone)], rtol=1e-3)
    (end_a, state_a), (end_b, state_b) = (_mdlm_final_state(tmp_path / "run"),
                                          _mdlm_final_state(tmp_path / "alone"))
    assert end_a == end_b == 100
    chex.assert_trees_all_close(state_a.params, state_b.params, atol=2e-4)


def _losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_failure_reason_is_one_line_with_its_root_cause():
    from dlm_jax.checkpoint import _first_line
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "params.w/0.0"\nmore detail')
        except ValueError as cause:
            raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). "
                            "See full TensorStore details: <bound method spec of TensorStore({"
                            "\n  'driver': 'zarr'") from cause
    except Exception as e:
        reason = _first_line(e)
    assert reason == ("Exception: Encountered error while reading array index: (slice(0, 4, 1),)"
                      '; caused by ValueError: OUT_OF_RANGE: Error reading "params.w/0.0"')
    assert _first_line(OSError("disk full [tensorstore_spec={...}]")) == "OSError: disk full"
