"""Quickstart: a small BD3-LM (block size 16) on the embedded CPython corpus, CPU, minutes.

    python -m dlm_jax.train --config configs/quickstart.py --workdir runs/quickstart

Trains, validates (NELBO in nats/token and bits per byte, plus BD3-LM's clipped-schedule search)
and checkpoints; writes runs/quickstart/{metrics.jsonl,config.json,checkpoints/}. Byte tokenizer,
no download. Sized for a 2-core machine: 2–5 minutes end to end; ends by printing two samples.
"""
from dlm_jax.config import Config
from dlm_jax.registry import apply_family


def get_config(arg: str | None = None) -> Config:
    del arg
    cfg = Config(name="quickstart-bd3lm")
    apply_family(cfg, "bd3lm", block=16)
    cfg.data.source = "stdlib"
    cfg.data.tokenizer = "byte"
    cfg.data.seq_len = 128
    cfg.data.max_bytes = 4_000_000
    cfg.model.size = "tiny"
    cfg.model.width, cfg.model.depth, cfg.model.heads, cfg.model.cond_dim = 128, 3, 4, 64
    cfg.diffusion.resample = True
    cfg.diffusion.var_min = True
    cfg.diffusion.clip_search_batches = 2
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = 2e-3, 50, 0.999
    cfg.train.steps, cfg.train.batch_size = 300, 16
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 50, 150, 150
    cfg.train.eval_batches = 4
    cfg.train.final_samples = 2
    cfg.sampling.length = 64
    return cfg
