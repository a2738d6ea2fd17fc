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
and device_put work unchanged, and the format is read from the dtype of ``qvalue`` (int8: int8;
uint8: nf4 codes packed two per byte along d_model). Quantising and dequantising are qwix's
(``qwix.quantize``/``qwix.dequantize``, pure functions on arrays). qwix keeps nf4 codes as jnp.uint4;
we pack them into bytes ourselves because XLA's CPU backend makes an unpacked (one byte per code) copy
of a whole uint4 array that a loop slices, i.e. of the stacked layers under ``lax.scan`` (measured:
+1 byte per weight of temp memory); packed bytes are unpacked one layer at a time inside the scan.
Embedding, lm head, norms and biases stay in their dtype (as in QLoRA / bitsandbytes, which quantise
only the blocks' linear layers).
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


def _pack_nibbles(codes: jax.Array, axis: int) -> jax.Array:
    """4-bit codes -> uint8 with codes 2j (low nibble) and 2j+1 (high nibble) of ``axis`` in byte j."""
    c = codes.astype(jnp.uint8)
    c = c.reshape(c.shape[:axis] + (c.shape[axis] // 2, 2) + c.shape[axis + 1:])
    low, high = jnp.take(c, 0, axis=axis + 1), jnp.take(c, 1, axis=axis + 1)
    return low | (high << 4)


def _unpack_nibbles(packed: jax.Array, axis: int) -> jax.Array:
    both = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
    return both.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])


def dequantize(node, dtype=jnp.float32) -> jax.Array:
    """The weight a quantised node stands for: (c[q] - zero_point) * scale, scale broadcast per block.

    ``qvalue`` int8: the int8 format; uint8: nf4 codes packed two per byte along the block axis (the
    one axis where codes and scales differ in size).
    """
    import qwix

    scale = node["scale"]
    if is_quantized(scale):
        scale = dequantize(scale, jnp.float32)
    q = node["qvalue"]
    if jnp.dtype(q.dtype) == jnp.dtype(jnp.uint8):
        axis = next(i for i, (n, m) in enumerate(zip(q.shape, scale.shape)) if n != m)
        q, qtype = _unpack_nibbles(q, axis), "nf4"
    elif jnp.dtype(q.dtype) == jnp.dtype(jnp.int8):
        qtype = jnp.int8
    else:
        raise TypeError(f"quantised weight with qvalue dtype {q.dtype}: expected int8 or uint8 (packed nf4)")
    qa = qwix.QArray(qvalue=q, scale=scale, zero_point=node.get("zero_point"), qtype=qtype)
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
    node = {"qvalue": _pack_nibbles(qa.qvalue, embed_axis), "scale": qa.scale}
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
        if block_size < 4 or block_size % 2:
            raise ValueError(f"nf4 block size must be even and at least 4, got {block_size}")
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

