"""Device mesh, logical-axis rules and the shardings of parameters and batches.

One mesh with axes ("data", "fsdp", "tensor") built with explicit `AxisType.Auto` axes (classic
GSPMD propagation; `jax.make_mesh` defaults to Explicit in jax 0.10). Parameters carry logical
axis names (models/layers.py); `MeshConfig.rules` maps each name to mesh axes. A dimension that
the mapped mesh axes do not divide stays replicated, so tiny test models shard on any mesh.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dlm_jax.config import ConfigError, MeshConfig


def resolve_mesh_shape(shape: tuple, num_devices: int) -> tuple[int, ...]:
    """Replace the one -1 in `shape` by what makes the product equal `num_devices`."""
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"config.mesh.shape={tuple(shape)} cannot be completed for "
                              f"{num_devices} devices ({num_devices} is not divisible by {known})")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"config.mesh.shape={tuple(shape)} uses {math.prod(shape)} devices but "
                          f"{num_devices} are available")
    return tuple(int(s) for s in shape)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` with Auto axes named `cfg.axes`.

    By default all devices; on a single host a fully specified smaller shape (e.g. (1, 1, 1))
    takes the first devices.
    """
    if devices is None:
        devices = jax.devices()
        wanted = math.prod(cfg.shape)
        if -1 not in cfg.shape and jax.process_count() == 1 and 0 < wanted < len(devices):
            devices = devices[:wanted]  # an explicit smaller mesh on one host: the first devices
    devices = list(devices)
    shape = resolve_mesh_shape(tuple(cfg.shape), len(devices))
    return jax.make_mesh(shape, tuple(cfg.axes), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def mesh_axes_for(name, rules: dict) -> tuple[str, ...]:
    """The mesh axes `rules` (a dict of `MeshConfig.rules`) maps logical axis `name` to: a
    tuple, empty for None or an unmapped name."""
    if name is None:
        return ()
    axes = rules.get(name)
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: tuple, shape: tuple[int, ...], mesh, rules) -> P:
    """PartitionSpec for one array with logical axis `names` under `rules`.

    A mesh axis is used at most once per array; an array dimension not divisible by the product of
    its mesh axes' sizes is left replicated.
    """
    rules = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh, rules) -> Any:
    """Pure-dict tree of NamedShardings matching `nnx.to_pure_dict(abstract_state)`."""
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(abstract_state))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, logical_to_spec(tuple(spec), shape, mesh, rules)
                                          if len(spec) else P()),
        logical, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, rules) -> NamedSharding:
    """Sharding of a (batch, ...) array: batch split over the rule for "batch"."""
    axes = tuple(a for a in mesh_axes_for("batch", dict(rules)) if a in mesh.shape)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))


def batch_divisor(mesh, rules) -> int:
    """The number of shards of the batch dimension; global batch sizes must be multiples."""
    axes = tuple(a for a in mesh_axes_for("batch", dict(rules)) if a in mesh.shape)
    return math.prod(mesh.shape[a] for a in axes) if axes else 1
