"""LoRA / QLoRA in the model layer: exact base at init, adapter-only training, merge, dropout, quantised
bases against NumPy transcriptions of their formats, sharded == unsharded, PEFT export/import vs peft."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign.config import ConfigError, LoRAConfig, ModelConfig, load_config
from jalign.models import lora, quant
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close

CFG = ModelConfig(vocab_size=64, hidden=128, mlp=96, layers=2, heads=4, kv_heads=2)
ALL = LoRAConfig(rank=4, alpha=8.0, targets="all-linear")
# QLoRA appendix E: the 16 values of the 4-bit NormalFloat data type.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def rows(B=4, T=16, vocab=64, seed=0):
    """Learnable rows (t_{i+1} = 3 t_i + 1 mod V), the second row packed with two segments, one padded."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, (B, 1))
    seq = [start]
    for _ in range(T):
        seq.append((3 * seq[-1] + 1) % vocab)
    seq = np.concatenate(seq, 1)
    seg = np.ones((B, T), np.int32)
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    seg[1, T // 2:], pos[1, T // 2:] = 2, np.arange(T - T // 2)
    seg[2, -3:] = 0
    return {"tokens": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32), "positions": pos.astype(
        np.int32), "segment_ids": seg, "mask": (seg > 0).astype(np.float32)}


def logits_of(params, b, cfg=CFG):
    hidden = tfm.forward(params, b["tokens"], b["positions"], b["segment_ids"], cfg)
    return tfm.lm_logits(params, hidden, cfg)


def lm_loss(params, b, cfg=CFG):
    logp = jax.nn.log_softmax(logits_of(params, b, cfg), -1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * b["mask"]) / jnp.sum(b["mask"])


def adapter_logits(base, adapters, lcfg, b, cfg=CFG):
    return jax.jit(lambda p, a: logits_of(lora.with_adapters(p, a, lcfg), b, cfg))(base, adapters)


def random_adapters(cfg, lcfg, seed=1, b_std=0.05):
    """Adapters with a non-zero B (as after training), so the adapter path is exercised."""
    ad = params_lib.init_params(lora.declare_lora(cfg, lcfg), seed)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, b_std, x.shape), x.dtype) if path[-1].key == "b" else x, ad)


@pytest.fixture(scope="module")
def base():
    return params_lib.init_params(tfm.declare_params(CFG), 0)


# ---- declarations, init, counts -----------------------------------------------------------------
def test_declarations_init_and_counts():
    decls = lora.declare_lora(CFG, ALL)["layers"]
    D, F, H, KV, hd, L, r = 128, 96, 4, 2, 32, 2, 4
    assert decls["q"]["a"].shape == (L, D, r) and decls["q"]["b"].shape == (L, r, H, hd)
    assert decls["q"]["b"].axes == ("layers", "lora_rank", "heads", "head_dim")
    assert decls["o"]["a"].shape == (L, H, hd, r)
    assert decls["o"]["a"].axes == ("layers", "heads", "head_dim", "lora_rank")
    assert decls["down"]["a"].axes == ("layers", "mlp", "lora_rank") and decls["down"]["b"].shape == (L, r, D)
    ad = params_lib.init_params({"layers": decls}, 3)
    for name, (fan_in, _) in {"q": (D, 0), "o": (H * hd, 0), "down": (F, 0)}.items():
        a, bound = np.asarray(ad["layers"][name]["a"]), 1 / np.sqrt(fan_in)  # PEFT: kaiming_uniform(a=sqrt(5))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert abs(a.std() / (bound / np.sqrt(3)) - 1) < 0.1
        assert not np.any(np.asarray(ad["layers"][name]["b"]))
    # r * (in + out) per layer and target, from the config dims alone.
    dims = {"q": (D, H * hd), "k": (D, KV * hd), "v": (D, KV * hd), "o": (H * hd, D), "gate": (D, F), "up": (D, F),
            "down": (F, D)}
    assert lora.param_count({"layers": decls}) == sum(L * r * (i + o) for i, o in dims.values())
    qv = LoRAConfig(rank=8, targets=["v", "q"])
    assert lora.resolve_targets(qv) == ("q", "v")
    assert lora.param_count(lora.declare_lora(CFG, qv)) == L * 8 * (D + H * hd + D + KV * hd)
    # Llama-3-8B, rank 16 on every linear layer: PEFT reports 41,943,040 trainable parameters.
    llama8b = ModelConfig(vocab_size=128256, hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8)
    s = lora.trainable_summary(llama8b, LoRAConfig(rank=16, alpha=32))
    assert s["trainable"] == 41_943_040 and s["base"] == 8_030_261_248


