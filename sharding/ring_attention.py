"""Ring attention over the "sequence" mesh axis, with zigzag causal load balancing.

    out = ring_attention_auto(q, k, v, q_seg, kv_seg, q_idx, kv_idx)        # same contract as attend()

q: [B, T, H, hd]; k, v: [B, T, KV, hd] (H % KV == 0); segment ids and indices [B, T]. Query t sees key s
iff ``q_seg[t] == kv_seg[s] != 0`` and (causal) ``kv_idx[s] <= q_idx[t]``; rows that see no key return 0.

How it works. Every device of the "sequence" axis keeps its block of queries and passes its
(k, v, kv_seg, kv_idx) block to the next device with ``lax.ppermute``; after n steps every query block has
met every key block. Partial results are merged with an online log-sum-exp softmax in float32 (also for
bf16 inputs). Masks are built from the *carried* indices, so the ring is correct for any token order.
Each local block is cut into pieces of at most ``block_size`` tokens; the (query piece, key piece)
pairs run in a ``fori_loop`` and every pair with no unmasked entry is skipped with ``lax.cond``, so the
largest temporary is one [block_size, block_size] score tile per head. GQA groups query heads
([B, KV, H/KV, T, hd]); k/v are never repeated. The backward pass is a ``custom_vjp`` that rings again:
k/v travel with their dk/dv accumulators and come home after n hops. Only q, k, v, out and the per-row
log-sum-exp are saved, so memory is O(T/n) per device in both directions.

Causal load balancing (zigzag). With a contiguous layout device i holds rows [iT/n, (i+1)T/n) and under
causal masking the last device does ~2n-1 times the work of the first. ``to_zigzag`` cuts a row into 2n
chunks and gives device i chunks i and 2n-1-i, so every device does the same work
(see ``count_unmasked_blocks``). Attention itself needs nothing special: it masks by the carried original
positions. The caller applies the permutation ONCE per batch, to everything of shape [B, T, ...]:

    zb = zigzag_batch(batch, n)    # tokens, targets, positions, segment_ids, masks + "token_index"
    hidden = forward(params, zb["tokens"], zb["positions"], zb["segment_ids"], cfg,
                     token_index=zb["token_index"])      # attention masks by q_idx = kv_idx = token_index
    logps = from_zigzag(token_logps(hidden, zb["targets"]), n)   # [B, T] back in row order (or sum as is)

Targets must be shifted (ids[1:]) BEFORE permuting, as jalign.data.packing already does.

T must be divisible by 2n for the zigzag layout (and by n for the ring itself).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

_NEG = -1e30
SEQ_AXIS = "sequence"


# ---- zigzag layout ------------------------------------------------------------------------------
def zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """perm with ``x_zigzag = x[perm]``: 2n chunks ordered 0, 2n-1, 1, 2n-2, ..., n-1, n.

    Split evenly over n devices, device i then holds chunks i and 2n-1-i.
    """
    if seq_len % (2 * n):
        raise ValueError(f"zigzag layout needs seq_len divisible by 2*n = {2 * n}, got {seq_len}")
    c = seq_len // (2 * n)
    order = [j for i in range(n) for j in (i, 2 * n - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order]).astype(np.int32)


def zigzag_inverse(seq_len: int, n: int) -> np.ndarray:
    """inv with ``x = x_zigzag[inv]``."""
    return np.argsort(zigzag_permutation(seq_len, n)).astype(np.int32)


def to_zigzag(x, n: int, axis: int = 1):
    """Reorder axis ``axis`` (the sequence) of a [B, T, ...] array into the zigzag layout."""
    perm = zigzag_permutation(x.shape[axis], n)
    return np.take(x, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, perm, axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
    """Inverse of ``to_zigzag``."""
    inv = zigzag_inverse(x.shape[axis], n)
    return np.take(x, inv, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inv, axis=axis)


def zigzag_batch(batch: Mapping[str, object], n: int, axis: int = 1) -> dict:
    """Every array of a batch dict ([B, T, ...]: tokens, targets, positions, segment_ids, masks) in zigzag
    order, plus ``"token_index"`` [B, T] int32: each token's original position (pass it to ``forward``)."""
    out = {k: to_zigzag(v, n, axis) for k, v in batch.items()}
    B, T = next(iter(batch.values())).shape[:2]
    out["token_index"] = to_zigzag(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), n)
    return out


