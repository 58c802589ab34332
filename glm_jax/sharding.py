"""Sharding by logical axis names: the model names axes, one table maps them to mesh axes.

Parameters carry `logical_axes` metadata (e.g. `("layers", "embed", "mlp")`); activations are
annotated with `constrain(x, ("act_batch", "act_genes", "act_embed"))`. `LOGICAL_AXIS_RULES` is
the only place that decides which mesh axis shards what (MaxText / Levanter style).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `use_mesh`."""
    mesh = _active["mesh"]
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes)))
