"""One small size for every family: the results table of `benchmarks/results_table.py`.

    python -m dlm_jax.train --config configs/small.py:bd3lm,block=4 --workdir runs/small/bd3lm4

arg: "<family>[,block=N][,process=uniform|absorbing][,steps=N]" with family one of
`dlm_jax.registry.FAMILIES`. The quickstart's model (DiT 128 × 3, 4 heads, cond 64) on the
embedded CPython corpus, bytes, length 128, batch 16: every family sees the same tokens in the
same order (same data seed), so the runs differ only in the objective, process and block size.
BD3-LM trains from scratch here (the paper fine-tunes a block-L MDLM checkpoint) with the clip
search and resampling on, as the paper trains it. D3PM uses T = 1000 and λ = 0.01.
"""
from dlm_jax.config import Config, parse_arg
from dlm_jax.registry import apply_family

OPTIONS = {"block": int, "process": str, "steps": int}


def get_config(arg: str | None = None) -> Config:
    (family,), opts = parse_arg(arg, positional=("mdlm",), options=OPTIONS,
                                where="configs/small.py")
    cfg = Config(name=f"small-{family}")
    apply_family(cfg, family, block=opts.get("block", 0), process=opts.get("process"))
    cfg.data.source, cfg.data.tokenizer = "stdlib", "byte"
    cfg.data.seq_len, cfg.data.max_bytes = 128, 4_000_000
    cfg.model.size = "tiny"
    cfg.model.width, cfg.model.depth, cfg.model.heads, cfg.model.cond_dim = 128, 3, 4, 64
    if family == "bd3lm":
        cfg.diffusion.resample = cfg.diffusion.var_min = True
        cfg.diffusion.clip_search_batches = 2
    if family == "d3pm":
        cfg.diffusion.d3pm_steps, cfg.diffusion.hybrid_lambda = 1000, 0.01
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = 2e-3, 50, 0.999
    cfg.train.steps, cfg.train.batch_size = opts.get("steps", 1000), 16
    cfg.train.log_every, cfg.train.ckpt_every = 100, 500
    cfg.train.eval_every, cfg.train.eval_batches = cfg.train.steps, 4
    cfg.sampling.num_samples = cfg.sampling.batch_size = 16
    return cfg
