"""Two layouts of the transformer blocks' parameters, and the conversions between them.

Unrolled (`model.scan_layers=False`): the pure-dict params hold one sub-dict per layer,
``params["blocks"][i][...]`` (i = 0 … N−1; keys are ints, or digit strings in trees restored
without a template). Stacked (`model.scan_layers=True`): ``params["blocks"][...]`` is ONE block's
tree whose every leaf carries a leading depth axis N (logical axis name "layers"), what the
scanned model (`DiT` / `GPT2` with ``scan_layers=True``) slices with `jax.lax.scan`.

The functions here are pure and work on any pytree that contains parameter dicts (a dict with a
"blocks" key): the params themselves, a `TrainState` (params, optimizer moments, EMA), or their
abstract versions (`jax.ShapeDtypeStruct` leaves, whose NamedShardings gain or lose the leading
axis, replicated). Leaves may be numpy arrays (kept numpy), jax arrays or ShapeDtypeStructs.
Shapes: N depth; a layer leaf (*S) is (N, *S) when stacked.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BLOCKS = "blocks"


def _is_params(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get(BLOCKS), dict)


def _is_layer_key(key: Any) -> bool:
    return isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit())


def blocks_stacked(params: dict) -> bool:
    """Whether one params dict's "blocks" are stacked (keys are sub-module names) rather than
    unrolled (keys are layer indices). No blocks (depth 0) counts as unrolled."""
    blocks = params[BLOCKS]
    return bool(blocks) and not all(_is_layer_key(k) for k in blocks)


def find_layout(tree: Any) -> bool | None:
    """True (stacked) / False (unrolled) for the first params dict found in `tree`, None if it
    holds none. Walks dicts, lists, tuples and other pytree nodes (a TrainState, optax states)."""
    found = []

    def visit(node):
        if _is_params(node):
            found.append(blocks_stacked(node))
        return node
    jax.tree.map(visit, tree, is_leaf=lambda x: _is_params(x) or x is None)
    return found[0] if found else None


def _stack_leaves(*leaves):
    """N per-layer leaves (*S) -> one (N, *S): numpy, jax or abstract (sharding: replicated
    along the new axis)."""
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sh = first.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(None, *sh.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sh)
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _layer_leaf(x, i: int):
    """Layer i (*S) of a stacked leaf (N, *S)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype, sharding=sh)
    return x[i]


def _depth(blocks: dict) -> int:
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(blocks)}
    if len(sizes) != 1:
        raise ValueError(f"stacked blocks disagree on the layer count (leading axes "
                         f"{sorted(sizes)})")
    return sizes.pop()


def stack_params(params: dict) -> dict:
    """One params dict, unrolled -> stacked (a stacked one is returned as is): blocks
    {i: tree} (N layers, each leaf (*S)) -> blocks tree with leaves (N, *S). Other keys are
    shared, not copied. ValueError if the layers differ in structure or the indices are not
    0 … N−1."""
    if blocks_stacked(params):
        return params
    blocks = params[BLOCKS]
    order = sorted(blocks, key=int)
    if [int(k) for k in order] != list(range(len(order))):
        raise ValueError(f"params['blocks'] has layers {[int(k) for k in order]}, not 0 … N−1")
    if not order:
        raise ValueError("params['blocks'] is empty: nothing to stack (depth 0)")
    layers = [blocks[k] for k in order]
    try:
        stacked = jax.tree.map(_stack_leaves, *layers)
    except ValueError as e:
        raise ValueError(f"the layers of params['blocks'] differ in structure: {e}") from None
    return {**params, BLOCKS: stacked}


def unstack_params(params: dict) -> dict:
    """One params dict, stacked -> unrolled (an unrolled one is returned as is): blocks tree
    with leaves (N, *S) -> {i: tree with leaves (*S)} keyed by int i = 0 … N−1."""
    if not blocks_stacked(params):
        return params
    blocks = params[BLOCKS]
    n = _depth(blocks)
    return {**params, BLOCKS: {i: jax.tree.map(lambda x, i=i: _layer_leaf(x, i), blocks)
                               for i in range(n)}}


def to_layout(tree: Any, stacked: bool) -> Any:
    """Every params dict inside `tree` (params, a TrainState with its optimizer moments and EMA,
    abstract or concrete) converted to the stacked (True) or unrolled (False) layout."""
    convert = stack_params if stacked else unstack_params
    return jax.tree.map(lambda x: convert(x) if _is_params(x) else x, tree,
                        is_leaf=lambda x: _is_params(x) or x is None)


def stack_layers(tree: Any) -> Any:
    """`to_layout(tree, stacked=True)`."""
    return to_layout(tree, True)


def unstack_layers(tree: Any) -> Any:
    """`to_layout(tree, stacked=False)`."""
    return to_layout(tree, False)


def stack_modules(modules: list) -> Any:
    """N structurally equal NNX modules (e.g. freshly built blocks) -> ONE module of the same
    class whose every Variable is their values stacked, (*S) -> (N, *S), with "layers"
    prepended to its logical axis names (`out_sharding` metadata; `sharding.py` rules map it).
    Building the N modules first, in order, draws the same initial values as an unrolled
    stack. Works under `nnx.eval_shape`."""
    from flax import nnx
    if not modules:
        raise ValueError("stack_modules needs at least one module (config.model.depth >= 1)")
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable):
            names = node.get_metadata().get("out_sharding")
            if names is not None:
                node.set_metadata(out_sharding=("layers",) + tuple(names))
    return stacked
