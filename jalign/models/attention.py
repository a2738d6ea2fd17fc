"""Attention backends behind one signature.

    attend(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, impl=...) -> [B, T, H, hd]

q: [B, T, H, hd]; k, v: [B, S, KV, hd] with H % KV == 0 (grouped-query attention).
Query t may attend key s iff ``q_seg[t] == kv_seg[s] != 0`` and ``kv_index[s] <= q_index[t]``
(causal by token order), and with a sliding ``window`` also ``q_index[t] - kv_index[s] < window``
(as transformers' ``sliding_window_overlay``). The indices are token indices in the row (or KV-cache
slots), so the window holds for packed rows, the cache and permuted (zigzag) rows alike. Rows with
no visible key (padding) return zeros, never NaN.

impl: "xla" (dense einsum, any device), "cudnn" (``jax.nn.dot_product_attention``; falls back to XLA
off GPU), "pallas" (flash attention, JAX's Pallas GPU kernel ``jax.experimental.pallas.ops.gpu.attention``
with segment ids + causal, GQA by repeating the k/v heads; off GPU it runs in Pallas interpret mode, which
is for testing: slow), "ring" (``sharding.ring_attention`` over the "sequence" mesh axis).
"""
from __future__ import annotations

import math
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


@jax.custom_vjp
def softmax_last(x: jax.Array) -> jax.Array:
    """softmax over the last axis, normalised by one reciprocal per row times the exponentials (XLA:CPU spent
    ~10% of a tiny SFT step dividing every [T, S] score by its row sum in ``jax.nn.softmax``); the
    gradient is the usual p * (g - sum(g p))."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _softmax_fwd(x):
    p = softmax_last(x)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_last.defvjp(_softmax_fwd, _softmax_bwd)


def dense_attention(q, k, v, mask) -> jax.Array:
    """Softmax(q k^T / sqrt(hd)) v with a [B, T, S] mask, softmax statistics in float32.

    The mask enters as an additive [B, T, S] bias (0 or -1e30) and fully masked rows are zeroed on the
    output (one select per query row), not on the [B, heads, T, S] probabilities: the same values and gradients as masking the
    scores and the probabilities with selects, without the four [B, heads, T, S] select passes (two forward,
    two in their transposes) that took ~10% of a tiny SFT step on XLA:CPU.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    # the 1/sqrt(hd) scale on q ([B, T, H, hd]), not on the [B, heads, T, S] scores: one pass over a smaller tensor
    qg = (q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)).reshape(B, T, KV, H // KV, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    bias = jnp.where(mask, 0.0, _NEG).astype(jnp.float32)[:, None, None, :, :]
    probs = softmax_last(logits + bias)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    any_key = jnp.any(mask, axis=-1)[:, :, None, None, None]  # rows with no visible key -> zeros, not a uniform mean
    return jnp.where(any_key, out, 0).reshape(B, T, H, hd)


def cudnn_attention(q, k, v, mask) -> jax.Array:
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation=impl)
    any_key = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(any_key, out, 0).astype(q.dtype)


PALLAS_BLOCK = 64  # rows are padded to a multiple of this (the kernel tiles queries and keys by it)


def pallas_attention(q, k, v, seg, *, block: int = PALLAS_BLOCK, interpret=None) -> jax.Array:
    """Flash attention (FlashAttention-2 tiling: Dao 2023, Alg. 1; forward and backward Pallas kernels, never a
    [T, S] score matrix) for rows whose queries and keys are the same tokens in row order (training /
    scoring, no KV cache): query t sees key s iff ``seg[t] == seg[s] != 0`` and ``s <= t``.

    q [B, T, H, hd], k/v [B, T, KV, hd]; seg [B, T]. The kernel takes one segment-id array for queries and
    keys and treats segment 0 like any other, so padding queries (seg 0) see only padding keys and their
    output is zeroed here (as :func:`dense_attention`); real tokens never see padding. GQA: each k/v head is
    repeated for its H / KV query heads (the gradient sums back over the copies). T is padded to a multiple
    of ``block`` with padding tokens. ``interpret`` defaults to "not on a GPU".
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    B, T, H, hd = q.shape
    KV = k.shape[2]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blk = min(block, max(16, 1 << (T - 1).bit_length()))
    pad = (-T) % blk
    if H != KV:
        k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
    if pad:
        widen = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v, seg = jnp.pad(q, widen), jnp.pad(k, widen), jnp.pad(v, widen), jnp.pad(seg, ((0, 0), (0, pad)))
    sizes = pallas_gpu.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=blk, block_kv_dkv=blk, block_q_dq=blk,
                                  block_kv_dq=blk)
    out = pallas_gpu.mha(q, k, v, seg.astype(jnp.int32), sm_scale=float(hd) ** -0.5, causal=True,
                         block_sizes=sizes, interpret=interpret)
    out = jnp.where((seg > 0)[:, :, None, None], out, 0).astype(q.dtype)
    return out[:, :T]


def sharded_pallas_attention(q, k, v, seg) -> jax.Array:
    """:func:`pallas_attention` per device under the active mesh (``sharding.use_rules``): a Pallas call is
    opaque to XLA's partitioner, so it runs inside ``shard_map`` over the batch (and head) shards the rules
    give the activations; without a mesh, or on one device, it is called directly."""
    from sharding.ring_attention import ring_specs
    from sharding.rules import active_rules

    mesh, rules = active_rules()
    if mesh is None or mesh.size == 1:
        return pallas_attention(q, k, v, seg)
    qs, kvs, ids = ring_specs(mesh, rules, q.shape[0], q.shape[2], k.shape[2])
    # (a sequence-sharded mesh never gets here: forward() switches to the ring when mesh.sequence > 1)
    fn = jax.shard_map(pallas_attention, mesh=mesh, in_specs=(qs, kvs, kvs, ids), out_specs=qs, check_vma=False)
    return fn(q, k, v, seg)


_warned_pallas_fallback = set()


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
    if impl == "pallas":
        if q.shape[1] == k.shape[1] and window is None:
            # Same tokens as queries and keys, indices = row order (forward() passes arange(T) without a
            # cache; permuted rows only occur under "ring"), so the kernel's causal-by-row-order is the mask.
            return sharded_pallas_attention(q, k, v, q_seg)
        why = "a sliding window" if window is not None else "a KV cache (queries and keys differ)"
        if why not in _warned_pallas_fallback:
            _warned_pallas_fallback.add(why)
            warnings.warn(f"model.attention=pallas: {why} is not covered by the Pallas kernel; using the XLA path "
                          "there", stacklevel=2)
    mask = attention_mask(q_seg, kv_seg, q_idx, kv_idx, window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    return dense_attention(q, k, v, mask)
