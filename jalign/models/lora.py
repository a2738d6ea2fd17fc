"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on a frozen base, as pure functions.

    decls = declare_lora(cfg, lora_cfg)                        # A, B per target, stacked on "layers"
    adapters = init_params(decls, seed, shardings=param_shardings(decls, mesh))   # B = 0
    params = with_adapters(base, adapters, lora_cfg, key=k)    # what transformer.forward takes
    merged = merge_adapters(base, adapters, lora_cfg)          # plain params W + (alpha/r) A B

For a linear weight W [in..., out...] (our layout: input axes first, e.g. q [D, H, hd], o [H, hd, D]):

    y = x W + (alpha / r) * (dropout(x) A) B,    A [in..., r],  B [r, out...]

(Hu et al., eq. 3, with the alpha / r scaling of their section 4.1; the dropout on the adapter input
and the init follow PEFT: A ~ U(+-1/sqrt(fan_in)), torch's kaiming_uniform(a=sqrt(5)) of ``lora_A``, and
B = 0, so training starts exactly at the base). The adapter is applied to the activations inside the
layer scan rather than folded into W there: no [in, out] temporary per layer, a backward pass costing
tokens * (in + out) * r instead of a full tokens * in * out weight gradient, and the dropout on the
adapter input needs x anyway. The adapters are ordinary declared parameters (logical axes
``("layers", *in_axes, "lora_rank")`` and ``("layers", "lora_rank", *out_axes)``), so they shard,
checkpoint and restore like the base. The base may hold plain arrays or quantised nodes
(``jalign.models.quant``): ``linear`` dequantises those on use.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.config import LoRAConfig, ModelConfig
from jalign.models import fp8, quant
from jalign.models.params import ParamDecl, is_decl

TARGETS = tuple(quant.LINEARS)  # q, k, v, o, gate, up, down


@dataclasses.dataclass(frozen=True)
class UniformDecl(ParamDecl):
    """A ParamDecl initialised U(-bound, bound), seeded by (seed, path) like every other parameter."""

    bound: float = 1.0

    def initialize(self, seed: int, path: str, dtype) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        return rng.uniform(-self.bound, self.bound, self.shape).astype(dtype)


def resolve_targets(lora_cfg: LoRAConfig) -> tuple[str, ...]:
    """The projection names adapted, in a fixed order; "all-linear" means all seven."""
    t = lora_cfg.targets
    if t == "all-linear":
        return TARGETS
    if isinstance(t, str) or not t:
        raise ValueError(f"model.lora.targets: expected 'all-linear' or a non-empty list of {list(TARGETS)}, got {t!r}")
    bad = [n for n in t if n not in TARGETS]
    if bad:
        raise ValueError(f"model.lora.targets: unknown {bad} (known: {', '.join(TARGETS)} or 'all-linear')")
    return tuple(n for n in TARGETS if n in t)


def lora_scale(lora_cfg: LoRAConfig) -> float:
    if lora_cfg.rank <= 0:
        raise ValueError(f"model.lora.rank: must be positive, got {lora_cfg.rank}")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ValueError(f"model.lora.dropout: must be in [0, 1), got {lora_cfg.dropout}")
    return lora_cfg.alpha / lora_cfg.rank


def declare_lora(cfg: ModelConfig, lora_cfg: LoRAConfig) -> dict:
    """``{"layers": {target: {"a": decl, "b": decl}}}``: the trained parameters of a LoRA run."""
    from jalign.models.transformer import declare_params  # transformer imports this module

    lora_scale(lora_cfg)
    r = lora_cfg.rank
    base = declare_params(cfg)["layers"]
    layers = {}
    for name in resolve_targets(lora_cfg):
        d, n_in = base[name], quant.LINEARS[name]
        assert d.axes[0] == "layers", (name, d.axes)
        in_shape, out_shape = d.shape[1:1 + n_in], d.shape[1 + n_in:]
        in_axes, out_axes = d.axes[1:1 + n_in], d.axes[1 + n_in:]
        layers[name] = {
            "a": UniformDecl((cfg.layers, *in_shape, r), ("layers", *in_axes, "lora_rank"), "uniform",
                             bound=1.0 / math.sqrt(math.prod(in_shape))),
            "b": ParamDecl((cfg.layers, r, *out_shape), ("layers", "lora_rank", *out_axes), "zeros"),
        }
    return {"layers": layers}