def count_unmasked_blocks(seq_len: int, n: int, layout: str = "zigzag", causal: bool = True,
                          num_chunks: int = 2, per_step: bool = False) -> np.ndarray:
    """Per-device number of (query piece, key piece) pairs with any unmasked entry.

    Uses the block structure of ``ring_attention`` (each device's block split into ``num_chunks``
    pieces, 2 = the zigzag halves; key blocks arriving from device (i - step) mod n), so this is the
    number of piece computations the ring does on each device (the rest are skipped). Returns [n], or [n_steps, n]
    with ``per_step``; a ring step takes as long as its slowest device.
    """
    if layout == "zigzag":
        idx = zigzag_permutation(seq_len, n)
    elif layout == "contiguous":
        idx = np.arange(seq_len)
    else:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    blocks = idx.reshape(n, num_chunks, seq_len // (n * num_chunks))
    counts = np.zeros((n, n), np.int64)
    for step in range(n):
        for dev in range(n):
            src = (dev - step) % n
            for qa in blocks[dev]:
                for kb in blocks[src]:
                    counts[step, dev] += (not causal) or bool(kb.min() <= qa.max())
    return counts if per_step else counts.sum(0)


# ---- per-device ring body -----------------------------------------------------------------------
def _mask(q_seg, kv_seg, q_idx, kv_idx, causal):
    m = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    if causal:
        m = m & (kv_idx[:, None, :] <= q_idx[:, :, None])
    return m  # [B, tq, tk]


def _piece(x, i, size, axis):
    return lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _put(x, update, i, size, axis):
    return lax.dynamic_update_slice_in_dim(x, update, i * size, axis)


def _fwd_block(q, k, v, mask, state, scale):
    """Online-softmax update of (o, m, l) for one query piece against one key piece.

    q [B, KV, G, tq, hd]; k, v [B, tk, KV, hd]; o [B, KV, G, tq, hd] f32; m, l [B, KV, G, tq] f32.
    """
    o, m, l = state
    s = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mm = mask[:, None, None]
    s = jnp.where(mm, s, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mm, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    o = o * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return o, m_new, l


def _bwd_block(q, k, v, do, lse, delta, mask, state, scale):
    """Gradient contributions of one (query piece, key piece) pair: dq [B,KV,G,tq,hd], dk/dv [B,tk,KV,hd]."""
    dq, dk, dv = state
    s = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mm = mask[:, None, None]
    p = jnp.where(mm, jnp.exp(s - lse[..., None]), 0.0)
    dv = dv + jnp.einsum("bkgts,bkgtd->bskd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgtd,bskd->bkgts", do, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = dk + jnp.einsum("bkgts,bkgtd->bskd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq, dk, dv


def _shift(xs, axis_name, n):
    perm = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), xs)


def _group(q, kv_heads):
    """[B, T, H, hd] -> [B, KV, G, T, hd] (query heads grouped under their kv head)."""
    B, T, H, hd = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, hd).transpose(0, 2, 3, 1, 4)


def _ungroup(x):
    B, KV, G, T, hd = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * G, hd)