def test_linear_matches_numpy():
    """y = x W + s (x A) B for every einsum of the layer, against NumPy."""
    rng = np.random.default_rng(0)
    cases = {"btd,dhk->bthk": ((3,), (3, 2, 4)), "bthk,hkd->btd": ((2, 4), (2, 4, 6)), "btf,fd->btd": ((7,), (7, 5))}
    for eq, (x_in, w_shape) in cases.items():
        n_in = len(x_in)
        x = rng.normal(size=(2, 3, *x_in)).astype(np.float32)
        w = rng.normal(size=w_shape).astype(np.float32)
        a = rng.normal(size=(*w_shape[:n_in], 3)).astype(np.float32)
        b = rng.normal(size=(3, *w_shape[n_in:])).astype(np.float32)
        node = lora.LoRAWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), None, 0.5, 0.0)
        got = np.asarray(lora.linear(eq, jnp.asarray(x), node, jnp.float32))
        xf, af, bf = x.reshape(6, -1), a.reshape(-1, 3), b.reshape(3, -1)
        want = (xf @ w.reshape(af.shape[0], -1) + 0.5 * (xf @ af) @ bf).reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_zero_b_gives_exactly_the_base(base):
    b = rows()
    ad = params_lib.init_params(lora.declare_lora(CFG, ALL), 1)
    want = np.asarray(jax.jit(logits_of)(base, b))
    assert np.array_equal(adapter_logits(base, ad, ALL, b), want)
    qbase = quant.quantize_params(base, tfm.declare_params(CFG), "nf4")
    assert np.array_equal(adapter_logits(qbase, ad, ALL, b), np.asarray(jax.jit(logits_of)(qbase, b)))


# ---- training touches only the adapters; merge == base + adapters ---------------------------------
def train_adapters(base, adapters, lcfg, b, steps, lr=1e-2):
    opt = optax.adam(lr)

    @jax.jit
    def step(adapters, opt_state, base, key):
        loss, g = jax.value_and_grad(lambda a: lm_loss(lora.with_adapters(base, a, lcfg, key=key), b))(adapters)
        upd, opt_state = opt.update(g, opt_state, adapters)
        return optax.apply_updates(adapters, upd), opt_state, loss

    opt_state, losses = opt.init(adapters), []
    for i in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state, base, jax.random.key(i))
        losses.append(float(loss))
    return adapters, opt_state, losses


def test_training_updates_only_adapters_and_merge_matches(base):
    b = rows()
    before = jax.tree.map(np.array, base)
    ad0 = params_lib.init_params(lora.declare_lora(CFG, ALL), 1)
    ad, opt_state, losses = train_adapters(base, ad0, ALL, b, steps=5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), base, before)  # bit-identical
    changed = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), ad, ad0)
    assert all(jax.tree.leaves(changed)), changed
    # The optimizer state holds exactly the adapters' shapes (Adam mu and nu), nothing of the base.
    state_leaves = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in state_leaves) == 2 * lora.param_count(ad)
    merged = lora.merge_adapters(base, ad, ALL)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    with_ad = adapter_logits(base, ad, ALL, b)
    assert_trees_close(np.asarray(jax.jit(logits_of)(merged, b)), with_ad, rtol=1e-5)
    assert np.abs(with_ad - np.asarray(jax.jit(logits_of)(base, b))).max() > 1e-3  # the adapters did change it


