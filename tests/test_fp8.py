"""FP8 matmuls (``model.matmul_fp8``, ``jalign.models.fp8``).

- ``fp8_einsum`` equals a NumPy transcription (ml_dtypes float8) of quantise -> matmul -> dequantise, forward
  and both gradients, on the einsums the model uses; and it is really fp8 (far from the f32 einsum).
- The model: fp8 off leaves the forward params untouched (the forward is today's, bit for bit); fp8 on changes
  the logits by about fp8's rounding; LoRA over an fp8 base; the config combinations that cannot apply fail.
- The tiny SFT with fp8 matmuls reaches the f32 run's loss within a stated tolerance (CPU: XLA emulates fp8 by
  converting the operands back to f32, so this is about the numbers, not speed).
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jalign.config import ConfigError, LoRAConfig, ModelConfig, load_config
from jalign.models import fp8, lora
from jalign.models import transformer as tfm
from jalign.models.params import init_params

ROOT = Path(__file__).parent.parent
EINSUMS = [("btd,dhk->bthk", (2, 5, 16), (16, 4, 8)),  # q/k/v
           ("bthk,hkd->btd", (2, 5, 4, 8), (4, 8, 16)),  # o
           ("btd,df->btf", (3, 4, 16), (16, 24))]  # gate/up/down


def _np_quantize(a, dtype):
    """The docstring's q, s: s = amax / max(dtype) in float32, q = cast(clip(a / s)); q returned as float64."""
    m = float(ml_dtypes.finfo(dtype).max)
    amax = np.float32(np.abs(a).max())
    s = np.float32(amax / np.float32(m)) if amax > 0 else np.float32(1.0)
    return np.clip(a / s, -m, m).astype(dtype).astype(np.float64), np.float64(s)


def _np_fp8(eq, x, w, g):
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    qx, sx = _np_quantize(x, ml_dtypes.float8_e4m3fn)
    qw, sw = _np_quantize(w, ml_dtypes.float8_e4m3fn)
    qg, sg = _np_quantize(g, ml_dtypes.float8_e5m2)
    y = np.einsum(eq, qx, qw) * sx * sw
    dx = np.einsum(f"{out},{rhs}->{lhs}", qg, qw) * sg * sw
    dw = np.einsum(f"{lhs},{out}->{rhs}", qx, qg) * sx * sg
    return y, dx, dw


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("eq,xs,ws", EINSUMS)
def test_fp8_einsum_equals_numpy_quantise_matmul_dequantise(eq, xs, ws):
    rng = np.random.default_rng(0)
    x = rng.normal(size=xs).astype(np.float32) * 3.0
    w = rng.normal(size=ws).astype(np.float32) * 0.05
    y_shape = jax.eval_shape(lambda: jnp.einsum(eq, x, w)).shape
    g = rng.normal(size=y_shape).astype(np.float32) * 1e-3
    y, vjp = jax.vjp(jax.jit(lambda x, w: fp8.fp8_einsum(eq, x, w, jnp.float32)), x, w)
    dx, dw = vjp(g)
    ry, rdx, rdw = _np_fp8(eq, x, w, g)
    # Same codes and scales: only the f32 (XLA) vs f64 (NumPy) accumulation differs.
    assert _rel(y, ry) < 1e-6 and _rel(dx, rdx) < 1e-6 and _rel(dw, rdw) < 1e-6, (_rel(y, ry), _rel(dx, rdx))
    # ... and it is fp8: e4m3's 3 mantissa bits put the result percents away from the f32 einsum.
    exact, vjp32 = jax.vjp(lambda x, w: jnp.einsum(eq, x, w, precision="highest"), x, w)
    dx32, dw32 = vjp32(g)
    assert 1e-3 < _rel(y, np.asarray(exact, np.float64)) < 0.15
    assert 1e-3 < _rel(dx, np.asarray(dx32, np.float64)) < 0.3 and 1e-3 < _rel(dw, np.asarray(dw32, np.float64)) < 0.3


def test_fp8_einsum_dtypes_zeros_and_large_values():
    rng = np.random.default_rng(1)
    eq = "btd,df->btf"
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)  # f32 master weight, bf16 compute
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_einsum(eq, x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(jnp.ones(y.shape, y.dtype))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    # An all-zero operand (a fresh LoRA B, a masked row block) gives zeros, not NaN from 0 / 0.
    y0, vjp0 = jax.vjp(lambda x, w: fp8.fp8_einsum(eq, x, w, jnp.float32), jnp.zeros((2, 3, 8)), w)
    assert not np.any(np.asarray(y0)) and all(np.all(np.isfinite(t)) for t in vjp0(jnp.ones(y0.shape)))
    # Values far beyond e4m3's +-448 are scaled into range, not saturated into NaN.
    big = jnp.asarray(rng.normal(size=(2, 3, 8)) * 1e6, jnp.float32)
    yb = fp8.fp8_einsum(eq, big, w, jnp.float32)
    ry, _, _ = _np_fp8(eq, np.asarray(big), np.asarray(w), np.ones(yb.shape, np.float32))
    assert np.all(np.isfinite(yb)) and _rel(yb, ry) < 1e-6


def test_fp8_einsum_rejects_an_index_in_one_operand_only():
    with pytest.raises(ValueError, match="index 'e'"):
        fp8.fp8_einsum("bte,df->btf", jnp.ones((1, 2, 3)), jnp.ones((4, 5)), jnp.float32)


def _model():
    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=48, layers=2, heads=4, kv_heads=2, max_seq_len=16)
    params = init_params(tfm.declare_params(cfg), 0)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    return cfg, params, tokens, pos, jnp.ones((2, 8), jnp.int32)