def _num_pieces(t: int, block_size: int) -> int:
    """Fewest pieces (even if possible, so zigzag halves align) of length <= block_size dividing t."""
    ok = [d for d in range(1, t + 1) if t % d == 0 and t // d <= block_size]
    even = [d for d in ok if d % 2 == 0]
    return even[0] if even else ok[0]


def _ring_fwd_impl(q, k, v, q_seg, kv_seg, q_idx, kv_idx, axis_name, causal, num_chunks):
    n = lax.axis_size(axis_name)
    T, KV, hd = q.shape[1], k.shape[2], q.shape[3]
    c = T // num_chunks  # piece length
    scale = 1.0 / math.sqrt(hd)
    qg = _group(q, KV)
    # *_like keeps the inputs' varying-mesh-axes type, so check_vma accepts the loop carries
    init = (jnp.zeros_like(qg, jnp.float32), jnp.full_like(qg[..., 0], _NEG, jnp.float32),
            jnp.zeros_like(qg[..., 0], jnp.float32))

    def compute(state, kvb):
        k_, v_, seg_, idx_ = kvb

        def pair(p, st):  # query piece a x key piece b, skipped when fully masked
            a, b = p // num_chunks, p % num_chunks
            mask = _mask(_piece(q_seg, a, c, 1), _piece(seg_, b, c, 1), _piece(q_idx, a, c, 1),
                         _piece(idx_, b, c, 1), causal)

            def update(st):
                sub = tuple(_piece(x, a, c, 3) for x in st)
                sub = _fwd_block(_piece(qg, a, c, 3), _piece(k_, b, c, 1), _piece(v_, b, c, 1), mask, sub, scale)
                return tuple(_put(x, y, a, c, 3) for x, y in zip(st, sub))

            return lax.cond(jnp.any(mask), update, lambda st: st, st)

        return lax.fori_loop(0, num_chunks * num_chunks, pair, state)

    def step(_, carry):
        state, kvb = carry
        nxt = _shift(kvb, axis_name, n)  # issued before the compute so the transfer can overlap it
        return compute(state, kvb), nxt

    state, kvb = lax.fori_loop(0, n - 1, step, (init, (k, v, kv_seg, kv_idx)))
    o, m, l = compute(state, kvb)
    seen = l > 0
    o = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return _ungroup(o).astype(q.dtype), lse  # lse [B, KV, G, T] f32


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ring(q, k, v, q_seg, kv_seg, q_idx, kv_idx, axis_name, causal, num_chunks):
    return _ring_fwd_impl(q, k, v, q_seg, kv_seg, q_idx, kv_idx, axis_name, causal, num_chunks)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, q_idx, kv_idx, axis_name, causal, num_chunks):
    out, lse = _ring_fwd_impl(q, k, v, q_seg, kv_seg, q_idx, kv_idx, axis_name, causal, num_chunks)
    return out, (q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse)