def test_dropout_only_on_the_adapter_input():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
    w, a = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32), jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    bz, b = jnp.zeros((2, 12)), jnp.asarray(rng.normal(size=(2, 12)), jnp.float32)
    eq, key = "btd,df->btf", jax.random.key(0)
    plain = lora.linear(eq, x, w, jnp.float32)
    assert np.array_equal(lora.linear(eq, x, lora.LoRAWeight(w, a, bz, key, 2.0, 0.5), jnp.float32), plain)
    no_drop = lora.linear(eq, x, lora.LoRAWeight(w, a, b, None, 2.0, 0.5), jnp.float32)
    assert np.allclose(no_drop, lora.linear(eq, x, lora.LoRAWeight(w, a, b, None, 2.0, 0.0), jnp.float32))
    f = jax.jit(jax.vmap(lambda k: lora.linear(eq, x, lora.LoRAWeight(w, a, b, k, 2.0, 0.5), jnp.float32)))
    samples = np.asarray(f(jax.random.split(key, 2000)))
    assert np.abs(samples[0] - no_drop).max() > 0.1  # a mask was applied
    delta = np.asarray(no_drop - plain)  # inverted dropout: unbiased in expectation
    assert np.abs(samples.mean(0) - no_drop).max() < 0.15 * np.abs(delta).max()
    # In the model: each layer and target draws its own mask; no key means no dropout.
    drop = LoRAConfig(rank=4, alpha=8.0, dropout=0.3)
    params = lora.with_adapters({"layers": {"q": jnp.zeros((2, 16, 4, 4)), "v": jnp.zeros((2, 16, 4, 4))}},
                                {"layers": {n: {"a": jnp.zeros((2, 16, 4)), "b": jnp.zeros((2, 4, 4, 4))}
                                            for n in ("q", "v")}}, drop, key=key)
    kq, kv = (np.asarray(jax.random.key_data(params["layers"][n].key)) for n in ("q", "v"))
    assert len({tuple(k) for k in np.concatenate([kq, kv])}) == 4
    assert lora.with_adapters({"layers": {"q": 0}}, {"layers": {"q": {"a": jnp.zeros((2, 1)), "b": 0}}},
                              drop)["layers"]["q"].key is None


def test_model_forward_with_dropout_is_keyed(base):
    b, drop = rows(), LoRAConfig(rank=4, alpha=8.0, dropout=0.5)
    ad = random_adapters(CFG, drop)
    f = jax.jit(lambda a, k: logits_of(lora.with_adapters(base, a, drop, key=k), b))
    l1, l1b, l2 = f(ad, jax.random.key(1)), f(ad, jax.random.key(1)), f(ad, jax.random.key(2))
    assert np.array_equal(l1, l1b) and not np.allclose(l1, l2)
    assert not np.allclose(l1, adapter_logits(base, ad, drop, b))


def test_kv_cache_decode_with_adapters_on_a_quantised_base(base):
    """Generation path: prefill + one-token decode steps through the KV cache == one full forward."""
    b, lcfg = rows(), LoRAConfig(rank=4, alpha=8.0)
    params = lora.with_adapters(quant.quantize_params(base, tfm.declare_params(CFG), "nf4"),
                                random_adapters(CFG, lcfg), lcfg)
    tokens = b["tokens"][:, :8]
    pos, seg = jnp.broadcast_to(jnp.arange(8), tokens.shape), jnp.ones_like(tokens)
    full = jax.jit(lambda p: tfm.forward(p, tokens, pos, seg, CFG))(params)
    step = jax.jit(lambda p, c, i, t, ps, sg: tfm.forward(p, t, ps, sg, CFG, cache=c, cache_index=i))
    cache = tfm.init_cache(CFG, tokens.shape[0], 8)
    h, cache = step(params, cache, 0, tokens[:, :5], pos[:, :5], seg[:, :5])
    outs = [h]
    for i in range(5, 8):
        h, cache = step(params, cache, i, tokens[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1])
        outs.append(h)
    assert_trees_close(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5)