def param_count(tree) -> int:
    """Number of scalars in a tree of declarations or arrays."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=is_decl))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """A frozen weight with its adapter; ``lax.scan`` slices every array field per layer."""

    base: Any  # [..., in..., out...] array, or a quantised node (dict)
    a: jax.Array  # [..., in..., r]
    b: jax.Array  # [..., r, out...]
    key: Optional[jax.Array]  # per-layer dropout keys [..., key], or None: no dropout
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)


def with_adapters(base: dict, adapters: dict, lora_cfg: LoRAConfig, *, key: Optional[jax.Array] = None) -> dict:
    """The params ``transformer.forward`` takes: each targeted layer weight becomes a ``LoRAWeight``.

    Pure, cheap (no arithmetic: the adapter is applied inside the layer scan). ``key`` enables LoRA
    dropout (training); without it, or with ``dropout == 0``, none is applied. Entries of ``adapters``
    other than "layers" (e.g. a trained score head) are taken as they are, replacing or adding to base.
    """
    scale = lora_scale(lora_cfg)
    layers = dict(base["layers"])
    for name, ab in adapters.get("layers", {}).items():
        if name not in quant.LINEARS or name not in layers:
            raise KeyError(f"adapters/layers/{name}: no such linear weight in the base params")
        keys = None
        if key is not None and lora_cfg.dropout > 0:
            keys = jax.random.split(jax.random.fold_in(key, TARGETS.index(name)), ab["a"].shape[0])
        layers[name] = LoRAWeight(layers[name], ab["a"], ab["b"], keys, scale, lora_cfg.dropout)
    out = {**base, "layers": layers}
    out.update({k: v for k, v in adapters.items() if k != "layers"})
    return out


def _split_einsum(eq: str) -> tuple[str, str, str, str]:
    """"btd,dhk->bthk" -> (lhs "btd", weight input chars "d", weight output chars "hk", out "bthk")."""
    lhs, rest = eq.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    ins = "".join(c for c in rhs if c in lhs)
    outs = "".join(c for c in rhs if c not in lhs)
    if rhs != ins + outs:
        raise ValueError(f"linear {eq!r}: the weight's input axes must come before its output axes")
    return lhs, ins, outs, out


def linear(eq: str, x: jax.Array, w, dtype) -> jax.Array:
    """``einsum(eq, x, W)`` for a plain array, a quantised node (dequantised here), a LoRAWeight or an
    ``fp8.Fp8Weight`` (``model.matmul_fp8``: the matmul runs in fp8, see ``jalign.models.fp8``)."""
    if isinstance(w, fp8.Fp8Weight):
        return fp8.fp8_einsum(eq, x, w.w, dtype)
    if isinstance(w, LoRAWeight):
        y = linear(eq, x, w.base, dtype)
        lhs, ins, outs, out = _split_einsum(eq)
        r = next(c for c in "rzyxwvu" if c not in eq)
        mid = "".join(c for c in lhs if c not in ins) + r
        xa = x
        if w.key is not None and w.dropout > 0:
            keep = jax.random.bernoulli(w.key, 1.0 - w.dropout, x.shape)
            xa = jnp.where(keep, x / (1.0 - w.dropout), jnp.zeros_like(x))
        u = jnp.einsum(f"{lhs},{ins}{r}->{mid}", xa, w.a.astype(dtype)) * jnp.asarray(w.scale, dtype)
        return y + jnp.einsum(f"{mid},{r}{outs}->{out}", u, w.b.astype(dtype))
    if quant.is_quantized(w):
        # Rematerialised: the backward pass dequantises again from the codes. Otherwise the scan keeps
        # each layer's dequantised weight as a residual, a full-precision copy of the base in training.
        return jax.checkpoint(lambda x, w: jnp.einsum(eq, x, quant.dequantize(w, dtype)))(x, w)
    return jnp.einsum(eq, x, w.astype(dtype))


@jax.jit
def _merge_one(w, a, b, scale):
    L, r = a.shape[0], a.shape[-1]
    delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                       b.reshape(L, r, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def merge_adapters(base: dict, adapters: dict, lora_cfg: LoRAConfig, *, dtype=None) -> dict:
    """Plain params with W' = W + (alpha / r) A B folded in (for export and fast generation).

    A quantised base is dequantised first (to ``dtype``, default float32); plain weights keep their
    dtype. Non-"layers" entries of ``adapters`` (trained heads) are included as they are.
    """
    scale = lora_scale(lora_cfg)
    deq_dtype = dtype or jnp.float32
    out = quant.dequantize_params(base, deq_dtype)
    layers = dict(out["layers"])
    for name, ab in adapters.get("layers", {}).items():
        layers[name] = _merge_one(layers[name], ab["a"], ab["b"], jnp.float32(scale))
    out = {**out, "layers": layers}
    out.update({k: v for k, v in adapters.items() if k != "layers"})
    if dtype is not None:
        out = jax.tree.map(lambda x: x.astype(dtype), out)
    return out


def trainable_summary(cfg: ModelConfig, lora_cfg: LoRAConfig) -> dict:
    """Trainable (adapter) and total parameter counts from the declarations alone."""
    from jalign.models.transformer import declare_params

    n_lora, n_base = param_count(declare_lora(cfg, lora_cfg)), param_count(declare_params(cfg))
    return {"trainable": n_lora, "base": n_base, "trainable_fraction": n_lora / n_base}


__all__ = ["LoRAWeight", "UniformDecl", "TARGETS", "declare_lora", "with_adapters", "linear", "merge_adapters",
           "param_count", "resolve_targets", "lora_scale", "trainable_summary"]
