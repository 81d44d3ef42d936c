"""Read PyTorch checkpoints of the reference DiTs (bd3lms / MDLM `DIT`, SEDD `DDiT`) into `DiT`
parameters, and write them back under the reference names.

Reading (`open_checkpoint`): a `.safetensors` file (no PyTorch needed), a sharded safetensors
index, a `.bin` / `.pt` state dict or a Lightning `.ckpt` (these need torch), or a Hugging
Face-style directory (`config.json` plus weights). Tensors are read one at a time
(`TensorSource`), so a conversion holds one copy of the parameters plus one tensor;
safetensors files are parsed here (the format is a JSON header and raw little-endian data).

Every key must be accounted for: mapped onto a parameter, checked (`rotary_emb.inv_freq` must
equal the recomputed table), or ignored by name (the HF BD3LM scalars `sampling_eps_min` /
`sampling_eps_max`). Unknown or missing keys and shape mismatches are one `ValueError` listing
them all. Prefixes `backbone.` and `_orig_mod.` are stripped.

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
`*adaLN_modulation*`. Sizes are read from the tensors: V, D, depth, C, the MLP ratio and the σ
feature count F from their shapes, the head count from `rotary_emb.inv_freq` (Dh/2 entries).

Reading gives the unrolled layer layout (blocks[i]); a `scan_layers` model stacks it
(`models.layout.stack_layers`, done by `load_dit_state_dict` / `dit_from_state_dict`); writing
(`dit_state_dict`) accepts either.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm_jax.models.layers import rotary_inv_freq
from dlm_jax.models.layout import stack_layers, unstack_layers
from dlm_jax.models.transformer import DiT

PREFIXES = ("backbone.", "_orig_mod.")
DEFAULT_IGNORE = ("sampling_eps_min", "sampling_eps_max")
TORCH_HINT = "pip install 'dlm_jax[torch]'"


# ---------------------------------------------------------------------------------------------
# Reading checkpoints, one tensor at a time
# ---------------------------------------------------------------------------------------------

class TensorSource(Mapping):
    """A read-only mapping name → float/int numpy array that reads a tensor only when asked.

    shapes: name → shape (known without reading); read(name) → the array; where: a description
    of the file(s) for error messages.
    """

    def __init__(self, shapes: Mapping[str, tuple], read: Callable[[str], np.ndarray],
                 where: str):
        self._shapes, self._read, self.where = dict(shapes), read, where

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], where: str = "a state dict") -> "TensorSource":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return cls({k: v.shape for k, v in arrays.items()}, arrays.__getitem__, where)

    def shape(self, key: str) -> tuple:
        return tuple(self._shapes[key])

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return np.asarray(self._read(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def renamed(self, rename: Callable[[str], str]) -> "TensorSource":
        """The same tensors under rename(key); two keys that collide are a ValueError."""
        names: dict[str, str] = {}
        for key in self._shapes:
            new = rename(key)
            if new in names:
                raise ValueError(f"{self.where}: keys {names[new]!r} and {key!r} both map to "
                                 f"{new!r}")
            names[new] = key
        return TensorSource({n: self._shapes[k] for n, k in names.items()},
                            lambda n: self._read(names[n]), self.where)


def strip_prefix_name(key: str, prefixes: tuple[str, ...] = PREFIXES) -> str:
    """Removes leading `prefixes` (repeatedly, in any order) from a key."""
    while key.startswith(prefixes):
        key = key[len(next(p for p in prefixes if key.startswith(p))):]
    return key


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A plain state dict with `backbone.` / `_orig_mod.` removed from every key."""
    src = _as_source(state_dict).renamed(strip_prefix_name)
    return {k: src[k] for k in src}