def _logits(params, cfg, tokens, pos, seg):
    return tfm.lm_logits(params, tfm.forward(params, tokens, pos, seg, cfg), cfg)


def test_trainable_fp8_off_is_todays_forward_and_on_is_fp8():
    from jalign.algorithms.trainable import Trainable

    cfg, params, tokens, pos, seg = _model()
    off = Trainable(cfg, tfm.declare_params(cfg)).forward_params(params, {})
    assert off is params  # untouched: the forward with fp8 off is today's, bit for bit
    on_cfg = ModelConfig(**{**cfg.__dict__, "matmul_fp8": True})
    on = Trainable(on_cfg, tfm.declare_params(on_cfg)).forward_params(params, {})
    assert all(isinstance(on["layers"][n], fp8.Fp8Weight) for n in ("q", "k", "v", "o", "gate", "up", "down"))
    assert on["embed"] is params["embed"] and on["layers"]["attn_norm"] is params["layers"]["attn_norm"]
    ref, got = _logits(params, cfg, tokens, pos, seg), _logits(on, on_cfg, tokens, pos, seg)
    assert 1e-4 < _rel(got, np.asarray(ref, np.float64)) < 0.1
    # The gradient reaches the wrapped weights (the trained params), in their dtype.
    grads = jax.grad(lambda p: jnp.sum(_logits(fp8.with_fp8(p), on_cfg, tokens, pos, seg) ** 2))(params)
    assert grads["layers"]["q"].dtype == jnp.float32 and np.abs(np.asarray(grads["layers"]["q"])).max() > 0


def test_lora_over_an_fp8_base():
    cfg, params, tokens, pos, seg = _model()
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets="all-linear")
    adapters = init_params(lora.declare_lora(cfg, lcfg), 1)  # B = 0: the adapted model is the base
    base8 = fp8.with_fp8(params)
    with_ad = lora.with_adapters(base8, adapters, lcfg)
    assert isinstance(with_ad["layers"]["q"].base, fp8.Fp8Weight)
    np.testing.assert_array_equal(_logits(with_ad, cfg, tokens, pos, seg), _logits(base8, cfg, tokens, pos, seg))
    g = jax.grad(lambda a: jnp.sum(_logits(lora.with_adapters(base8, a, lcfg), cfg, tokens, pos, seg) ** 2))(adapters)
    assert np.abs(np.asarray(g["layers"]["q"]["b"])).max() > 0  # the adapters train through the fp8 base


def test_fp8_with_a_quantised_base_is_a_config_error():
    from jalign.algorithms.trainable import Trainable

    cfg = ModelConfig(hidden=64, lora=LoRAConfig(rank=4), quantize_base="nf4", matmul_fp8=True)
    with pytest.raises(ConfigError, match="model.matmul_fp8 with model.quantize_base='nf4'"):
        Trainable(cfg, tfm.declare_params(cfg))


def test_matmul_fp8_is_a_config_key(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", ["model.matmul_fp8=true"])
    assert cfg.model.matmul_fp8 is True
    assert load_config(ROOT / "configs/sft_tiny.yaml", []).model.matmul_fp8 is False


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 2, 1)])
def test_fp8_sharded_equals_unsharded(shape):
    """The per-tensor scales are global (amax over the whole sharded tensor, an all-reduce), so a sharded fp8
    forward and its gradients equal the unsharded ones up to float reduction order."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jalign.models import params as params_lib
    from sharding import make_mesh, make_rules, use_rules

    cfg = ModelConfig(vocab_size=64, hidden=32, mlp=48, layers=2, heads=4, kv_heads=2, max_seq_len=16)
    decls = tfm.declare_params(cfg)
    params = init_params(decls, 0)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 64, (8, 8)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (8, 8))
    seg = jnp.ones((8, 8), jnp.int32)

    def loss(p, t):
        return jnp.mean(_logits(fp8.with_fp8(p), cfg, t, pos, seg) ** 2)

    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(params, tokens)
    mesh, rules = make_mesh(*shape), make_rules()
    sh = params_lib.param_shardings(decls, mesh, rules)
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with use_rules(mesh, rules):
        got_loss, got_grad = jax.jit(jax.value_and_grad(loss), in_shardings=(sh, batch_sh), out_shardings=(None, sh))(
            jax.device_put(params, sh), jax.device_put(tokens, batch_sh))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                         atol=1e-4 * float(np.abs(np.asarray(b)).max())),
                 got_grad, want_grad)
