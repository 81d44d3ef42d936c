"""One small size for every family: the results table of `benchmarks/results_table.py`.

    python -m dlm_jax.train --config configs/small.py:bd3lm,block=4 --workdir runs/small/bd3lm4

arg: "<family>[,block=N][,process=uniform|absorbing][,steps=N][,eval_every=N]
[,adapt=AR_RUN[,anneal=N]][,joint=W]" with family one of `dlm_jax.registry.FAMILIES`. The
quickstart's model (DiT 128 × 3, 4 heads, cond 64) on the embedded CPython corpus, bytes,
length 128, batch 16: every family sees the same tokens in the same order (same data seed), so
the runs differ only in the objective, process and block size. BD3-LM trains from scratch here
(the paper fine-tunes a block-L MDLM checkpoint) with the clip search and resampling on, as the
paper trains it. D3PM uses T = 1000 and λ = 0.01.

adapt starts a diffusion family from an AR run's weights, with the shift and `anneal` steps of
attention-mask annealing; joint=W adds W × the AR NLL of a causal pass of the same network
(`registry.apply_adaptation`):

    python -m dlm_jax.train --config configs/small.py:mdlm,adapt=runs/small/ar,anneal=200 \\
        --workdir runs/small/mdlm-from-ar
"""
from dlm_jax.config import Config, parse_arg
from dlm_jax.registry import apply_adaptation, apply_family

OPTIONS = {"block": int, "process": str, "steps": int, "eval_every": int, "adapt": str,
           "anneal": int, "joint": float}


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
    cfg.train.eval_every, cfg.train.eval_batches = opts.get("eval_every", cfg.train.steps), 4
    if "adapt" in opts or "joint" in opts:
        apply_adaptation(cfg, opts.get("adapt", ""), anneal_steps=opts.get("anneal", 0),
                         ar_weight=opts.get("joint", 0.0))
    cfg.sampling.num_samples = cfg.sampling.batch_size = 16
    return cfg