def _as_source(state_dict) -> TensorSource:
    return state_dict if isinstance(state_dict, TensorSource) else TensorSource.from_arrays(
        state_dict)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_header(path: str) -> tuple[dict, int]:
    """(header, byte offset of the data) of a .safetensors file: an 8-byte little-endian
    header size, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 1 << 30:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _safetensors_source(paths: list[str], where: str) -> TensorSource:
    """Tensors of .safetensors files, each read with one `readinto` when asked: no memory map,
    so a conversion's memory is what it keeps, not the file's pages it touched. BF16 is widened
    to float32 (numpy has no bfloat16)."""
    entries = {}
    for path in paths:
        header, base = _safetensors_header(path)
        for key, info in header.items():
            if key in entries:
                raise ValueError(f"{where}: tensor {key!r} appears in two files")
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            entries[key] = (path, base, info)

    def read(key):
        path, base, info = entries[key]
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], _SAFETENSORS_DTYPES[info["dtype"]])
        if out.nbytes != end - start:
            raise ValueError(f"{path}: tensor {key!r} has {end - start} bytes for shape "
                             f"{info['shape']} {info['dtype']}")
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"{path}: truncated (tensor {key!r})")
        if info["dtype"] == "BF16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out
    return TensorSource({k: tuple(e[2]["shape"]) for k, e in entries.items()}, read, where)


def _torch_load(path: str, unsafe_pickle: bool):
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading .bin / .pt / .ckpt files needs PyTorch: "
                         f"{TORCH_HINT} (or convert the weights to .safetensors)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=True)
    except Exception as e:  # noqa: BLE001 - unpickling failures come in many types
        if unsafe_pickle:
            raise ValueError(f"{path}: torch.load failed: {str(e).splitlines()[0]}") from e
        raise ValueError(f"{path}: the file holds more than tensors (e.g. a Lightning config) and "
                         f"torch.load(weights_only=True) refused it; if you trust the file, pass "
                         f"--unsafe_pickle (full unpickling can run code)") from None


def _torch_source(state_dict: Mapping[str, Any], where: str) -> TensorSource:
    tensors = {k: v for k, v in state_dict.items() if hasattr(v, "shape")}

    def read(key):
        t = tensors[key].detach()
        if t.dtype.is_floating_point and t.dtype.itemsize < 4:  # bf16 / fp16: numpy has no bf16
            t = t.float()
        return t.numpy()
    return TensorSource({k: tuple(v.shape) for k, v in tensors.items()}, read, where)


def _plain(obj):
    """omegaconf containers and the like → plain dicts / lists (for a Lightning config)."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def open_checkpoint(path: str, *, unsafe_pickle: bool = False) -> tuple[TensorSource,
                                                                        dict | None]:
    """(tensors, the checkpoint's own config or None) of a checkpoint file or directory.

    A directory: `config.json` (the config) and `model.safetensors`,
    `model.safetensors.index.json`, `pytorch_model.bin` or its index. A Lightning `.ckpt`:
    `state_dict` and `hyper_parameters` (its config). FileNotFoundError / ValueError name the
    file and what is wrong.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    config = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, name)):
                tensors, _ = open_checkpoint(os.path.join(path, name),
                                             unsafe_pickle=unsafe_pickle)
                return tensors, config
        raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or an index "
                                f"of either in this directory")
    if path.endswith(".index.json"):
        with open(path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(os.path.dirname(path), p) for p in files]
        if all(p.endswith(".safetensors") for p in paths):
            return _safetensors_source(paths, path), None
        merged = {}
        for p in paths:
            merged.update(_torch_load(p, unsafe_pickle))
        return _torch_source(merged, path), None
    if path.endswith(".safetensors"):
        return _safetensors_source([path], path), None
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        obj = _torch_load(path, unsafe_pickle)
        if isinstance(obj, Mapping) and "state_dict" in obj:  # Lightning
            config = _plain(obj.get("hyper_parameters")) or None
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict (name → tensor), got "
                             f"{type(obj).__name__}")
        return _torch_source(obj, path), config
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, .bin, .pt, "
                     f".ckpt or a directory with config.json")


# ---------------------------------------------------------------------------------------------
# Pure-dict helpers
# ---------------------------------------------------------------------------------------------

def set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def check_keys(src: TensorSource, expected: Iterable[str], ignore: Iterable[str],
               what: str) -> list[str]:
    """Error lines for keys of `src` not expected (and not ignored) and expected keys missing."""
    expected, ignore = set(expected), set(ignore)
    unknown = sorted(k for k in src if k not in expected and k not in ignore)
    missing = sorted(k for k in expected if k not in src)
    errors = []
    if unknown:
        errors.append(f"unmapped keys in the state dict (not part of {what}): {unknown}")
    if missing:
        errors.append(f"keys missing from the state dict: {missing}")
    return errors


def convert_tensors(src: TensorSource, table, expected_shapes) -> tuple[dict, list[str]]:
    """Apply (key, path, to_ours, _) rows of `table` to `src`, checking each result against
    `expected_shapes` (a pure dict of shapes); returns (pure params dict, error lines)."""
    params, errors = {}, []
    for key, path, to_ours, _ in table:
        if key not in src:
            continue
        want = tuple(get_path(expected_shapes, path))
        try:
            value = np.ascontiguousarray(to_ours(src[key]), dtype=np.float32)
        except ValueError as e:  # a reshape that does not fit
            errors.append(f"{key}: cannot convert shape {src.shape(key)}: {e}")
            continue
        if value.shape != want:
            errors.append(f"{key}: shape {src.shape(key)} converts to {value.shape}, but "
                          f"{'.'.join(map(str, path))} has shape {want}")
            continue
        set_path(params, path, value)
    return params, errors


def shape_problems(params, reference) -> list[str]:
    """Lines naming every leaf path of `reference` (arrays or ShapeDtypeStructs) missing from
    `params`, every extra one, and every shape that differs."""
    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = shapes(params), shapes(reference)
    return ([f"missing {k}" for k in sorted(want.keys() - have.keys())]
            + [f"extra {k}" for k in sorted(have.keys() - want.keys())]
            + [f"{k}: {have[k]}, expected {want[k]}" for k in sorted(want.keys() & have.keys())
               if have[k] != want[k]])


def abstract_shapes(model_fn: Callable[[], nnx.Module]) -> dict:
    """The pure-dict parameter shapes of the module model_fn() builds (built abstractly)."""
    model = nnx.eval_shape(model_fn)
    return jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# The DiT key table
# ---------------------------------------------------------------------------------------------

def _same(w):
    return np.asarray(w)


def _t(w):  # torch Linear (out, in) <-> kernel (in, out)
    return np.asarray(w).T


def dit_settings(state_dict, *, heads: int | None = None) -> dict[str, Any]:
    """DiT sizes read from the tensor shapes: vocab_size, width, depth, heads, mlp_ratio, causal,
    and without `causal` cond_dim and sigma_features. `heads` comes from `rotary_emb.inv_freq`
    (Dh/2 entries) unless given."""
    src = _as_source(state_dict).renamed(strip_prefix_name)
    if "vocab_embed.embedding" not in src:
        raise ValueError(f"{src.where}: no vocab_embed.embedding: not a bd3lms / MDLM / SEDD "
                         f"DiT state dict")
    vocab, width = src.shape("vocab_embed.embedding")
    depth = len({int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))})
    if heads is None:
        if "rotary_emb.inv_freq" not in src:
            raise ValueError(f"{src.where}: cannot infer the head count (no "
                             f"rotary_emb.inv_freq): pass heads")
        heads = width // (2 * src.shape("rotary_emb.inv_freq")[0])
    causal = "sigma_map.mlp.0.weight" not in src
    out = dict(vocab_size=int(vocab), width=int(width), depth=depth, heads=int(heads),
               mlp_ratio=int(src.shape("blocks.0.mlp.0.weight")[0] // width), causal=causal)
    if not causal:
        out["cond_dim"], out["sigma_features"] = (int(n) for n in
                                                  src.shape("sigma_map.mlp.0.weight"))
    return out


def dit_key_table(width: int, heads: int, depth: int, adaln: bool):
    """(torch key, pure-dict path, torch → ours, ours → torch) for every DiT parameter."""
    D, H, Dh = width, heads, width // heads
    table = [("vocab_embed.embedding", ("embed", "embedding"), _same, _same)]
    if adaln:
        for j, name in ((0, "fc1"), (2, "fc2")):
            table += [(f"sigma_map.mlp.{j}.weight", ("sigma_map", name, "kernel"), _t, _t),
                      (f"sigma_map.mlp.{j}.bias", ("sigma_map", name, "bias"), _same, _same)]
    for i in range(depth):
        p, b = f"blocks.{i}.", ("blocks", i)
        table += [
            (p + "norm1.weight", b + ("norm1", "weight"), _same, _same),
            (p + "norm2.weight", b + ("norm2", "weight"), _same, _same),
            (p + "attn_qkv.weight", b + ("attn", "qkv"), lambda w: w.T.reshape(D, 3, H, Dh),
             lambda k: k.reshape(D, 3 * D).T),
            (p + "attn_out.weight", b + ("attn", "out"), lambda w: w.T.reshape(H, Dh, D),
             lambda k: k.reshape(D, D).T),
            (p + "mlp.0.weight", b + ("mlp", "fc1", "kernel"), _t, _t),
            (p + "mlp.0.bias", b + ("mlp", "fc1", "bias"), _same, _same),
            (p + "mlp.2.weight", b + ("mlp", "fc2", "kernel"), _t, _t),
            (p + "mlp.2.bias", b + ("mlp", "fc2", "bias"), _same, _same),
        ]
        if adaln:
            table += [
                (p + "adaLN_modulation.weight", b + ("adaln", "kernel"),
                 lambda w: w.T.reshape(w.shape[1], 6, D), lambda k: k.reshape(k.shape[0], -1).T),
                (p + "adaLN_modulation.bias", b + ("adaln", "bias"), lambda w: w.reshape(6, D),
                 lambda k: k.reshape(-1)),
            ]
    table += [
        ("output_layer.norm_final.weight", ("final", "norm", "weight"), _same, _same),
        ("output_layer.linear.weight", ("final", "linear", "kernel"), _t, _t),
        ("output_layer.linear.bias", ("final", "linear", "bias"), _same, _same),
    ]
    if adaln:
        table += [
            ("output_layer.adaLN_modulation.weight", ("final", "adaln", "kernel"),
             lambda w: w.T.reshape(w.shape[1], 2, D), lambda k: k.reshape(k.shape[0], -1).T),
            ("output_layer.adaLN_modulation.bias", ("final", "adaln", "bias"),
             lambda w: w.reshape(2, D), lambda k: k.reshape(-1)),
        ]
    return table


def _dit_shapes(settings: Mapping[str, Any]) -> dict:
    kw = {k: settings[k] for k in ("cond_dim", "mlp_ratio", "causal", "sigma_features")
          if k in settings}
    return abstract_shapes(lambda: DiT(settings["vocab_size"], settings["width"],
                                       settings["depth"], settings["heads"], rngs=nnx.Rngs(0),
                                       **kw))


def dit_params(state_dict, settings: Mapping[str, Any] | None = None, *,
               ignore: Iterable[str] = DEFAULT_IGNORE) -> tuple[dict, dict]:
    """(settings, pure-dict DiT parameters) of a reference state dict (any mapping or a
    `TensorSource`). `settings` (as `dit_settings` returns; default: read from the shapes) fix
    the expected sizes. One ValueError lists every unmapped, missing or mis-shaped key and a
    `rotary_emb.inv_freq` that does not match the head width."""
    src = _as_source(state_dict).renamed(strip_prefix_name)
    settings = dict(settings or dit_settings(src))
    table = dit_key_table(settings["width"], settings["heads"], settings["depth"],
                          adaln=not settings["causal"])
    # rotary_emb.inv_freq is a buffer we recompute: checked when present, never required.
    errors = check_keys(src, [k for k, *_ in table], [*ignore, "rotary_emb.inv_freq"],
                        "the DiT")
    if "rotary_emb.inv_freq" in src:
        head_dim = settings["width"] // settings["heads"]
        got, ref = src["rotary_emb.inv_freq"], np.asarray(rotary_inv_freq(head_dim))
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-6, atol=0):
            errors.append(f"rotary_emb.inv_freq {got.shape} does not match base-1e4 rotary with "
                          f"head width {head_dim} (heads={settings['heads']})")
    params, shape_errors = convert_tensors(src, table, _dit_shapes(settings))
    errors += shape_errors
    if errors:
        raise ValueError(f"cannot load {src.where} into a DiT:\n  " + "\n  ".join(errors))
    return settings, params


def dit_state_dict(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    """Our DiT parameters (pure dict, either layer layout: unrolled or stacked by
    `scan_layers`) under the reference names (each key with `prefix`, e.g. "backbone." for a
    bd3lms Lightning state dict), plus `rotary_emb.inv_freq`."""
    params = unstack_layers(jax.tree.map(np.asarray, dict(params)))
    width = params["embed"]["embedding"].shape[1]
    heads = params["blocks"][0]["attn"]["qkv"].shape[2]
    table = dit_key_table(width, heads, len(params["blocks"]), adaln="sigma_map" in params)
    out = {prefix + key: np.ascontiguousarray(to_theirs(get_path(params, path)))
           for key, path, _, to_theirs in table}
    out[prefix + "rotary_emb.inv_freq"] = np.asarray(rotary_inv_freq(width // heads))
    return out


# ---------------------------------------------------------------------------------------------
# Loading into a model (library use and tests)
# ---------------------------------------------------------------------------------------------

def load_dit_state_dict(model: DiT, state_dict, *, ignore: Iterable[str] = DEFAULT_IGNORE
                        ) -> DiT:
    """Writes a reference state dict into `model`'s parameters in place and returns `model`;
    the sizes expected are the model's (errors as `dit_params`); stacked for a `scan_layers`
    model."""
    settings = dict(vocab_size=model.vocab_size, width=model.width, depth=model.depth,
                    heads=model.heads, mlp_ratio=model.mlp_ratio, causal=model.causal)
    if not model.causal:
        settings.update(cond_dim=model.cond_dim, sigma_features=model.sigma_map.features)
    _, params = dit_params(state_dict, settings, ignore=ignore)
    if model.scan_layers:
        params = stack_layers(params)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def dit_from_state_dict(state_dict, *, heads: int | None = None,
                        ignore: Iterable[str] = DEFAULT_IGNORE, **kwargs) -> DiT:
    """A DiT whose sizes are read from `state_dict`, with its parameters.

    kwargs go to `DiT` (e.g. time_conditioning=True for SEDD, sigma_max_period, dropout, dtype,
    scan_layers=True for stacked blocks).
    The reference code averages a per-token σ over the sequence, so `token_conditioning`
    defaults to False here.
    """
    settings = dit_settings(state_dict, heads=heads)
    settings, params = dit_params(state_dict, settings, ignore=ignore)
    kw = {k: v for k, v in settings.items() if k not in ("vocab_size", "width", "depth", "heads")}
    kw.setdefault("token_conditioning", False)
    kw.update(kwargs)
    if kw.get("scan_layers"):
        params = stack_layers(params)
    model = nnx.eval_shape(lambda: DiT(settings["vocab_size"], settings["width"],
                                       settings["depth"], settings["heads"], rngs=nnx.Rngs(0),
                                       **kw))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def state_dict_from_npz(npz: Mapping[str, Any], prefix: str = "param/") -> dict[str, np.ndarray]:
    """The `param/<key>` entries of a fixture npz as a plain state dict."""
    return {k[len(prefix):]: np.asarray(npz[k]) for k in npz.keys() if k.startswith(prefix)}
