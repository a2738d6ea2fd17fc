"""Logical axis names -> mesh axes, PartitionSpec derivation, validation, activation constraints.

Parameters and activations are annotated with *logical* axis names ("embed", "heads", ...). A rules
table maps each to mesh axes; everything else (param shardings, optimizer-state shardings, activation
constraints) derives from it, so a new layout is one table change.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Mapping, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = Union[None, str, tuple[str, ...]]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    "embed": "fsdp",
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "lora_rank": None,
    "attributes": None,
    "cache_seq": None,
}


class ShardingRuleError(ValueError):
    pass


def make_rules(overrides: Optional[Mapping[str, object]] = None) -> dict[str, MeshAxes]:
    """DEFAULT_RULES updated with ``overrides`` (lists become tuples); unknown mesh axes are rejected."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in ("data", "fsdp", "tensor", "sequence"):
                raise ShardingRuleError(f"mesh.rules.{name}: unknown mesh axis {a!r}")
        rules[name] = axes
    return rules


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
                    where: str = "") -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis may be used once per spec."""
    out, used = [], set()
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingRuleError(f"{where}: logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        axes = rules[name]
        flat = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        for a in flat:
            if a in used:
                raise ShardingRuleError(
                    f"{where}: mesh axis {a!r} is used twice in logical axes {tuple(logical_axes)}"
                )
            used.add(a)
        out.append(axes)
    return PartitionSpec(*out)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    n = 1
    for a in (axes if isinstance(axes, tuple) else (axes,)):
        n *= mesh.shape[a]
    return n


def validate_param_specs(shapes: Mapping[str, tuple], logical: Mapping[str, Sequence[Optional[str]]],
                         mesh: Mesh, rules: Mapping[str, MeshAxes]) -> dict[str, PartitionSpec]:
    """Specs for flat {path: shape}; raises naming the parameter when a dimension does not divide."""
    specs = {}
    for path, shape in shapes.items():
        axes = logical[path]
        if len(axes) != len(shape):
            raise ShardingRuleError(f"{path}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
        spec = logical_to_spec(axes, rules, where=path)
        for dim, (size, mesh_axes, name) in enumerate(zip(shape, spec, axes)):
            n = _axis_size(mesh, mesh_axes)
            if size % n:
                raise ShardingRuleError(
                    f"{path}: dimension {dim} ({name}={size}) is not divisible by mesh axes {mesh_axes} of size {n}"
                )
        specs[path] = spec
    return specs


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


# ---- activation constraints --------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jalign_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES):
    """Within this context (while tracing), ``constrain`` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Optional[Mesh]:
    cur = _ACTIVE.get()
    return cur[0] if cur else None


def active_rules() -> tuple[Optional[Mesh], Mapping[str, MeshAxes]]:
    """(mesh, rules) of the ``use_rules`` context, or (None, DEFAULT_RULES) outside one."""
    cur = _ACTIVE.get()
    return cur if cur else (None, DEFAULT_RULES)


def constrain(x: jax.Array, logical_axes: Iterable[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op outside ``use_rules`` (single device code)."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    spec = logical_to_spec(tuple(logical_axes), rules)
    # Drop mesh axes that do not divide the dimension (e.g. batch 1 at decode time) instead of failing.
    fixed = []
    for size, axes in zip(x.shape, spec):
        fixed.append(axes if size % _axis_size(mesh, axes) == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fixed)))
