"""Paper presets: the published hyper-parameters for LM1B and OpenWebText.

    python -m dlm_jax.train --config configs/presets.py:owt,bd3lm,block=16 --workdir gs://…

arg: "<dataset>,<family>[,block=N][,process=uniform]" with dataset lm1b | owt and family
ar | d3pm | sedd | mdlm | bd3lm. Numbers from research/bd3lm_mdlm.md §5-6 and sedd_d3pm.md §5.2,
§7: DiT small (12 × 768, 12 heads, cond 128), dropout 0.1, AdamW lr 3e-4 (β 0.9/0.999, eps 1e-8,
no weight decay), 2500 warmup steps then constant, grad clip 1, EMA 0.9999, global batch 512.
LM1B: bert-base-uncased wordpieces (local tokenizer.json), length 128, 1M steps. OWT: GPT-2 BPE
(local encoder.json + vocab.bpe), length 1024, 1M steps (BD3-LM: fine-tune from a block-size-L
checkpoint for 150K steps, clip search on, resample on). D3PM text: T = 1000, λ = 0.01.
The datasets must be prepared locally (TFDS array_record: `python -m dlm_jax.data.build_tfds`)
and the tokenizer files supplied: nothing is fetched from a hub.
"""
from dlm_jax.config import Config, apply_family


def get_config(arg: str | None = None) -> Config:
    parts = [p for p in (arg or "owt,mdlm").split(",") if p]
    dataset, family = parts[0], parts[1] if len(parts) > 1 else "mdlm"
    opts = dict(p.partition("=")[::2] for p in parts[2:])
    cfg = Config(name=f"{dataset}-{family}")
    apply_family(cfg, family, int(opts.get("block", 0)))
    if "process" in opts:
        cfg.diffusion.process = opts["process"]
    if cfg.diffusion.process == "uniform" and family == "sedd":
        cfg.diffusion.schedule = "geometric"   # SEDD-uniform: geometric 1e-4 … 20, no σ scaling
        cfg.diffusion.sigma_min, cfg.diffusion.sigma_max = 1e-4, 20.0
        cfg.model.scale_by_sigma = False
    if family == "bd3lm":
        cfg.diffusion.resample = True
        cfg.diffusion.var_min = True
        cfg.diffusion.clip_search_batches = 100
    if family == "d3pm":
        cfg.diffusion.d3pm_steps, cfg.diffusion.hybrid_lambda = 1000, 0.01
        cfg.diffusion.d3pm_schedule = "jsd" if cfg.diffusion.process == "absorbing" else "cosine"

    if dataset == "lm1b":
        cfg.data.source, cfg.data.tfds_name = "tfds", "lm1b"
        cfg.data.tokenizer, cfg.data.tokenizer_path = "hf", "tokenizers/bert-base-uncased.json"
        cfg.data.seq_len = 128
    elif dataset == "owt":
        cfg.data.source, cfg.data.tfds_name = "tfds", "openwebtext"
        cfg.data.tokenizer, cfg.data.tokenizer_path = "gpt2", "tokenizers/gpt2"
        cfg.data.seq_len = 1024
    else:
        raise ValueError(f"configs/presets.py: unknown dataset {dataset!r}; use lm1b or owt")
    cfg.data.num_threads, cfg.data.prefetch = 16, 8

    cfg.model.size, cfg.model.dropout = "small", 0.1
    cfg.model.compute_dtype = "bfloat16"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay = 3e-4, 2500, "constant"
    cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, cfg.optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
    cfg.optim.grad_clip, cfg.optim.ema_decay = 1.0, 0.9999
    cfg.train.batch_size = 512
    cfg.train.steps = 150_000 if family == "bd3lm" and cfg.diffusion.block_size else 1_000_000
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 100, 10_000, 5_000
    cfg.train.eval_batches = 100
    return cfg
