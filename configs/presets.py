"""Paper presets: the published hyper-parameters for LM1B and OpenWebText.

    python -m dlm_jax.train --config configs/presets.py:owt,bd3lm,block=16 --workdir gs://…

arg: "<dataset>,<family>[,block=N][,process=uniform]" with dataset lm1b | owt and family one of
`dlm_jax.registry.FAMILIES`. The settings of the MDLM, BD3-LM, SEDD and D3PM papers (Sahoo et
al., 2024; Arriola et al., 2025; Lou et al., 2024; Austin et al., 2021): DiT small (12 × 768,
12 heads, cond 128), dropout 0.1, AdamW lr 3e-4 (β 0.9/0.999, eps 1e-8, no weight decay), 2500
warmup steps then constant, grad clip 1, EMA 0.9999, global batch 512. LM1B: bert-base-uncased
wordpieces (local tokenizer.json), length 128, 1M steps. OWT: GPT-2 BPE (local encoder.json +
vocab.bpe), length 1024, 1M steps. Per family (`registry.FAMILIES[…].paper`): BD3-LM fine-tunes
a block-size-L checkpoint for 150K steps with the clip search and resampling on; D3PM text uses
T = 1000, λ = 0.01. The datasets must be prepared locally (TFDS array_record:
`python -m dlm_jax.data.build_tfds`) and the tokenizer files supplied: nothing is fetched.
"""
from dlm_jax.config import Config, ConfigError, parse_arg
from dlm_jax.registry import FAMILIES, apply_family, set_fields

OPTIONS = {"block": int, "process": str}
DATASETS = {
    "lm1b": (("data.source", "tfds"), ("data.tfds_name", "lm1b"), ("data.tokenizer", "hf"),
             ("data.tokenizer_path", "tokenizers/bert-base-uncased.json"), ("data.seq_len", 128)),
    "owt": (("data.source", "tfds"), ("data.tfds_name", "openwebtext"),
            ("data.tokenizer", "gpt2"), ("data.tokenizer_path", "tokenizers/gpt2"),
            ("data.seq_len", 1024)),
}


def get_config(arg: str | None = None) -> Config:
    (dataset, family), opts = parse_arg(arg, positional=("owt", "mdlm"), options=OPTIONS,
                                        where="configs/presets.py")
    if dataset not in DATASETS:
        raise ConfigError(f"configs/presets.py: unknown dataset {dataset!r}; use one of "
                          f"{sorted(DATASETS)}")
    cfg = Config(name=f"{dataset}-{family}")
    apply_family(cfg, family, block=opts.get("block", 0), process=opts.get("process"))
    set_fields(cfg, DATASETS[dataset])
    cfg.data.num_threads, cfg.data.prefetch = 16, 8
    cfg.model.size, cfg.model.dropout = "small", 0.1
    cfg.model.compute_dtype = "bfloat16"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.decay = 3e-4, 2500, "constant"
    cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, cfg.optim.weight_decay = 0.9, 0.999, 1e-8, 0.0
    cfg.optim.grad_clip, cfg.optim.ema_decay = 1.0, 0.9999
    cfg.train.batch_size = 512
    cfg.train.steps = 1_000_000
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 100, 10_000, 5_000
    cfg.train.eval_batches = 100
    return set_fields(cfg, FAMILIES[family].paper)
