"""A frozen base stored quantised (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), dequantised on use.

    qbase = quantize_params(base, decls, "nf4")                 # the layers' linear weights quantised
    decls_q = declare_quantized(decls, "nf4")                   # -> param_shardings(decls_q, mesh)
    hidden = forward(qbase, ...)                                # each weight dequantised inside the scan

Formats (the number of stored bits per weight in brackets; scales are float32):
- ``int8``: per-output-channel absmax, w ~= q * s with s = absmax / 127.5, q in [-128, 127] (8 + 32/in).
- ``nf4``: 4-bit NormalFloat, the QLoRA code book (paper, appendix E) scaled by the absmax of each
  block of 64 consecutive values along d_model ("embed"): w ~= c[q] * absmax_block (4 + 32/64 = 4.5).
- ``nf4_dq``: nf4 whose block absmaxes are themselves quantised (QLoRA's "double quantisation"):
  asymmetric int8 in blocks of up to 256 along their longest axis (4 + 8/64 + 40/(64*256) ~= 4.13).
  QLoRA uses FP8 for this second level; int8 with a zero point has a finer grid on the positive range.

A quantised weight is a plain dict ``{"qvalue", "scale"[, "zero_point"]}`` (the fields of qwix's
``QArray``; ``scale`` may itself be such a dict), so flatten/param_specs/abstract shapes, scan slicing
and device_put work unchanged, and the format is read from the dtype of ``qvalue`` (uint4: nf4, int8).
Quantising and dequantising are qwix's (``qwix.quantize``/``qwix.dequantize``, pure functions on
arrays); XLA stores uint4 packed, two codes per byte. Embedding, lm head, norms and biases stay in
their dtype (as in QLoRA / bitsandbytes, which quantise only the blocks' linear layers).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models.params import ParamDecl, abstract_params, flatten, param_shardings, unflatten
from sharding.rules import DEFAULT_RULES

FORMATS = ("int8", "nf4", "nf4_dq")
# The layers' linear weights and how many input axes follow "layers" (the rest are output axes).
LINEARS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
NF4_BLOCK = 64
DQ_BLOCK = 256


def is_quantized(node) -> bool:
    return isinstance(node, dict) and "qvalue" in node


def _qtype(qvalue):
    dt = jnp.dtype(qvalue.dtype)
    if dt == jnp.dtype(jnp.uint4):
        return "nf4"
    if dt == jnp.dtype(jnp.int8):
        return jnp.int8
    raise TypeError(f"quantised weight with qvalue dtype {dt}: expected uint4 (nf4) or int8")


def dequantize(node, dtype=jnp.float32) -> jax.Array:
    """The weight a quantised node stands for: (c[q] - zero_point) * scale, scale broadcast per block."""
    import qwix

    scale = node["scale"]
    if is_quantized(scale):
        scale = dequantize(scale, jnp.float32)
    qa = qwix.QArray(qvalue=node["qvalue"], scale=scale, zero_point=node.get("zero_point"),
                     qtype=_qtype(node["qvalue"]))
    return qwix.dequantize(qa).astype(dtype)


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _quantize_layer(w: jax.Array, fmt: str, n_in: int, embed_axis: int, block_size: int) -> dict:
    """One layer's weight (no "layers" axis) -> node; ``embed_axis`` indexes into ``w``."""
    import qwix

    w = w.astype(jnp.float32)
    if fmt == "int8":
        out_axes = tuple(range(n_in, w.ndim))
        qa = qwix.quantize(w, jnp.int8, channelwise_axes=out_axes, scale_dtype=jnp.float32)
        return {"qvalue": qa.qvalue, "scale": qa.scale}
    others = tuple(a for a in range(w.ndim) if a != embed_axis)
    qa = qwix.quantize(w, "nf4", channelwise_axes=others, tiled_axes={embed_axis: block_size},
                       scale_dtype=jnp.float32)
    node = {"qvalue": qa.qvalue, "scale": qa.scale}
    if fmt == "nf4_dq":
        s = qa.scale
        ax = int(np.argmax(s.shape))  # blocks along the longest axis of the absmaxes
        sq = qwix.quantize(s, jnp.int8, channelwise_axes=tuple(a for a in range(s.ndim) if a != ax),
                           tiled_axes={ax: _largest_divisor(s.shape[ax], DQ_BLOCK)},
                           calibration_method="minmax", scale_dtype=jnp.float32)
        node["scale"] = {"qvalue": sq.qvalue, "scale": sq.scale, "zero_point": sq.zero_point}
    return node


