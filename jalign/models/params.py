"""Parameters are declared once (shape, logical axes, initializer); everything else derives from that.

``declare_params(cfg)`` returns a nested dict of ``ParamDecl``. From it come: random init, abstract
shapes (``jax.ShapeDtypeStruct``), shardings (via ``sharding.rules``), optimizer-state shardings and the
checkpoint layout (the same nested dict of arrays).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding import rules as rules_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class ParamDecl:
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str = "normal"  # "normal" (std), "zeros", "ones"
    std: float = 0.02

    def initialize(self, seed: int, path: str, dtype) -> np.ndarray:
        """Host-side init (NumPy), seeded by (seed, path): no XLA compile, identical on every process."""
        if self.init == "zeros":
            return np.zeros(self.shape, dtype)
        if self.init == "ones":
            return np.ones(self.shape, dtype)
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        return (self.std * rng.standard_normal(self.shape, np.float32)).astype(dtype)


def is_decl(x) -> bool:
    return isinstance(x, ParamDecl)


def flatten(tree) -> dict:
    """Nested dicts -> {"layers/attn/q": leaf, ...}; the path string is also the name used in errors."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(tree, "")
    return flat


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


flatten_decls = flatten


def init_params(decls, seed, dtype=jnp.float32, shardings=None):
    """Random parameters, each leaf seeded from (seed, its path) so adding a parameter changes no other.

    Generated on the host with NumPy (random init through XLA costs seconds of compile per tensor on
    CPU) and placed with ``make_array_from_callback``, so each device receives only its own shard.
    ``seed`` may be an int or a JAX key.
    """
    if isinstance(seed, jax.core.Tracer):
        raise TypeError("init_params runs on the host: call it outside jax.jit (pass shardings= to place it)")
    if not isinstance(seed, int):
        seed = int(np.asarray(jax.random.key_data(seed)).reshape(-1)[-1])
    flat = flatten_decls(decls)
    flat_shard = flatten(shardings) if shardings is not None else {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = {}
    for path, decl in flat.items():
        host = decl.initialize(seed, path, np_dtype)
        if path in flat_shard:
            out[path] = jax.make_array_from_callback(host.shape, flat_shard[path], lambda idx, h=host: h[idx])
        else:
            out[path] = jnp.asarray(host)
    return unflatten(out)


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
    return unflatten(specs)


def param_shardings(decls, mesh: Mesh, rules=rules_lib.DEFAULT_RULES):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(decls, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


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
