"""Ring attention == dense attention (outputs and grads), zigzag layout, load balance, model integration."""
import dataclasses

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.config import ModelConfig
from jalign.models import transformer
from jalign.models.attention import attend, attention_mask, dense_attention
from jalign.models.params import init_params
from sharding.mesh import make_mesh
from sharding.ring_attention import (count_unmasked_blocks, from_zigzag, ring_attention_auto, to_zigzag,
                                     zigzag_batch, zigzag_inverse, zigzag_permutation)
from sharding.rules import use_rules


def _inputs(B, T, H, KV, hd, packed, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, hd), dtype)
    k = jax.random.normal(ks[1], (B, T, KV, hd), dtype)
    v = jax.random.normal(ks[2], (B, T, KV, hd), dtype)
    seg = np.ones((B, T), np.int32)
    if packed:  # several examples per row, then padding; the last row is one example plus padding
        for b in range(B):
            cuts = sorted(np.random.RandomState(seed + b).choice(np.arange(1, T - 1), 3, replace=False))
            seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
            seg[b, cuts[-1]:] = 0
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return q, k, v, seg, idx, jax.random.normal(ks[3], (B, T, H, hd), jnp.float32)


def _value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = [
    # mesh (data, fsdp, tensor, sequence), batch, T, H, KV, causal, packed, layout, block_size
    ((1, 1, 1, 8), 1, 32, 4, 2, True, True, "zigzag", 512),
    ((2, 1, 1, 4), 2, 48, 4, 2, True, True, "zigzag", 2),  # 6 pieces of 2 per device: inner loop + skips
    ((1, 1, 2, 4), 2, 48, 4, 2, False, True, "contiguous", 512),
    ((1, 1, 2, 4), 1, 40, 8, 2, True, False, "zigzag", 512),
    ((2, 2, 1, 2), 3, 24, 4, 4, True, True, "contiguous", 3),  # batch 3 does not divide data*fsdp: unsharded
]


@pytest.mark.parametrize("mesh_shape,B,T,H,KV,causal,packed,layout,block_size", CASES)
def test_ring_matches_dense(mesh_shape, B, T, H, KV, causal, packed, layout, block_size):
    q, k, v, seg, idx, w = _inputs(B, T, H, KV, 8, packed)
    mask = attention_mask(seg, seg, idx if causal else 0 * idx, idx if causal else 0 * idx)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, w)

    mesh = make_mesh(*mesh_shape)
    n = mesh_shape[3]
    if layout == "zigzag":
        zz = lambda x: to_zigzag(x, n)  # noqa: E731
        unzz = lambda x: from_zigzag(x, n)  # noqa: E731
    else:
        zz = unzz = lambda x: x  # noqa: E731
    zseg, zidx, zw = zz(seg), zz(idx), zz(w)

    def ring(q, k, v):
        with use_rules(mesh):
            return ring_attention_auto(q, k, v, zseg, zseg, zidx, zidx, causal=causal, block_size=block_size)

    out, grads = _value_and_grads(ring, zz(q), zz(k), zz(v), zw)
    np.testing.assert_allclose(unzz(out), ref_out, atol=1e-5, rtol=1e-5)
    for g, rg, name in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(unzz(g), rg, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    if packed:  # padding rows see no key: exactly zero
        assert np.all(np.asarray(out)[zseg == 0] == 0)


def test_ring_bf16_accumulates_in_f32():
    q, k, v, seg, idx, _ = _inputs(2, 64, 4, 2, 16, packed=True, seed=3)
    ref = dense_attention(q, k, v, attention_mask(seg, seg, idx, idx))
    mesh = make_mesh(1, 1, 1, 8)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))

    @jax.jit
    def ring(q, k, v):
        with use_rules(mesh):
            return attend(q, k, v, seg, seg, idx, idx, impl="ring")

    out = ring(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_fallback_to_dense_without_sequence_axis():
    """attend(impl="ring") (what the model calls) is dense attention when there is no ring to run."""
    q, k, v, seg, idx, _ = _inputs(2, 16, 4, 2, 8, packed=True)
    dense = jax.jit(lambda q, k, v, s, i: dense_attention(q, k, v, attention_mask(s, s, i, i)))
    ring = jax.jit(lambda q, k, v, s, i: attend(q, k, v, s, s, i, i, impl="ring"))
    ref = dense(q, k, v, seg, idx)
    np.testing.assert_allclose(ring(q, k, v, seg, idx), ref, atol=1e-6)  # no mesh
    with use_rules(make_mesh(4, 1, 2, 1)):
        np.testing.assert_allclose(ring(q, k, v, seg, idx), ref, atol=1e-6)  # sequence axis of size 1
    q2, k2, v2, s2, i2, _ = _inputs(1, 12, 4, 2, 8, packed=False)
    with use_rules(make_mesh(1, 1, 1, 8)), pytest.warns(UserWarning, match="not divisible"):
        np.testing.assert_allclose(ring(q2, k2, v2, s2, i2), dense(q2, k2, v2, s2, i2), atol=1e-6)


# ---- zigzag layout and load balance ------------------------------------------------------------
@pytest.mark.parametrize("T,n", [(16, 2), (48, 4), (64, 8)])
def test_zigzag_round_trip(T, n):
    perm, inv = zigzag_permutation(T, n), zigzag_inverse(T, n)
    assert sorted(perm.tolist()) == list(range(T))
    np.testing.assert_array_equal(perm[inv], np.arange(T))
    c = T // (2 * n)
    for dev, block in enumerate(perm.reshape(n, 2 * c)):  # device i holds chunks i and 2n-1-i
        np.testing.assert_array_equal(block[:c] // c, dev)
        np.testing.assert_array_equal(block[c:] // c, 2 * n - 1 - dev)
    x = np.random.RandomState(0).randn(2, T, 3).astype(np.float32)
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, n), n), x)
    np.testing.assert_array_equal(np.asarray(from_zigzag(to_zigzag(jnp.asarray(x), n), n)), x)
    np.testing.assert_array_equal(to_zigzag(x, n)[:, :, 0], x[:, perm, 0])
    zb = zigzag_batch({"tokens": x[..., 0], "mask": x > 0}, n)
    np.testing.assert_array_equal(zb["tokens"], x[:, perm, 0])
    np.testing.assert_array_equal(zb["token_index"], np.broadcast_to(perm, (2, T)))
    with pytest.raises(ValueError, match="divisible"):
        zigzag_permutation(T + 1, n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zigzag_balances_causal_work(n):
    T = 16 * n
    zig = count_unmasked_blocks(T, n, "zigzag")
    contiguous = count_unmasked_blocks(T, n, "contiguous")
    assert len(set(zig.tolist())) == 1, zig  # every device computes the same number of blocks
    assert contiguous.max() > contiguous.min(), contiguous
    assert contiguous.max() > zig.max()
    assert zig.sum() == contiguous.sum()  # same total work, only the distribution differs
    per_step = count_unmasked_blocks(T, n, "zigzag", per_step=True)
    assert all(len(set(row.tolist())) == 1 for row in per_step)  # balanced at every ring step too
    assert np.all(count_unmasked_blocks(T, n, "contiguous", causal=False) == 4 * n)


# ---- through the model --------------------------------------------------------------------------
def _model_setup(layers=2):
    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=layers, heads=4, kv_heads=2)
    decls = transformer.declare_params(cfg)
    params = init_params(decls, 0)  # host-side NumPy init, no compile
    B, T = 2, 32
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 12:] = 2
    seg[1, 27:] = 0
    pos = np.zeros((B, T), np.int32)  # positions restart per packed example
    for b in range(B):
        for s in np.unique(seg[b]):
            pos[b, seg[b] == s] = np.arange((seg[b] == s).sum())
    return cfg, params, tokens, pos, seg