# ---- QLoRA: formats against NumPy, logits, memory, training ---------------------------------------
def nf4_numpy(w: np.ndarray, embed_axis: int, block: int):
    """QLoRA's blockwise NF4 in NumPy: absmax per block of `block` along d_model, nearest code."""
    wm = np.moveaxis(w, embed_axis, -1)
    blocks = wm.reshape(*wm.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    codes = np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(-1)
    deq = (NF4[codes] * absmax).reshape(wm.shape)
    return np.moveaxis(deq, -1, embed_axis), np.moveaxis(np.broadcast_to(absmax, blocks.shape).reshape(wm.shape),
                                                         -1, embed_axis)


EMBED_AXIS = {"q": 1, "k": 1, "v": 1, "o": 3, "gate": 1, "up": 1, "down": 2}
IN_AXES = {"q": (1,), "k": (1,), "v": (1,), "o": (1, 2), "gate": (1,), "up": (1,), "down": (1,)}


def test_int8_within_half_a_step_per_channel(base):
    q = quant.quantize_params(base, tfm.declare_params(CFG), "int8")
    for name in quant.LINEARS:
        w, node = np.asarray(base["layers"][name]), q["layers"][name]
        assert node["qvalue"].dtype == jnp.int8
        deq = np.asarray(quant.dequantize(node))
        absmax = np.abs(w).max(axis=IN_AXES[name], keepdims=True)  # per layer and output channel
        err = np.abs(deq - w)
        assert np.all(err <= absmax / 255 * (1 + 1e-4)), name  # half a step of absmax / 127.5, plus f32 rounding
        assert err.max() > 0.2 * (absmax / 255).min()  # it is quantised, not a copy


def test_nf4_matches_numpy_and_bound(base):
    half_gap = np.diff(NF4).max() / 2
    q = quant.quantize_params(base, tfm.declare_params(CFG), "nf4")
    qdq = quant.quantize_params(base, tfm.declare_params(CFG), "nf4_dq")
    for name in quant.LINEARS:
        w = np.asarray(base["layers"][name])
        want, absmax = nf4_numpy(w, EMBED_AXIS[name], 64)
        codes = q["layers"][name]["qvalue"]  # two 4-bit codes per byte along d_model
        assert codes.dtype == jnp.uint8 and codes.shape[EMBED_AXIS[name]] * 2 == w.shape[EMBED_AXIS[name]]
        deq = np.asarray(quant.dequantize(q["layers"][name]))
        np.testing.assert_allclose(deq, want, rtol=0, atol=1e-7)
        assert np.all(np.abs(deq - w) <= absmax * half_gap * (1 + 1e-5)), name
        # Double quantisation: the absmaxes on a 255-step grid over [0, max] add at most max / 510.
        deq2 = np.asarray(quant.dequantize(qdq["layers"][name]))
        assert np.all(np.abs(deq2 - w) <= absmax * half_gap + absmax.max() / 510 * 1.001), name
        assert np.abs(deq2 - deq).max() > 0
    assert quant.tree_bytes(qdq) < quant.tree_bytes(q)


# Relative RMS error of the logits (centred per row) against the f32 base. For Gaussian weights the
# weights' own relative RMS error is ~0.7% for per-channel int8 and ~10% for NF4; the logits of this
# random model inherit about that (measured: int8 0.8%, nf4 11.6%), and the bounds leave some room.
@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("nf4", 0.15), ("nf4_dq", 0.15)])
def test_quantized_base_logits(base, fmt, tol):
    """On-the-fly dequantisation == the dequantised weights; close to the f32 base (relative RMS)."""
    b = rows()
    qbase = quant.quantize_params(base, tfm.declare_params(CFG), fmt)
    got = np.asarray(jax.jit(logits_of)(qbase, b))
    assert_trees_close(got, np.asarray(jax.jit(logits_of)(quant.dequantize_params(qbase), b)), rtol=1e-5)
    ref = np.asarray(jax.jit(logits_of)(base, b))
    rel = np.sqrt(np.mean((got - ref) ** 2) / np.mean((ref - ref.mean(-1, keepdims=True)) ** 2))
    assert 0 < rel < tol, rel


def test_base_memory_measured(base):
    decls = tfm.declare_params(CFG)
    n_lin = sum(np.asarray(base["layers"][n]).size for n in quant.LINEARS)
    n_rest = lora.param_count(base) - n_lin
    sizes = {}
    for fmt in quant.FORMATS:
        q = quant.quantize_params(base, decls, fmt)
        sizes[fmt] = quant.tree_bytes(q)
        # XLA's own count of the argument bytes agrees (uint4 is stored packed).
        compiled = jax.jit(lambda t: jax.tree.leaves(t)[0], keep_unused=True).lower(q).compile()
        assert compiled.memory_analysis().argument_size_in_bytes == sizes[fmt], fmt
        assert quant.tree_bytes(quant.abstract_quantized(decls, fmt)) == sizes[fmt]
    f32 = quant.tree_bytes(base)
    assert f32 == 4 * (n_lin + n_rest)
    assert sizes["nf4"] == 4 * n_rest + n_lin // 2 + 4 * n_lin // 64
    assert sizes["nf4_dq"] < sizes["nf4"] < sizes["int8"] < f32


