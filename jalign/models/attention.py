"""Attention backends behind one signature.

    attend(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, impl=...) -> [B, T, H, hd]

q: [B, T, H, hd]; k, v: [B, S, KV, hd] with H % KV == 0 (grouped-query attention).
Query t may attend key s iff ``q_seg[t] == kv_seg[s] != 0`` and ``kv_index[s] <= q_index[t]``
(causal by token order). Rows with no visible key (padding) return zeros, never NaN.

impl: "xla" (dense einsum, any device), "cudnn" (``jax.nn.dot_product_attention``; falls back to XLA
off GPU), "ring" (``sharding.ring_attention`` over the "sequence" mesh axis).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def attention_mask(q_seg, kv_seg, q_idx, kv_idx) -> jax.Array:
    """[B, T, S] bool: same non-padding segment and causal by index."""
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return same & (kv_idx[:, None, :] <= q_idx[:, :, None])


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


def attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, impl: str = "xla") -> jax.Array:
    if impl == "ring" and q.shape[1] == k.shape[1]:
        from sharding.ring_attention import ring_attention_auto

        return ring_attention_auto(q, k, v, q_seg, kv_seg, q_idx, kv_idx)
    mask = attention_mask(q_seg, kv_seg, q_idx, kv_idx)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return dense_attention(q, k, v, mask)