def _ring_bwd(axis_name, causal, num_chunks, res, dout):
    q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse = res
    n = lax.axis_size(axis_name)
    B, T, H, hd = q.shape
    KV = k.shape[2]
    c = T // num_chunks
    scale = 1.0 / math.sqrt(hd)
    qg, dog = _group(q, KV), _group(dout.astype(q.dtype), KV)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H]
    delta = delta.reshape(B, T, KV, H // KV).transpose(0, 2, 3, 1)

    def compute(dq, kvb):
        k_, v_, seg_, idx_, dk, dv = kvb

        def pair(p, st):
            a, b = p // num_chunks, p % num_chunks
            mask = _mask(_piece(q_seg, a, c, 1), _piece(seg_, b, c, 1), _piece(q_idx, a, c, 1),
                         _piece(idx_, b, c, 1), causal)

            def update(st):
                dq, dk, dv = st
                sub = (_piece(dq, a, c, 3), _piece(dk, b, c, 1), _piece(dv, b, c, 1))
                sub = _bwd_block(_piece(qg, a, c, 3), _piece(k_, b, c, 1), _piece(v_, b, c, 1),
                                 _piece(dog, a, c, 3), _piece(lse, a, c, 3), _piece(delta, a, c, 3), mask, sub, scale)
                return _put(dq, sub[0], a, c, 3), _put(dk, sub[1], b, c, 1), _put(dv, sub[2], b, c, 1)

            return lax.cond(jnp.any(mask), update, lambda st: st, st)

        dq, dk, dv = lax.fori_loop(0, num_chunks * num_chunks, pair, (dq, dk, dv))
        return dq, (k_, v_, seg_, idx_, dk, dv)

    def step(_, carry):
        dq, kvb = compute(*carry)
        return dq, _shift(kvb, axis_name, n)

    kvb = (k, v, kv_seg, kv_idx, jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
    dq, kvb = lax.fori_loop(0, n - 1, step, (jnp.zeros_like(qg, jnp.float32), kvb))
    dq, kvb = compute(dq, kvb)
    dk, dv = _shift(kvb[4:], axis_name, n)  # the last hop brings dk/dv home to the device owning k/v
    return _ungroup(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, axis_name: str = SEQ_AXIS, causal: bool = True,
                   block_size: int = 512) -> jax.Array:
    """Per-device ring attention body; call inside ``shard_map`` with the sequence sharded over ``axis_name``.

    Arguments are the local blocks (q [B, t, H, hd], k/v [B, t, KV, hd], ids [B, t]). ``causal=False``
    masks by segment only. ``block_size``: longest query/key piece of the inner loop (the score tile is
    [block_size, block_size] per head); fully masked piece pairs are skipped.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention needs equal local q/kv lengths, got {q.shape[1]} and {k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    num_chunks = _num_pieces(q.shape[1], block_size)
    ints = [jnp.asarray(a, jnp.int32) for a in (q_seg, kv_seg, q_idx, kv_idx)]
    return _ring(q, k, v, *ints, axis_name, causal, num_chunks)


# ---- shard_map wrapper over the active mesh -----------------------------------------------------
def ring_axis(rules: Mapping) -> str:
    """The mesh axis the ring runs over: the one the ``seq`` logical axis maps to (``sequence`` by default)."""
    axes = rules.get("seq")
    if not isinstance(axes, str):
        raise ValueError(f"ring attention needs the 'seq' logical axis mapped to one mesh axis, got {axes!r}")
    return axes


def ring_specs(mesh, rules: Mapping, batch: int, heads: int, kv_heads: int):
    """(q spec, kv spec, [B, T] spec) from the rules table: logical (batch, seq, heads|kv_heads, head_dim).

    A mesh axis is dropped from a spec when it does not divide the dimension (e.g. batch 1), and the head
    axis when the query and kv head counts do not both divide (GQA keeps their grouping local).
    """
    from sharding.rules import logical_to_spec

    def fit(spec, shape):
        out = []
        for size, axes in zip(shape, spec):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            n = math.prod(mesh.shape[a] for a in names) if names else 1
            out.append(axes if size % n == 0 else None)
        return P(*out)

    q = logical_to_spec(("batch", "seq", "heads", "head_dim"), rules)
    kv = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    q, kv = fit(q, (batch, 0, heads, 0)), fit(kv, (batch, 0, kv_heads, 0))
    if q[2] != kv[2]:
        q, kv = P(q[0], q[1], None, q[3]), P(kv[0], kv[1], None, kv[3])
    return q, kv, P(q[0], q[1])


def ring_size(mesh, rules: Mapping) -> int:
    """Devices on the ring's mesh axis (1 without a mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(ring_axis(rules), 1))


def ring_attention_auto(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, causal: bool = True, mesh=None, rules=None,
                        block_size: int = 512) -> jax.Array:
    """``attend(impl="ring")``: ring attention over the mesh axis ``seq`` maps to, with shard specs from the
    rules table (``sharding.rules.use_rules`` context unless given). The caller (``jalign.models.attention``)
    falls back to dense attention when there is no ring to run (see :func:`ring_size`)."""
    from sharding.rules import active_rules

    if mesh is None or rules is None:
        mesh, rules = active_rules()
    axis = ring_axis(rules)
    n = mesh.shape[axis]
    B, T, H, _ = q.shape
    if T % n or k.shape[1] != T:
        raise ValueError(f"ring attention: sequence length {T} (keys {k.shape[1]}) is not divisible by the "
                         f"{axis!r} mesh axis ({n})")
    qs, kvs, ids = ring_specs(mesh, rules, B, H, k.shape[2])
    body = functools.partial(ring_attention, axis_name=axis, causal=causal, block_size=block_size)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(qs, kvs, kvs, ids, ids, ids, ids), out_specs=qs,
                       check_vma=True)
    return fn(q, k, v, q_seg, kv_seg, q_idx, kv_idx)