def test_quantized_base_is_not_materialised_in_training():
    """XLA's own accounting of a LoRA gradient step: a quantised base takes its own bytes as arguments
    and adds no temporaries over the f32 base (no dequantised copy of the layers kept for backward)."""
    cfg = ModelConfig(vocab_size=64, hidden=256, mlp=512, layers=6, heads=4, kv_heads=2)
    decls, lcfg = tfm.declare_params(cfg), LoRAConfig(rank=4, alpha=8.0)
    b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rows(B=4, T=32, vocab=64))
    ad = params_lib.abstract_params(lora.declare_lora(cfg, lcfg))
    grad = jax.jit(jax.grad(lambda a, base, b: lm_loss(lora.with_adapters(base, a, lcfg), b, cfg)))
    mem = {}
    for fmt in (None, "int8", "nf4"):
        frozen = quant.abstract_quantized(decls, fmt) if fmt else params_lib.abstract_params(decls)
        mem[fmt] = grad.lower(ad, frozen, b).compile().memory_analysis()
        assert mem[fmt].argument_size_in_bytes == quant.tree_bytes((ad, frozen, b))
    # Slack of 64 KiB for bookkeeping; a copy of the layers would be >= 1 byte per weight (3.5 MB here).
    for fmt in ("int8", "nf4"):
        assert mem[fmt].temp_size_in_bytes <= mem[None].temp_size_in_bytes + 2**16, fmt


def test_qlora_training_lowers_loss(base):
    b = rows(seed=3)
    qbase = quant.quantize_params(base, tfm.declare_params(CFG), "nf4")
    before = jax.tree.map(np.array, qbase)
    lcfg = LoRAConfig(rank=8, alpha=16.0, dropout=0.05)
    ad, _, losses = train_adapters(qbase, params_lib.init_params(lora.declare_lora(CFG, lcfg), 1), lcfg, b, steps=20)
    assert losses[-1] < 0.8 * losses[0], losses
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), qbase, before)
    # Merging dequantises the base: plain f32 params giving the QLoRA model's logits.
    merged = lora.merge_adapters(qbase, ad, lcfg)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert_trees_close(np.asarray(jax.jit(logits_of)(merged, b)), adapter_logits(qbase, ad, lcfg, b), rtol=1e-5)


def test_quantize_errors():
    decls = tfm.declare_params(ModelConfig(vocab_size=64, hidden=96, mlp=64, layers=1, heads=2, kv_heads=2))
    with pytest.raises(ValueError, match="layers/q: d_model=96 is not divisible by the nf4 block size 64"):
        quant.abstract_quantized(decls, "nf4")
    with pytest.raises(ValueError, match="unknown format 'nf3'"):
        quant.abstract_quantized(decls, "nf3")


# ---- sharded == unsharded --------------------------------------------------------------------------
@pytest.mark.parametrize("shape,fmt", [((2, 2, 2, 1), None), ((1, 4, 2, 1), None), ((2, 2, 2, 1), "nf4"),
                                       ((1, 4, 2, 1), "int8")])