def _check_format(fmt: str, block_size: int, path: str, decl: ParamDecl):
    if fmt not in FORMATS:
        raise ValueError(f"model.quantize_base: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt != "int8":
        if "embed" not in decl.axes:
            raise ValueError(f"{path}: nf4 blocks run along 'embed', which this parameter lacks ({decl.axes})")
        d = decl.shape[decl.axes.index("embed")]
        if d % block_size:
            raise ValueError(f"{path}: d_model={d} is not divisible by the nf4 block size {block_size}")


def quantized_paths(decls) -> list[str]:
    """Flat paths of the parameters that get quantised: the layers' linear weights."""
    return [f"layers/{n}" for n in LINEARS if f"layers/{n}" in flatten(decls)]


def quantize_params(params: dict, decls: dict, fmt: str, *, block_size: int = NF4_BLOCK,
                    shardings: Optional[dict] = None) -> dict:
    """``params`` with the layers' linear weights replaced by quantised nodes (others untouched).

    One jitted program per weight, mapped over the "layers" axis so the transient memory is one
    layer's; ``shardings`` (from ``quantized_shardings``) places the result, else XLA chooses.
    """
    flat_p, flat_d = flatten(params), flatten(decls)
    flat_s = flatten(shardings) if shardings is not None else {}
    out = dict(flat_p)
    for path in quantized_paths(decls):
        decl = flat_d[path]
        _check_format(fmt, block_size, path, decl)
        n_in = LINEARS[path.split("/")[1]]
        embed_axis = decl.axes.index("embed") - 1 if "embed" in decl.axes else -1
        fn = lambda w, n_in=n_in, e=embed_axis: jax.lax.map(  # noqa: E731
            lambda wl: _quantize_layer(wl, fmt, n_in, e, block_size), w)
        sh = {k: v for k, v in flat_s.items() if k.startswith(path + "/")}
        out_sh = unflatten({k[len(path) + 1:]: v for k, v in sh.items()}) if sh else None
        node = jax.jit(fn, out_shardings=out_sh)(flat_p[path])
        for k, v in flatten(node).items():
            out[f"{path}/{k}"] = v
        del out[path]
    return unflatten(out)


def abstract_quantized(decls: dict, fmt: str, *, block_size: int = NF4_BLOCK, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of ``quantize_params``' result, traced from the declarations (no allocation)."""
    return jax.eval_shape(lambda p: quantize_params(p, decls, fmt, block_size=block_size),
                          abstract_params(decls, dtype))


def declare_quantized(decls: dict, fmt: str, *, block_size: int = NF4_BLOCK) -> dict:
    """Declarations of the quantised tree: codes keep the weight's logical axes; a scale keeps an
    axis where it is per-channel or per-block and drops it (None) where it was reduced to size 1."""
    abstract = flatten(abstract_quantized(decls, fmt, block_size=block_size))
    flat_d = flatten(decls)
    out = {}
    for path, decl in flat_d.items():
        if path in abstract:
            out[path] = decl
            continue
        for sub, a in ((k, v) for k, v in abstract.items() if k.startswith(path + "/")):
            axes = tuple(ax if (s == w or s > 1) else None for ax, s, w in zip(decl.axes, a.shape, decl.shape))
            out[sub] = ParamDecl(tuple(a.shape), axes, "zeros")
    return unflatten(out)


def quantized_shardings(decls: dict, fmt: str, mesh, rules=DEFAULT_RULES, *, block_size: int = NF4_BLOCK):
    """NamedShardings for ``quantize_params``' result (the frozen base role's in_shardings)."""
    return param_shardings(declare_quantized(decls, fmt, block_size=block_size), mesh, rules)


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """Every quantised node replaced by its dequantised array (plain params again)."""
    def walk(node):
        if is_quantized(node):
            return jax.jit(dequantize, static_argnums=1)(node, dtype)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(params)


def _bits(dtype) -> int:
    dt = jnp.dtype(dtype)
    if jnp.issubdtype(dt, jnp.integer):
        return jnp.iinfo(dt).bits
    if jnp.issubdtype(dt, jnp.floating):
        return jnp.finfo(dt).bits
    return dt.itemsize * 8


def tree_bytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) in ``tree``, 4-bit types counted as half a byte."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return sum(math.ceil(math.prod(x.shape) * _bits(x.dtype) / 8) for x in leaves)

