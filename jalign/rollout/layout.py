"""The layout RL generates in (``algorithm.rollout_layout``).

``train`` (default): the sampler reads the actor's params in their training layout. With ``mesh.fsdp > 1``
every decode step then all-gathers each layer's fsdp-sharded weights again: per generated token, each device
receives ``(fsdp - 1) / fsdp`` of the layers' weights of its tensor slice (:func:`gathered_per_step`).

``tensor``: before each rollout the actor's params are resharded once into a decode-friendly copy that is
tensor-parallel only (``embed`` -> no mesh axis, i.e. replicated over ``data``/``fsdp``), cast to the compute
dtype (``model.dtype``; every layer casts its weights to it anyway, so the samples are the same bit for bit).
The copy lives for the rollout only; it costs ``params / tensor`` in the compute dtype per device and one
all-gather of the same size, instead of that all-gather at every decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.models import params as params_lib
from jalign.models.params import DTYPES

LAYOUTS = {"train": {}, "tensor": {"embed": None}}  # logical-axis overrides of the mesh rules


def rollout_rules(rules: dict, layout: str) -> dict:
    """The mesh rules the sampler runs with under ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown rollout layout {layout!r} (known: {', '.join(LAYOUTS)})")
    return {**rules, **LAYOUTS[layout]}


class RolloutLayout:
    """How the actor's params reach the sampler: ``reshard(params)`` (identity for ``train``), ``rules``."""

    def __init__(self, layout: str, decls: dict, model_cfg, mesh, rules):
        self.layout, self.mesh = layout, mesh
        self.rules = rollout_rules(rules, layout)
        self.dtype = DTYPES[model_cfg.dtype]
        self.shardings = params_lib.param_shardings(decls, mesh, self.rules)
        self._reshard = None
        if layout != "train":
            cast = lambda x: x.astype(self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            self._reshard = jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=self.shardings)

    @property
    def active(self) -> bool:
        return self._reshard is not None

    def reshard(self, params):
        """The sampler's copy of ``params`` (the params themselves under the training layout)."""
        return params if self._reshard is None else self._reshard(params)

    def abstract(self, params):
        """The abstract sampler copy of abstract ``params`` (for ``jalign plan``)."""
        if self._reshard is None:
            return params
        out = jax.eval_shape(self._reshard, params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), out, self.shardings)

    def reshard_program(self, params):
        from jalign.abstract import Program

        return Program(self._reshard, (params,), uses=("params",), note="actor params -> tensor-only copy")


def gathered_per_step(params, sampler_params) -> int:
    """Bytes one device receives per decode step when the sampler reads the stacked layer weights of
    ``params`` in their own layout but needs them as laid out in ``sampler_params`` (abstract trees with
    shardings): the partitioner all-gathers each layer's fsdp-sharded weights inside the layer loop at every
    step (in the params' dtype: the gather comes before the cast to the compute dtype). The embedding and LM head
    are loop-invariant and gathered once per rollout."""
    from jalign.abstract import shard_bytes
    from jalign.models.params import flatten

    total = 0
    mine, need = flatten(params), flatten(sampler_params)
    for path, p in mine.items():
        if path.startswith("layers/"):
            total += max(shard_bytes(need[path]) // need[path].dtype.itemsize - shard_bytes(p) // p.dtype.itemsize,
                         0) * p.dtype.itemsize
    return total
