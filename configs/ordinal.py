"""A tiny AR model on noisy histories of the synthetic ordinal source, for Langevin sampling (PnF).

    python -m dlm_jax.train --config configs/ordinal.py --workdir runs/ordinal
    python -m dlm_jax.sample --workdir runs/ordinal --sampler langevin --num_samples 4

Quantised audio-like waveforms (`data.source="ordinal"`, 32 levels: token k is the value k),
an AR DiT trained on histories x̃ = x + σ·ε at the noise levels `diffusion.history_noise`
(p_θ(x_i | x̃_<i, σ), clean targets), then annealed Langevin dynamics on its Gaussian-smoothed
likelihood over those levels (`samplers.langevin`). CPU, about a minute.

arg: "[steps=N][,seq_len=N][,levels=N]" (train steps, sequence length, quantisation levels).
"""
from dlm_jax.config import Config, parse_arg
from dlm_jax.registry import apply_family

OPTIONS = {"steps": int, "seq_len": int, "levels": int}


def get_config(arg: str | None = None) -> Config:
    _, opts = parse_arg(arg, positional=(), options=OPTIONS, where="configs/ordinal.py")
    cfg = Config(name="ordinal-ar-langevin")
    apply_family(cfg, "ar")
    cfg.data.source = "ordinal"
    cfg.data.seq_len = opts.get("seq_len", 64)
    cfg.data.ordinal_levels = opts.get("levels", 32)
    cfg.data.ordinal_num_tokens = 200_000
    cfg.diffusion.history_noise = (8.0, 4.0, 2.0, 1.0, 0.5)
    cfg.model.size = "tiny"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.ema_decay = 3e-3, 20, 0.99
    cfg.train.steps, cfg.train.batch_size = opts.get("steps", 400), 16
    cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = 100, 200, 200
    cfg.train.eval_batches = 4
    cfg.train.final_samples = 2
    cfg.sampling.steps = 50          # Langevin updates per noise level
    cfg.sampling.step_size = 0.3     # η = 0.3·σ²
    return cfg
