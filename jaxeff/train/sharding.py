"""Mesh construction and logical-axis sharding.

The trainer uses a ``Mesh`` with axes ``('data', 'fsdp', 'tensor')`` in **Auto** axis mode (the
GSPMD style that ``pjit`` became): inputs and outputs of the jitted step carry explicit
``NamedSharding``s, activations get ``with_sharding_constraint`` hints from logical names, and
XLA propagates the rest. (jax 0.11's ``make_mesh`` defaults to Explicit axes, i.e. sharding in
types; we pass ``AxisType.Auto`` deliberately so models need no sharding-aware code.)

Logical names map to mesh axes by the config's rules. A parameter dimension that the mapped mesh
axes do not divide is replicated along that dimension instead of failing (e.g. 2 KV heads on a
tensor axis of 4).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxeff.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    sizes = [getattr(mesh_cfg, a) for a in AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {' x '.join(f'{a}={s}' for a, s in zip(AXES, sizes))} does not divide the {n_devices} available devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)


def build_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(rules, name):
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def logical_to_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """Map one logical ``PartitionSpec`` to a mesh ``PartitionSpec`` for an array of ``shape``."""
    out, used = [], set()
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in _mesh_axes(rules, name) if a not in used and mesh.shape[a] > 1) if name else ()
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def param_shardings(logical_tree, abstract_params, mesh: Mesh, rules):
    """NamedShardings for a parameter tree from its logical specs and shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules)), logical_tree, abstract_params, is_leaf=lambda s: isinstance(s, P)
    )


def shardings_like_params(tree, params_abstract, params_shardings, mesh: Mesh):
    """Shardings for a tree (optimizer state, method state) whose leaves mirror parameters.

    A leaf whose key path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding (Adam's mu/nu, momentum); everything else (counts, scalars) is replicated.
    """
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0], jax.tree.leaves(params_shardings)):
        by_path[tuple(_key(k) for k in path)] = (x.shape, s)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = tuple(_key(k) for k in path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and tuple(hit[0]) == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def _key(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Batch rows are split over the mesh axes the 'batch' rule names; other dims replicated."""
    axes = tuple(a for a in _mesh_axes(rules, "batch") if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_divisor(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in _mesh_axes(rules, "batch"))
