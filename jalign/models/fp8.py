"""FP8 matmuls with per-tensor current scaling (``model.matmul_fp8``), as pure functions.

    params = with_fp8(params)             # each layer linear weight becomes an Fp8Weight (no arithmetic)
    y = fp8_einsum("btd,df->btf", x, w, jnp.bfloat16)   # what ``lora.linear`` runs for an Fp8Weight

The recipe is the "current scaling" one of NVIDIA TransformerEngine (Micikevicius et al. 2022, "FP8 Formats for
Deep Learning", arXiv:2209.05433): every operand gets one scale from its own absolute maximum at the moment it
is used, no amax history (so no extra state to train, checkpoint or shard):

    s_a = amax(|a|) / max(F),    q_a = cast_F(clip(a / s_a, -max(F), max(F)))
    forward:   y  = (q_x . q_w) * s_x s_w                  F = float8_e4m3fn (max 448) for x and W
    backward:  dx = (q_g . q_w^T) * s_g s_w,               F = float8_e5m2 (max 57344) for g = dL/dy
               dW = (q_x^T . q_g) * s_x s_g

with the dots accumulated in float32 (``preferred_element_type``) and the result cast to the compute dtype.
The gradients are straight-through: quantisation is treated as the identity in the backward pass (absmax
scaling never clips, so there is nothing to mask). The residuals kept for the backward pass are the fp8 codes
and the scales, a quarter of float32 activations. On Hopper, XLA rewrites a dot of fp8 operands with
``preferred_element_type`` into a cuBLASLt fp8 GEMM; on CPU it converts the operands back to float32 and runs
an ordinary dot (an emulation: same numbers, no speed-up).

Why hand-written rather than qwix: qwix's quantised training (``QtProvider``/``QtRule``) intercepts Flax
modules' ``einsum``/``dot_general`` calls and recognises weights through Flax's param scope, which a pure
``forward(params, ...)`` does not have; its core ``dot_general_qt`` lives in a private module. Flax's
``fp8_ops`` implements delayed scaling (an amax history carried as state).

Only the layers' linear weights (q, k, v, o, gate, up, down) run in fp8; embedding, LM head, norms, attention
scores and the loss stay in the compute dtype (as in TransformerEngine, whose fp8 covers the linear layers).
Per-tensor activation scales are taken over the whole (global) batch, so a row's numbers depend slightly on
the other rows in its batch, and accumulating micro-batches is no longer exactly one big batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jalign.models.quant import LINEARS, is_quantized

FORWARD_DTYPE = jnp.float8_e4m3fn  # weights and activations: more mantissa (3 bits), range +-448
GRADIENT_DTYPE = jnp.float8_e5m2  # output gradients: more range (+-57344), 2 mantissa bits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A linear weight whose matmuls run in fp8 (``lax.scan`` slices ``w`` per layer like a plain array)."""

    w: Any  # [..., in..., out...], the weight in its stored dtype


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def quantize(a: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(q, s) with a ~= q * s: one float32 scale s = amax(|a|) / max(dtype) for the whole tensor (1 if a == 0)."""
    a32 = a.astype(jnp.float32)
    amax = jnp.max(jnp.abs(a32))
    m = fp8_max(dtype)
    s = jnp.where(amax > 0, amax / m, jnp.float32(1.0))
    # The clip guards the division's rounding: a value a hair above max(dtype) would cast to NaN (e4m3fn has no inf).
    return jnp.clip(a32 / s, -m, m).astype(dtype), s


def _transposed(eq: str) -> tuple[str, str, str]:
    """"btd,df->btf" -> (lhs, rhs, out); checks that every index of an operand is in another one, so the
    backward dots are einsums too: dx = einsum(out,rhs->lhs), dW = einsum(lhs,out->rhs)."""
    lhs, rest = eq.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    for name, term, others in (("x", lhs, rhs + out), ("weight", rhs, lhs + out), ("output", out, lhs + rhs)):
        lonely = [c for c in term if c not in others]
        if lonely:
            raise ValueError(f"fp8 einsum {eq!r}: index {lonely[0]!r} of the {name} appears in no other operand")
    return lhs, rhs, out


def _dot(eq: str, a, b, scale, dtype):
    y = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    return (y * scale).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def fp8_einsum(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """``einsum(eq, x, w)`` with e4m3 operands, e5m2 output gradients, f32 accumulation (module docstring)."""
    return _fp8_fwd(eq, x, w, dtype)[0]


def _fp8_fwd(eq, x, w, dtype):
    _transposed(eq)
    qx, sx = quantize(x, FORWARD_DTYPE)
    qw, sw = quantize(w, FORWARD_DTYPE)
    # The zero-size arrays carry the operands' dtypes into the backward pass (the cotangents must match them).
    return _dot(eq, qx, qw, sx * sw, dtype), (qx, sx, qw, sw, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_bwd(eq, dtype, res, g):
    qx, sx, qw, sw, x_like, w_like = res
    lhs, rhs, out = _transposed(eq)
    qg, sg = quantize(g, GRADIENT_DTYPE)
    dx = _dot(f"{out},{rhs}->{lhs}", qg, qw, sg * sw, x_like.dtype)
    dw = _dot(f"{lhs},{out}->{rhs}", qx, qg, sx * sg, w_like.dtype)
    return dx, dw


fp8_einsum.defvjp(_fp8_fwd, _fp8_bwd)


def with_fp8(params: dict) -> dict:
    """``params`` with the layers' linear weights wrapped in :class:`Fp8Weight` (pure, no arithmetic)."""
    layers = dict(params["layers"])
    for name in LINEARS:
        if name not in layers:
            continue
        if is_quantized(layers[name]):
            raise ValueError(f"layers/{name}: a quantised weight cannot also run in fp8 (model.quantize_base "
                             "with model.matmul_fp8)")
        layers[name] = Fp8Weight(layers[name])
    return {**params, "layers": layers}


__all__ = ["Fp8Weight", "fp8_einsum", "quantize", "with_fp8", "fp8_max", "FORWARD_DTYPE", "GRADIENT_DTYPE"]
