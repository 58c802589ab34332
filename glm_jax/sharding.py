"""Sharding by logical axis names: the model names axes, one table maps them to mesh axes.

Parameters carry `logical_axes` metadata (e.g. `("layers", "embed", "mlp")`); activations are
annotated with `constrain(x, ("act_batch", "act_genes", "act_embed"))`. `LOGICAL_AXIS_RULES` is
the only place that decides which mesh axis shards what (MaxText / Levanter style).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_genes", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv_genes", None),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("gene_features", None),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("distance", None),
    ("norm", None),
    ("token_type", None),
    ("hypotheses", None),
    ("label", None),
)

_active: dict = {"mesh": None, "rules": LOGICAL_AXIS_RULES}


def logical_to_spec(logical_axes: Sequence[str | None], rules=None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
    table = dict(rules if rules is not None else _active["rules"])
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        free = tuple(axis for axis in mesh_axes if axis not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Activates `mesh` and `rules` for `constrain` inside the block (and under jit tracing)."""
    previous = dict(_active)
    _active.update(mesh=mesh, rules=rules)
    try:
        yield mesh
    finally:
        _active.update(previous)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_mesh` block, or None."""
    return _active["mesh"]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
    mesh = _active["mesh"]
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes)))


# --- meshes and parameter shardings (used by training) -----------------------------------------

def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes from `config.mesh` ({data, fsdp, tensor}); one axis may be -1 = the rest.

    E.g. {data: -1, fsdp: 4, tensor: 1} on 8 devices -> (2, 4, 1).
    """
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"{num_devices} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, every host).

    `create_device_mesh` orders devices so the inner axes (tensor, then fsdp) sit on the fastest
    links (NVLink / ICI neighbours); with explicit `devices` the given order is kept.
    """
    shape = resolve_mesh_shape(mesh_config, len(devices) if devices is not None else jax.device_count())
    if devices is None:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_axes_tree(state) -> dict:
    """Nested {name: logical axes tuple} of an `nnx.State` whose Variables carry `logical_axes`."""
    from flax import nnx
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def tree_shardings(mesh: Mesh, axes_tree, rules=None):
    """{name: logical axes} -> {name: NamedSharding} (same nesting); rules default to the active ones."""
    return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)), axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Input batches: the leading (contig) axis split over the batch mesh axes, the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def weight_sharding_devices(mesh: Mesh) -> int:
    """Devices a perfectly sharded parameter is split over: the product of the non-batch axes."""
    return mesh.shape["fsdp"] * mesh.shape["tensor"]


def unsharded_fraction(params, mesh: Mesh, min_size: int = 0) -> float:
    """Share of a device's parameter elements beyond a perfect split over fsdp x tensor,
    counting tensors of at least `min_size` elements (MaxText's `assert_params_sufficiently_sharded`
    measure). 0 when all of them are split over every weight-sharding device.

    params: pytree of sharded arrays or ShapeDtypeStructs with `.sharding`.
    """
    leaves = [x for x in jax.tree.leaves(params) if x.size >= min_size]
    total = sum(x.size for x in leaves)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in leaves)
    perfect = total / weight_sharding_devices(mesh)
    return (per_device - perfect) / per_device if per_device else 0.0


def assert_params_sufficiently_sharded(params, mesh: Mesh, tolerance: float, min_size: int = 1 << 20) -> None:
    """Fails when more than `tolerance` of each device's large-tensor elements (tensors of
    >= `min_size` elements) are replicated copies, naming the largest unsharded tensors: the
    symptom of a missing or wrong logical-axis rule. Small tensors (biases, norms) are ignored."""
    fraction = unsharded_fraction(params, mesh, min_size)
    if fraction <= tolerance:
        return
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    whole = sorted(((x.size, jax.tree_util.keystr(path)) for path, x in flat
                    if x.size >= min_size and math.prod(x.sharding.shard_shape(x.shape)) == x.size), reverse=True)
    raise AssertionError(
        f"{fraction:.1%} of each device's large-parameter elements are replicated beyond a perfect split over "
        f"fsdp x tensor = {weight_sharding_devices(mesh)} devices (tolerance {tolerance:.1%}); "
        f"largest unsharded: {whole[:5]}")
