"""Fast paths against the XLA reference, outputs and gradients: the Pallas flash-attention path (run in Pallas
interpret mode on CPU) and the chunked log-prob (never all [tokens, vocab] logits at once) against dense.

Tolerances: f32 to 2e-5 absolute (outputs) / 1e-4 (gradients), the same math reordered (online softmax);
bf16 inputs to 2e-2 relative to the largest value (bf16 keeps 8 mantissa bits, ~4e-3 per rounding, and the
two paths round the probabilities at different points).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.config import ModelConfig
from jalign.losses.ops import chunked_token_logps, token_logps
from jalign.models import attention
from jalign.models.params import init_params
from jalign.models.transformer import declare_params, forward, unembed_matrix

TOL = {"float32": (2e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}


def packed_rows(B, T):
    """Two packed rows: segments of different lengths, trailing padding (segment 0) in the first."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :13], seg[0, 13:30], seg[0, 30:T - 6] = 1, 2, 3
    seg[1, :T // 2], seg[1, T // 2:] = 1, 2
    return jnp.asarray(seg)


def close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(1.0, float(np.max(np.abs(b))))
    assert np.max(np.abs(a - b)) <= tol * scale, f"max |diff| {np.max(np.abs(a - b)):.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_attention_equals_xla(dtype):
    B, T, H, KV, hd = 2, 48, 4, 2, 16  # GQA 2:1; T = 48 is padded to the 64-token block inside
    ks = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (B, T, H, hd)).astype(dt)
    k = jax.random.normal(ks[1], (B, T, KV, hd)).astype(dt)
    v = jax.random.normal(ks[2], (B, T, KV, hd)).astype(dt)
    w = jax.random.normal(ks[3], (B, T, H, hd))  # a random cotangent, so every output element matters
    seg = packed_rows(B, T)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def run(impl):
        def f(q, k, v):
            out = attention.attend(q, k, v, seg, seg, idx, idx, impl=impl)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_p, g_p = run("pallas")
    out_x, g_x = run("xla")
    assert out_p.dtype == dt
    t_out, t_grad = TOL[dtype]
    close(out_p, out_x, t_out)
    assert np.all(np.asarray(out_p[0, T - 6:], np.float32) == 0)  # padding queries give zeros, as on XLA
    for gp, gx in zip(g_p, g_x):
        close(gp, gx, t_grad)
    assert float(jnp.max(jnp.abs(g_x[1].astype(jnp.float32)))) > 0


def test_model_attention_pallas_selected_by_config():
    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, max_seq_len=64)
    params = init_params(declare_params(cfg), jax.random.key(1))
    B, T = 2, 48
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    seg = packed_rows(B, T)
    starts = np.asarray(seg)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):  # positions restart per segment
        for t in range(1, T):
            pos[b, t] = 0 if starts[b, t] != starts[b, t - 1] else pos[b, t - 1] + 1
    h_x = forward(params, tokens, jnp.asarray(pos), seg, cfg)
    h_p = forward(params, tokens, jnp.asarray(pos), seg, dataclasses.replace(cfg, attention="pallas"))
    real = np.asarray(seg) > 0
    close(np.asarray(h_p)[real], np.asarray(h_x)[real], 1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_logps_equal_dense_with_gradients(dtype):
    B, T, D, V = 2, 37, 16, 96  # 37 positions in chunks of 8: four full chunks and a padded one
    dt = jnp.dtype(dtype)
    ks = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(ks[0], (B, T, D)).astype(dt)
    unembed = (jax.random.normal(ks[1], (D, V)) * 0.3).astype(dt)
    labels = jax.random.randint(ks[2], (B, T), 0, V)
    w = jnp.linspace(-1.0, 1.0, B * T).reshape(B, T)

    def chunked(h, u):
        return jnp.sum(w * chunked_token_logps(h, u, labels, chunk_size=8))

    def dense(h, u):
        z = jnp.einsum("btd,dv->btv", h, u.astype(h.dtype), preferred_element_type=jnp.float32)
        return jnp.sum(w * token_logps(z, labels))

    lc = chunked_token_logps(hidden, unembed, labels, chunk_size=8)
    ld = token_logps(jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32), labels)
    t_out, t_grad = TOL[dtype]
    close(lc, ld, 1e-5 if dtype == "float32" else t_out)
    gc = jax.grad(chunked, argnums=(0, 1))(hidden, unembed)
    gd = jax.grad(dense, argnums=(0, 1))(hidden, unembed)
    for a, b in zip(gc, gd):
        close(a, b, 1e-5 if dtype == "float32" else t_grad)


def test_training_uses_the_chunked_logps():
    """The loss path of every LM algorithm (policy_token_logps) goes through the chunked kernel, and equals the
    dense log-softmax of the full logits."""
    from jalign.algorithms import base

    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=1, heads=4, kv_heads=2, max_seq_len=64)
    params = init_params(declare_params(cfg), jax.random.key(4))
    B, T = 2, 16
    batch = {"tokens": jax.random.randint(jax.random.key(5), (B, T), 0, 64),
             "targets": jax.random.randint(jax.random.key(6), (B, T), 0, 64),
             "positions": jnp.broadcast_to(jnp.arange(T), (B, T)), "segment_ids": jnp.ones((B, T), jnp.int32)}
    jaxpr = str(jax.make_jaxpr(lambda p: base.policy_token_logps(p, batch, cfg))(params))
    assert "custom_vjp" in jaxpr  # the fused chunk of chunked_token_logps (its own backward)
    hidden = forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg)
    dense = token_logps(hidden @ unembed_matrix(params, cfg), batch["targets"])
    close(base.policy_token_logps(params, batch, cfg), dense, 1e-5)


def test_pallas_attention_sharded_equals_unsharded():
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per device in shard_map, same result and gradients."""
    from sharding import make_mesh, make_rules, use_rules

    B, T, H, KV, hd = 4, 32, 4, 2, 16
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (B, T, H, hd))
    k, v = jax.random.normal(ks[1], (B, T, KV, hd)), jax.random.normal(ks[2], (B, T, KV, hd))
    w = jax.random.normal(ks[3], (B, T, H, hd))
    seg = jnp.concatenate([packed_rows(2, T), packed_rows(2, T)[::-1]])
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def loss(q, k, v, impl):
        return jnp.sum(attention.attend(q, k, v, seg, seg, idx, idx, impl=impl) * w)

    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    mesh = make_mesh(2, 2, 2, 1, devices=jax.devices()[:8])
    with use_rules(mesh, make_rules()):
        got = jax.jit(jax.value_and_grad(lambda q, k, v: loss(q, k, v, "pallas"), argnums=(0, 1, 2)))(q, k, v)
    close(got[0], want[0], 1e-4)
    for a, b in zip(got[1], want[1]):
        close(a, b, 1e-4)
