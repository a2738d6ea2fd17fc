"""Parameters are declared once (shape, logical axes, initializer); everything else derives from that.

``declare_params(cfg)`` returns a nested dict of ``ParamDecl``. From it come: random init, abstract
shapes (``jax.ShapeDtypeStruct``), shardings (via ``sharding.rules``), optimizer-state shardings and the
checkpoint layout (the same nested dict of arrays).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding import rules as rules_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class ParamDecl:
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str = "normal"  # "normal" (std), "zeros", "ones"
    std: float = 0.02

    def initialize(self, key, dtype) -> jax.Array:
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        return (self.std * jax.random.normal(key, self.shape, jnp.float32)).astype(dtype)


def is_decl(x) -> bool:
    return isinstance(x, ParamDecl)


def flatten_decls(decls) -> dict[str, ParamDecl]:
    """{"layers/attn/q": decl, ...}; the path string is also the name used in errors and checkpoints."""
    flat = {}

    def walk(node, prefix):
        if is_decl(node):
            flat[prefix] = node
            return
        for k, v in node.items():
            walk(v, f"{prefix}/{k}" if prefix else k)

    walk(decls, "")
    return flat


def init_params(decls, key: jax.Array, dtype=jnp.float32):
    """Random parameters; each leaf gets a key folded from its path so adding a param changes no other."""
    flat = flatten_decls(decls)
    import zlib

    def leaf(path_decl):
        path, decl = path_decl
        return decl.initialize(jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF), dtype)

    return _unflatten({p: leaf((p, d)) for p, d in flat.items()})


def abstract_params(decls, dtype=jnp.float32):
    return jax.tree.map(lambda d: jax.ShapeDtypeStruct(d.shape, dtype), decls, is_leaf=is_decl)


def logical_axes(decls):
    return jax.tree.map(lambda d: d.axes, decls, is_leaf=is_decl)


def param_specs(decls, mesh: Mesh, rules=rules_lib.DEFAULT_RULES):
    """PartitionSpec per parameter; validation names the parameter path when a dimension does not divide."""
    flat = flatten_decls(decls)
    specs = rules_lib.validate_param_specs(
        {p: d.shape for p, d in flat.items()}, {p: d.axes for p, d in flat.items()}, mesh, rules
    )
    return _unflatten(specs)


def param_shardings(decls, mesh: Mesh, rules=rules_lib.DEFAULT_RULES):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(decls, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _unflatten(flat: dict):
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def shardings_like_params(tree, params_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose params-shaped subtrees follow the params.

    Any subtree with exactly the params' tree structure gets the params' shardings (Adam's mu/nu);
    every other leaf (step counts, scalars) is replicated.
    """
    p_struct = jax.tree.structure(params_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params_like(x):
        try:
            return jax.tree.structure(x) == p_struct and not is_decl(x)
        except Exception:
            return False

    def assign(x):
        if is_params_like(x):
            return params_shardings
        return replicated

    return jax.tree.map(assign, tree, is_leaf=is_params_like)
