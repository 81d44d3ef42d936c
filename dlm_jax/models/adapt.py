"""AR → diffusion weights: a causal DiT's parameters as the starting point of a diffusion DiT.

The AR variant of the DiT (`transformer.DiT(causal=True)`) is the diffusion DiT without its
σ embedder and adaLN layers, whose blocks compute h += attn(LN₁ h) and h += mlp(LN₂ h) (gates 1,
no shift or scale). So a diffusion DiT whose adaLN layers output shift = scale = 0 and gate = 1
whatever the conditioning (kernel 0, bias 0 except the gates' 1) computes exactly the AR model's
function under the same mask: the adaptation recipes' starting point (Gong et al., 2025,
"Scaling Diffusion Language Models via Adaptation from Autoregressive Models", ICLR), to be read
with the shift (`methods.base.shift_rows`) and widened from causal to bidirectional attention by
annealing.

States beyond the AR vocabulary (the absorbing process's mask, state V) get a zero embedding
and a zero output column (SUBS never predicts the mask anyway). A zero row is normalised to zero
by the first (weight-only) LayerNorm, so a hidden token's key scores 0 and its value is 0 in the
first layer: it adds nothing to what the AR model reads from the visible tokens. (On the small
byte-level model the mean token embedding instead gave an initial NELBO 0.9 nats/token higher.)
The σ embedder keeps its fresh initialisation: with zero adaLN kernels nothing reads it yet.

GPT-2 (`models.gpt2`) has no adaLN: its bidirectional variant is the same network with the
causal mask left out, so every parameter is copied and only the tied embedding `wte` gains the
extra states' rows (zero, as above).

Parameters are pure dicts (`nnx.to_pure_dict`); shapes: V AR vocabulary, S ≥ V diffusion states,
D width, C cond_dim. Either layer layout (unrolled blocks[i], or stacked by `model.scan_layers`)
on either side: the mapping works on unrolled blocks and returns the diffusion model's layout.
"""
from __future__ import annotations

import jax
import numpy as np

from dlm_jax.models.layout import find_layout, to_layout, unstack_layers

# adaLN chunks of a block: (shift, scale, gate) for attention, then for the MLP.
_BLOCK_GATES = (2, 5)


def _problems(ar, init, path=""):
    """Paths where the AR parameters do not fit the diffusion model (other than the extra
    states and the layers only the diffusion model has)."""
    out = []
    for key, sub in ar.items():
        where = f"{path}{key}"
        if key not in init:
            out.append(f"{where}: not in the diffusion model")
        elif isinstance(sub, dict):
            out += _problems(sub, init[key], where + ".")
        elif where not in ("embed.embedding", "final.linear.kernel", "final.linear.bias") and \
                np.shape(sub) != np.shape(init[key]):
            out.append(f"{where}: AR {np.shape(sub)} vs diffusion {np.shape(init[key])}")
    return out


def ar_to_diffusion(ar_params: dict, init_params: dict) -> dict:
    """The diffusion DiT's parameters that compute the AR DiT's function (module docstring).

    ar_params: the causal DiT's params (embedding (V, D), no `adaln`, no `sigma_map`).
    init_params: a freshly initialised diffusion DiT of the same width, depth, heads and MLP,
      with S ≥ V states (embedding (S, D)); its σ embedder is kept.
    A GPT-2 pair (`wte` in the params) maps one to one, `wte` padded (module docstring).
    Either may have stacked blocks (`scan_layers`); the result has `init_params`' layout.
    Returns a new pure dict shaped like `init_params` (numpy arrays). ValueError lists every
    parameter that does not fit.
    """
    stacked = bool(find_layout(init_params))
    ar = unstack_layers(jax.tree.map(np.asarray, ar_params))
    init = unstack_layers(jax.tree.map(np.asarray, init_params))
    out = _gpt2(ar, init) if "wte" in ar else _dit(ar, init)
    return to_layout(out, stacked)


def _dit(ar: dict, init: dict) -> dict:
    """The causal DiT → diffusion DiT mapping on unrolled params (`ar_to_diffusion`)."""
    problems = _problems(ar, init)
    for need in ("embed", "blocks", "final"):
        if need not in ar:
            problems.append(f"{need}: missing from the AR parameters")
    if "adaln" in ar.get("final", {}) or "sigma_map" in ar:
        problems.append("the source has adaLN / σ-embedder layers: it is not a causal (AR) DiT")
    if problems:
        raise ValueError("the AR parameters do not fit the diffusion model: "
                         + "; ".join(problems[:8]))
    emb, s_emb = ar["embed"]["embedding"], init["embed"]["embedding"]
    V, S = emb.shape[0], s_emb.shape[0]
    if S < V or emb.shape[1] != s_emb.shape[1]:
        raise ValueError(f"embed.embedding: AR {emb.shape} vs diffusion {s_emb.shape} (the "
                         f"diffusion model needs the AR vocabulary plus its extra states)")

    out = jax.tree.map(np.copy, init)
    out["embed"]["embedding"][:V] = emb
    out["embed"]["embedding"][V:] = 0.0
    for name in ("kernel", "bias"):
        column = out["final"]["linear"][name]
        column[..., :V] = ar["final"]["linear"][name]
        column[..., V:] = 0.0
    out["final"]["norm"] = ar["final"]["norm"]
    out["final"]["adaln"] = jax.tree.map(np.zeros_like, init["final"]["adaln"])
    for i, block in ar["blocks"].items():
        target = out["blocks"][i]
        target.update({k: v for k, v in block.items()})
        target["adaln"]["kernel"] = np.zeros_like(init["blocks"][i]["adaln"]["kernel"])
        bias = np.zeros_like(init["blocks"][i]["adaln"]["bias"])  # (6, D)
        bias[list(_BLOCK_GATES)] = 1.0
        target["adaln"]["bias"] = bias
    return out


def _gpt2(ar: dict, init: dict) -> dict:
    """GPT-2 → its bidirectional variant: the same parameters, `wte` padded with zero rows."""
    problems = [p for p in _problems(ar, init) if not p.startswith("wte:")]
    problems += [f"{k}: missing from the AR parameters" for k in init if k not in ar]
    V, S = ar["wte"].shape[0], init["wte"].shape[0]
    if S < V or ar["wte"].shape[1:] != init["wte"].shape[1:]:
        problems.append(f"wte: AR {ar['wte'].shape} vs diffusion {init['wte'].shape}")
    if problems:
        raise ValueError("the AR parameters do not fit the diffusion model: "
                         + "; ".join(problems[:8]))
    out = jax.tree.map(np.copy, ar)
    out["wte"] = np.concatenate([ar["wte"], np.zeros((S - V,) + ar["wte"].shape[1:],
                                                     ar["wte"].dtype)])
    return out
