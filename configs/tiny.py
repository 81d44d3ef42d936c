"""Tiny configs for tests and smoke runs, one per family.

    python -m dlm_jax.train --config configs/tiny.py:bd3lm,block=4 --workdir /tmp/tiny

arg: "<family>[,block=N][,process=uniform|absorbing][,source=markov|stdlib]" with family one of
ar, mdlm, bd3lm, sedd, d3pm.
"""
from dlm_jax.config import Config, apply_family


def parse_arg(arg: str | None) -> tuple[str, dict]:
    parts = [p for p in (arg or "mdlm").split(",") if p]
    family, opts = parts[0], {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        opts[k] = v
    return family, opts


def get_config(arg: str | None = None) -> Config:
    family, opts = parse_arg(arg)
    cfg = Config(name=f"tiny-{family}")
    block = int(opts.get("block", 0))
    apply_family(cfg, family, block)
    if "process" in opts:
        cfg.diffusion.process = opts["process"]
    if cfg.diffusion.process == "uniform" and cfg.diffusion.objective == "score_entropy":
        cfg.diffusion.schedule = "geometric"
        cfg.diffusion.sigma_min, cfg.diffusion.sigma_max = 1e-3, 8.0
    if family == "d3pm":
        cfg.diffusion.d3pm_steps = 20
    cfg.data.source = opts.get("source", "markov")
    cfg.data.seq_len = 32
    cfg.data.markov_vocab, cfg.data.markov_order = 8, 1
    cfg.data.markov_num_tokens = 50_000
    cfg.data.max_bytes = 300_000
    cfg.model.size = "tiny"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = 3e-3, 5, 0.99
    cfg.train.steps, cfg.train.batch_size = 20, 8
    cfg.train.log_every = cfg.train.eval_every = cfg.train.ckpt_every = 10
    cfg.train.eval_batches = 2
    return cfg