def test_model_forward_ring_contiguous_equals_xla():
    cfg, params, tokens, pos, seg = _model_setup()
    mesh = make_mesh(1, 1, 2, 4)
    ref = jax.jit(lambda p: transformer.forward(p, tokens, pos, seg, cfg))(params)

    @jax.jit
    def ring(p):
        with use_rules(mesh):
            return transformer.forward(p, tokens, pos, seg, dataclasses.replace(cfg, attention="ring"))

    np.testing.assert_allclose(ring(params), ref, atol=1e-5, rtol=1e-5)


def test_model_forward_ring_zigzag_equals_xla():
    """Tokens in zigzag order; attention masks by the original position (``token_index``)."""
    cfg, params, tokens, pos, seg = _model_setup()
    n, (B, T) = 4, tokens.shape
    mesh = make_mesh(1, 1, 1, n, devices=jax.devices()[:n])
    ring_cfg = dataclasses.replace(cfg, attention="ring", remat="full")
    zb = zigzag_batch({"tokens": tokens, "positions": pos, "segment_ids": seg}, n)
    ztok, zpos, zseg, token_index = zb["tokens"], zb["positions"], zb["segment_ids"], zb["token_index"]
    w = jax.random.normal(jax.random.PRNGKey(1), (B, T, cfg.hidden))

    def loss(p, f, w):
        h = f(p)
        return jnp.sum(h * w), h

    (_, ref_h), ref_g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, lambda p: transformer.forward(p, tokens, pos, seg, cfg), w)

    fwd = lambda p: transformer.forward(p, ztok, zpos, zseg, ring_cfg, token_index=token_index)  # noqa: E731

    @jax.jit
    def ring(p):
        with use_rules(mesh):
            return jax.value_and_grad(loss, has_aux=True)(p, fwd, to_zigzag(w, n))

    (_, h), g = ring(params)
    np.testing.assert_allclose(from_zigzag(h, n), ref_h, atol=1e-5, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_ring_specs_follow_the_rules_table():
    """The ring's shard specs come from the logical-axis rules (one source of truth), not a fixed layout."""
    from sharding import make_rules
    from sharding.ring_attention import ring_axis, ring_specs

    mesh = make_mesh(2, 1, 2, 2)
    qs, kvs, ids = ring_specs(mesh, make_rules(), 4, 8, 4)
    assert qs == P(("data", "fsdp"), "sequence", "tensor", None) and ids == P(("data", "fsdp"), "sequence")
    rules = make_rules({"batch": "data", "heads": None, "kv_heads": None})
    qs, kvs, ids = ring_specs(mesh, rules, 4, 8, 4)
    assert qs == kvs == P("data", "sequence", None, None)
    assert ring_specs(mesh, make_rules(), 4, 8, 3)[0][2] is None  # kv heads do not divide: heads stay whole
    assert ring_axis(make_rules({"seq": "fsdp"})) == "fsdp"
