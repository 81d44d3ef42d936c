"""Tiny configs for tests and smoke runs, one per family.

    python -m dlm_jax.train --config configs/tiny.py:bd3lm,block=4 --workdir /tmp/tiny

arg: "<family>[,block=N][,process=uniform|absorbing][,source=markov|stdlib]" with family one of
ar, mdlm, bd3lm, sedd, d3pm, ctmc, csm (`dlm_jax.registry.FAMILIES`).
"""
from dlm_jax.config import Config, parse_arg
from dlm_jax.registry import apply_family

OPTIONS = {"block": int, "process": str, "source": str}


def get_config(arg: str | None = None) -> Config:
    (family,), opts = parse_arg(arg, positional=("mdlm",), options=OPTIONS,
                                where="configs/tiny.py")
    cfg = Config(name=f"tiny-{family}")
    apply_family(cfg, family, block=opts.get("block", 0), process=opts.get("process"))
    cfg.diffusion.sigma_min, cfg.diffusion.sigma_max = 1e-3, 8.0  # geometric / linear schedules
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