def test_sharded_matches_unsharded(base, shape, fmt):
    b, lcfg = rows(B=8), LoRAConfig(rank=4, alpha=8.0, targets=["q", "v", "o", "down"])
    decls, ldecls = tfm.declare_params(CFG), lora.declare_lora(CFG, lcfg)
    ad = random_adapters(CFG, lcfg)
    frozen = quant.quantize_params(base, decls, fmt, block_size=32) if fmt else base

    def loss_and_grad(frozen, ad, b):
        return jax.value_and_grad(lambda a: lm_loss(lora.with_adapters(frozen, a, lcfg), b))(ad)

    def fwd(frozen, ad, b):
        return logits_of(lora.with_adapters(frozen, ad, lcfg), b)

    want_logits = np.asarray(jax.jit(fwd)(frozen, ad, b))
    want_loss, want_grad = jax.jit(loss_and_grad)(frozen, ad, b)
    mesh, rules = make_mesh(*shape), make_rules()
    frozen_sh = (quant.quantized_shardings(decls, fmt, mesh, rules, block_size=32) if fmt
                 else params_lib.param_shardings(decls, mesh, rules))
    ad_sh = params_lib.param_shardings(ldecls, mesh, rules)
    assert ad_sh["layers"]["q"]["b"].spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    frozen_d, ad_d = jax.device_put(frozen, frozen_sh), jax.device_put(ad, ad_sh)
    if fmt:  # quantising a sharded base straight into the declared shardings gives the same tree
        q = quant.quantize_params(jax.device_put(base, params_lib.param_shardings(decls, mesh, rules)), decls, fmt,
                                  block_size=32, shardings=frozen_sh)
        jax.tree.map(lambda x, y, s: (np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                                      x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding))),
                     q, frozen, frozen_sh)
    with use_rules(mesh, rules):
        got_logits = jax.jit(fwd, in_shardings=(frozen_sh, ad_sh, None))(frozen_d, ad_d, b)
        got_loss, got_grad = jax.jit(loss_and_grad, in_shardings=(frozen_sh, ad_sh, None),
                                     out_shardings=(None, ad_sh))(frozen_d, ad_d, b)
    assert_trees_close(np.asarray(got_logits), want_logits, rtol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    assert_trees_close(jax.tree.map(np.asarray, got_grad), jax.tree.map(np.asarray, want_grad), rtol=1e-4)


# ---- config ------------------------------------------------------------------------------------------
def test_config_section():
    cfg = load_config(None, ["model.lora.rank=16", "model.lora.targets=[q, v]", "model.quantize_base=nf4"])
    assert cfg.model.lora == LoRAConfig(rank=16, alpha=16.0, dropout=0.0, targets=["q", "v"])
    assert cfg.model.quantize_base == "nf4" and load_config(None).model.lora is None
    with pytest.raises(ConfigError, match="model.lora.rnak: unknown key; did you mean 'model.lora.rank'"):
        load_config(None, ["model.lora.rnak=4"])
    with pytest.raises(ConfigError, match="model.lora.targets"):
        load_config(None, ["model.lora.targets=[q, qq]"])
    with pytest.raises(ConfigError, match="model.quantize_base"):
        load_config(None, ["model.quantize_base=int4"])
    with pytest.raises(ValueError, match="model.lora.rank: must be positive"):
        lora.declare_lora(CFG, LoRAConfig(rank=0))


# ---- PEFT export / import against peft --------------------------------------------------------------
try:
    import torch
    import transformers
except ImportError:  # the [hf] extra: only the tests below need it
    torch = transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers and torch (extra [hf])")
HF_KINDS = ["llama", "qwen2", "mistral"]


def hf_model(kind, path):
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    c = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
         "mistral": transformers.MistralConfig}[kind](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(c).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def hf_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (3, 12))
    mask = (np.arange(12)[None] < np.array([12, 7, 4])[:, None]).astype(np.int64)
    return tokens, mask


def jalign_hf_logits(params, cfg, tokens, mask):
    b = {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(mask, jnp.int32),
         "positions": jnp.asarray(np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape), jnp.int32)}
    params = jax.tree.map(np.asarray, params)  # a loaded base spread over the devices + adapters on one
    return np.asarray(jax.jit(lambda p: logits_of(p, b, cfg))(params)) * mask[..., None]


def torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()
    return out * mask[..., None]


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory):
    from jalign.models.hf_io import load_hf_params, model_config_from_hf

    out = {}
    for kind in HF_KINDS:
        d = tmp_path_factory.mktemp(kind)
        hf_model(kind, d)
        cfg = model_config_from_hf(d)
        out[kind] = (d, cfg, load_hf_params(d, cfg))
    return out


