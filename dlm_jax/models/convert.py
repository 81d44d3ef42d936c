"""Import PyTorch state dicts of the reference DiTs (bd3lms DIT, SEDD DDiT) into `DiT`.

Input: a mapping from the exact PyTorch parameter names of the reference implementations (the keys
in the left column of the table below) to numpy arrays, e.g.
`torch.load(...)["state_dict"]` converted with `.numpy()`, or a fixture npz's `param/<key>` entries.
Prefixes `backbone.` and `_orig_mod.` are stripped. Every key must be accounted for: mapped onto a
parameter, checked (`rotary_emb.inv_freq` must equal our recomputed table), or listed in `ignore`
(default: the HF BD3LM scalars `sampling_eps_min` / `sampling_eps_max`). Unknown or missing keys
and shape mismatches raise a `ValueError` naming them.

Layout changes (torch `nn.Linear` weights are (out, in)):
  vocab_embed.embedding (V, D)              → embed.embedding (V, D)
  sigma_map.mlp.{0,2}.weight (C, ·)         → sigma_map.fc{1,2}.kernel (·, C) = Wᵀ
  blocks.i.attn_qkv.weight (3D, D)          → blocks[i].attn.qkv (D, 3, H, Dh) = Wᵀ reshaped
  blocks.i.attn_out.weight (D, D)           → blocks[i].attn.out (H, Dh, D) = Wᵀ reshaped
  blocks.i.mlp.{0,2}.weight/bias            → blocks[i].mlp.fc{1,2}.kernel (Wᵀ) / bias
  blocks.i.adaLN_modulation.weight (6D, C)  → blocks[i].adaln.kernel (C, 6, D); bias → (6, D)
  blocks.i.norm{1,2}.weight                 → blocks[i].norm{1,2}.weight
  output_layer.norm_final.weight            → final.norm.weight
  output_layer.adaLN_modulation.*  (2D, C)  → final.adaln.kernel (C, 2, D) / bias (2, D)
  output_layer.linear.weight/bias (V, D)    → final.linear.kernel (D, V) / bias
The AR variant (bd3lms `DDiTBlockCausal`) uses the same keys minus `sigma_map.*` and
`*adaLN_modulation*`. GPT-2 (learned positions, LN with bias, tied head) is not supported.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm_jax.models.layers import rotary_inv_freq
from dlm_jax.models.transformer import DiT

PREFIXES = ("backbone.", "_orig_mod.")
DEFAULT_IGNORE = ("sampling_eps_min", "sampling_eps_max")


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Removes any leading `backbone.` / `_orig_mod.` (repeatedly, in any order) from each key."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        k = key
        while k.startswith(PREFIXES):
            k = k[len(next(p for p in PREFIXES if k.startswith(p))):]
        if k in out:
            raise ValueError(f"two keys map to {k!r} after stripping prefixes (one is {key!r})")
        out[k] = np.asarray(value)
    return out


def dit_config_from_state_dict(state_dict: Mapping[str, Any], *,
                               heads: int | None = None) -> dict[str, Any]:
    """Infers DiT constructor arguments (vocab_size, width, depth, heads, cond_dim, mlp_ratio,
    causal) from the tensor shapes. H comes from `rotary_emb.inv_freq` (Dh/2 entries) unless given.
    """
    sd = strip_prefixes(state_dict)
    vocab, width = sd["vocab_embed.embedding"].shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if heads is None:
        if "rotary_emb.inv_freq" not in sd:
            raise ValueError("cannot infer heads: no rotary_emb.inv_freq; pass heads=")
        heads = width // (2 * sd["rotary_emb.inv_freq"].shape[0])
    causal = "sigma_map.mlp.0.weight" not in sd
    cfg = dict(vocab_size=int(vocab), width=int(width), depth=depth, heads=int(heads),
               mlp_ratio=int(sd["blocks.0.mlp.0.weight"].shape[0] // width), causal=causal)
    if not causal:
        cfg["cond_dim"] = int(sd["sigma_map.mlp.0.weight"].shape[0])
    return cfg


# -- the key table ---------------------------------------------------------------------------------

def _t(w):  # torch Linear (out, in) -> kernel (in, out)
    return w.T


def _key_table(model: DiT) -> list[tuple[str, tuple, Callable[[np.ndarray], np.ndarray]]]:
    """(torch key, attribute path in `model`, transform) for every parameter of `model`."""
    D, H, Dh = model.width, model.heads, model.head_dim
    table = [("vocab_embed.embedding", ("embed", "embedding"), np.asarray)]
    if model.adaln:
        for j, name in ((0, "fc1"), (2, "fc2")):
            table += [(f"sigma_map.mlp.{j}.weight", ("sigma_map", name, "kernel"), _t),
                      (f"sigma_map.mlp.{j}.bias", ("sigma_map", name, "bias"), np.asarray)]
    for i in range(model.depth):
        p = f"blocks.{i}."
        b = ("blocks", i)
        table += [
            (p + "norm1.weight", b + ("norm1", "weight"), np.asarray),
            (p + "norm2.weight", b + ("norm2", "weight"), np.asarray),
            (p + "attn_qkv.weight", b + ("attn", "qkv"), lambda w: w.T.reshape(D, 3, H, Dh)),
            (p + "attn_out.weight", b + ("attn", "out"), lambda w: w.T.reshape(H, Dh, D)),
            (p + "mlp.0.weight", b + ("mlp", "fc1", "kernel"), _t),
            (p + "mlp.0.bias", b + ("mlp", "fc1", "bias"), np.asarray),
            (p + "mlp.2.weight", b + ("mlp", "fc2", "kernel"), _t),
            (p + "mlp.2.bias", b + ("mlp", "fc2", "bias"), np.asarray),
        ]
        if model.adaln:
            table += [
                (p + "adaLN_modulation.weight", b + ("adaln", "kernel"),
                 lambda w: w.T.reshape(w.shape[1], 6, D)),
                (p + "adaLN_modulation.bias", b + ("adaln", "bias"), lambda w: w.reshape(6, D)),
            ]
    table += [
        ("output_layer.norm_final.weight", ("final", "norm", "weight"), np.asarray),
        ("output_layer.linear.weight", ("final", "linear", "kernel"), _t),
        ("output_layer.linear.bias", ("final", "linear", "bias"), np.asarray),
    ]
    if model.adaln:
        table += [
            ("output_layer.adaLN_modulation.weight", ("final", "adaln", "kernel"),
             lambda w: w.T.reshape(w.shape[1], 2, D)),
            ("output_layer.adaLN_modulation.bias", ("final", "adaln", "bias"),
             lambda w: w.reshape(2, D)),
        ]
    return table


def _get(node, path):
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_dit_state_dict(model: DiT, state_dict: Mapping[str, Any], *,
                        ignore: Iterable[str] = DEFAULT_IGNORE) -> DiT:
    """Writes a reference state dict into `model`'s parameters in place and returns `model`.

    Raises ValueError naming every unmapped key, missing key, shape mismatch, or a
    `rotary_emb.inv_freq` that differs from base-1e4 rotary over the model's head width.
    Arrays are cast to each parameter's dtype.
    """
    sd = strip_prefixes(state_dict)
    ignore = set(ignore)
    table = _key_table(model)
    mapped = {k for k, _, _ in table}
    unknown = sorted(k for k in sd if k not in mapped and k not in ignore
                     and k != "rotary_emb.inv_freq")
    missing = sorted(k for k in mapped if k not in sd)
    errors = []
    if unknown:
        errors.append(f"unmapped keys in the state dict: {unknown}")
    if missing:
        errors.append(f"keys missing from the state dict: {missing}")
    if "rotary_emb.inv_freq" in sd:
        ref = np.asarray(rotary_inv_freq(model.head_dim))
        got = sd["rotary_emb.inv_freq"]
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-6, atol=0):
            errors.append(f"rotary_emb.inv_freq {got.shape} does not match base-1e4 rotary with "
                          f"head width {model.head_dim} (heads={model.heads})")
    updates = []
    for key, path, fn in table:
        if key not in sd:
            continue
        var = _get(model, path)
        try:
            value = np.asarray(fn(sd[key]))
        except ValueError as e:  # reshape failure
            errors.append(f"{key}: cannot convert shape {sd[key].shape}: {e}")
            continue
        if value.shape != var.shape:
            errors.append(f"{key}: shape {sd[key].shape} converts to {value.shape}, but "
                          f"{'.'.join(map(str, path))} has shape {var.shape}")
            continue
        updates.append((var, value))
    if errors:
        raise ValueError("cannot load state dict into DiT:\n  " + "\n  ".join(errors))
    for var, value in updates:
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    return model


def dit_from_state_dict(state_dict: Mapping[str, Any], *, heads: int | None = None,
                        ignore: Iterable[str] = DEFAULT_IGNORE, **kwargs) -> DiT:
    """Builds a DiT whose sizes are inferred from `state_dict` and loads it.

    kwargs go to `DiT` (e.g. time_conditioning=True for SEDD, dropout, dtype, param_dtype); they
    override the inferred values. Every parameter comes from the state dict. The reference code
    averages a per-token σ over the sequence, so `token_conditioning` defaults to False here.
    """
    cfg = dit_config_from_state_dict(state_dict, heads=heads)
    cfg.setdefault("token_conditioning", False)
    cfg.update(kwargs)
    vocab, width, depth, n_heads = (cfg.pop(k) for k in ("vocab_size", "width", "depth", "heads"))
    # Built abstractly (no random init, no memory): every parameter is overwritten below.
    model = nnx.eval_shape(lambda: DiT(vocab, width, depth, n_heads, rngs=nnx.Rngs(0), **cfg))
    return load_dit_state_dict(model, state_dict, ignore=ignore)


def state_dict_from_npz(npz: Mapping[str, Any], prefix: str = "param/") -> dict[str, np.ndarray]:
    """The `param/<key>` entries of a fixture npz as a plain state dict."""
    return {k[len(prefix):]: np.asarray(npz[k]) for k in npz.keys() if k.startswith(prefix)}
