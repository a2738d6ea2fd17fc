"""Attention backends behind one signature.

    attend(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, impl=...) -> [B, T, H, hd]

q: [B, T, H, hd]; k, v: [B, S, KV, hd] with H % KV == 0 (grouped-query attention).
Query t may attend key s iff ``q_seg[t] == kv_seg[s] != 0`` and ``kv_index[s] <= q_index[t]``
(causal by token order), and with a sliding ``window`` also ``q_index[t] - kv_index[s] < window``
(as transformers' ``sliding_window_overlay``). The indices are token indices in the row (or KV-cache
slots), so the window holds for packed rows, the cache and permuted (zigzag) rows alike. Rows with
no visible key (padding) return zeros, never NaN.

impl: "xla" (dense einsum, any device), "cudnn" (``jax.nn.dot_product_attention``; falls back to XLA
off GPU), "ring" (``sharding.ring_attention`` over the "sequence" mesh axis).
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

_NEG = -1e30


def attention_mask(q_seg, kv_seg, q_idx, kv_idx, window=None) -> jax.Array:
    """[B, T, S] bool: same non-padding segment, causal by index, and within ``window`` if given
    (a Python int or a traced int32 scalar, e.g. one per layer)."""
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    mask = same & (kv_idx[:, None, :] <= q_idx[:, :, None])
    if window is not None:
        mask = mask & (q_idx[:, :, None] - kv_idx[:, None, :] < window)
    return mask


def dense_attention(q, k, v, mask) -> jax.Array:
    """Softmax(q k^T / sqrt(hd)) v with a [B, T, S] mask, softmax statistics in float32."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd)
    )
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0)  # fully masked rows -> zeros instead of a uniform average
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, hd)


def cudnn_attention(q, k, v, mask) -> jax.Array:
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation=impl)
    any_key = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(any_key, out, 0).astype(q.dtype)


def attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, impl: str = "xla", window=None) -> jax.Array:
    if impl == "ring" and q.shape[1] == k.shape[1]:
        from sharding.ring_attention import ring_attention_auto, ring_size
        from sharding.rules import active_rules

        mesh, rules = active_rules()
        n = ring_size(mesh, rules)
        if n > 1 and window is not None:
            # The ring masks by segment and causality only (forward() refuses a window shorter than the rows
            # when the sequence axis is > 1).
            raise ValueError("sliding-window attention is not supported by ring attention (mesh.sequence > 1)")
        if n > 1 and q.shape[1] % n == 0:
            return ring_attention_auto(q, k, v, q_seg, kv_seg, q_idx, kv_idx, mesh=mesh, rules=rules)
        if n > 1:
            warnings.warn(f"ring attention: sequence length {q.shape[1]} not divisible by the sequence axis ({n}); "
                          "using dense attention (it materialises the full [T, T] scores)", stacklevel=2)
    mask = attention_mask(q_seg, kv_seg, q_idx, kv_idx, window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return dense_attention(q, k, v, mask)