@needs_hf
@pytest.mark.parametrize("kind", HF_KINDS)
def test_peft_export_loads_in_peft_and_merged_checkpoint(hf_bases, kind, tmp_path):
    peft = pytest.importorskip("peft")
    from jalign.models.peft_io import save_merged_hf, save_peft

    d, cfg, base = hf_bases[kind]
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets="all-linear" if kind != "mistral" else ["q", "k", "o", "up"])
    ad = random_adapters(cfg, lcfg, b_std=0.1)
    tokens, mask = hf_batch()
    ours = jalign_hf_logits(lora.with_adapters(base, ad, lcfg), cfg, tokens, mask)
    save_peft(ad, lcfg, cfg, tmp_path / "adapter", base_model_name_or_path=str(d))
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d), tmp_path / "adapter")
    theirs = torch_logits(model.eval(), tokens, mask)
    assert np.abs(theirs - jalign_hf_logits(base, cfg, tokens, mask)).max() > 1e-2  # the adapter is applied
    assert_trees_close(ours, theirs, rtol=1e-4)
    save_merged_hf(base, ad, lcfg, cfg, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_trees_close(torch_logits(merged, tokens, mask), ours, rtol=1e-4)


@needs_hf
@pytest.mark.parametrize("kind,targets,rslora", [("llama", ["q_proj", "v_proj", "o_proj", "down_proj"], False),
                                                 ("qwen2", "all-linear", True)])
def test_peft_made_adapter_imports(hf_bases, kind, targets, rslora, tmp_path):
    peft = pytest.importorskip("peft")
    from jalign.models.peft_io import load_peft, save_peft
    from safetensors.numpy import load_file

    d, cfg, base = hf_bases[kind]
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(d), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False, use_rslora=rslora))
    model.save_pretrained(tmp_path / "theirs")
    tokens, mask = hf_batch()
    theirs = torch_logits(model.eval(), tokens, mask)
    assert np.abs(theirs - jalign_hf_logits(base, cfg, tokens, mask)).max() > 1e-2  # peft's adapter is not a no-op
    ad, lcfg = load_peft(tmp_path / "theirs", cfg)
    assert lcfg.rank == 4 and lcfg.dropout == 0.1
    assert lcfg.alpha == pytest.approx(8 * 2.0 if rslora else 8)  # rsLoRA's alpha / sqrt(r) == alpha' / r
    assert list(lcfg.targets) == (["q", "v", "o", "down"] if targets != "all-linear" else list(lora.TARGETS))
    assert_trees_close(jalign_hf_logits(lora.with_adapters(base, ad, lcfg), cfg, tokens, mask), theirs, rtol=1e-4)
    # Straight onto a mesh: each adapter gets the sharding of its declaration.
    mesh = make_mesh(2, 2, 2, 1)
    ad_m, _ = load_peft(tmp_path / "theirs", cfg, mesh=mesh)
    want_sh = params_lib.param_shardings(lora.declare_lora(cfg, lcfg), mesh)
    jax.tree.map(lambda x, y, s: (np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                                  x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(x.sharding))),
                 ad_m, ad, want_sh)
    # Exported again, the tensors are peft's own, bit for bit.
    save_peft(ad, lcfg, cfg, tmp_path / "ours")
    a, b = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), load_file(tmp_path / "ours" /
                                                                                    "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@needs_hf
def test_peft_import_errors(hf_bases, tmp_path):
    from safetensors.numpy import load_file, save_file

    from jalign.models.hf_io import HFCheckpointError
    from jalign.models.peft_io import load_peft, save_peft

    _, cfg, _ = hf_bases["llama"]
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=["q", "v"])
    src = tmp_path / "a"
    save_peft(random_adapters(cfg, lcfg), lcfg, cfg, src)
    c = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**c, "use_dora": True}))
    with pytest.raises(HFCheckpointError, match=r"adapter_config.json: use_dora=True is not supported \(DoRA\)"):
        load_peft(src, cfg)
    (src / "adapter_config.json").write_text(json.dumps(c))
    w = load_file(src / "adapter_model.safetensors")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in w.items() if k != gone}, src / "adapter_model.safetensors")
    with pytest.raises(HFCheckpointError, match=r"no lora_B for self_attn.v_proj in layers \[1\]"):
        load_peft(src, cfg)
    save_file({**w, gone: np.zeros((w[gone].shape[0], 5), np.float32)}, src / "adapter_model.safetensors")
    with pytest.raises(HFCheckpointError, match=r"tensor .*layers.1.self_attn.v_proj.lora_B.weight has shape \[32, 5"):
        load_peft(src, cfg)
    with pytest.raises(HFCheckpointError, match="missing adapter_config.json"):
        load_peft(tmp_path, cfg)
