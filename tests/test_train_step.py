"""The jitted supervised step: sharded == single device, accumulation == big batch, packing == padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jalign.algorithms import base
from jalign.data.fields import SFT_FIELDS
from jalign.state import TrainedModel, adam_count
from jalign.config import ModelConfig, OptimConfig
from jalign.losses import sft_loss
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from sharding import make_mesh, make_rules, use_rules
from sharding.rules import ShardingRuleError
from helpers import assert_trees_close

CFG = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=2, heads=8, kv_heads=4)
# eps well above float32 gradient noise: Adam's first update lr*g/(|g|+eps) is then a smooth function
# of g, so "sharded == unsharded" can be asserted tightly on the updated params.
OPT = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=1.0, eps=1e-4)


def make_sft_loss(cfg):
    def sft_loss_fn(params, mb, norms, frozen):
        logps = base.policy_token_logps(params, mb, cfg)
        loss, m = sft_loss(logps, mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": m["num_tokens"]}

    return sft_loss_fn


sft_loss_fn = make_sft_loss(CFG)


def normalizers(batch):
    return {"num_tokens": jnp.sum(batch["loss_mask"])}


def random_rows(rows, T, seed=0, vocab=64):
    """Packed rows: two segments per row with restarted positions and a partial loss mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, T)).astype(np.int32)
    targets = rng.integers(3, vocab, (rows, T)).astype(np.int32)
    cut = T // 2 + 3
    seg = np.where(np.arange(T) < cut, 1, 2).astype(np.int32)
    seg[-2:] = 0  # padding at the end
    segment_ids = np.broadcast_to(seg, (rows, T)).copy()
    positions = np.where(np.arange(T) < cut, np.arange(T), np.arange(T) - cut).astype(np.int32)
    positions = np.broadcast_to(positions, (rows, T)).copy()
    loss_mask = (rng.random((rows, T)) > 0.4).astype(np.float32) * (segment_ids > 0)
    return dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)


def run_step(mesh, batch_rows, accum, steps=1, cfg=CFG):
    rules = make_rules()
    decls = tfm.declare_params(CFG)
    trained = TrainedModel(decls, OPT, 10, mesh, rules, jnp.float32)
    with use_rules(mesh, rules):
        params = params_lib.init_params(decls, 0, shardings=trained.param_shardings)
        state = trained.new_state(params, jax.random.key(1))
        step = base.make_train_step(make_sft_loss(cfg), normalizers, trained)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, None, base.to_global_batch(batch_rows, SFT_FIELDS, mesh, rules, accum))
            losses.append(float(metrics["loss"]))
    return losses, state


def single_device_mesh():
    return make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
    batch = random_rows(8, 24)
    losses, state = run_step(single_device_mesh(), batch, accum=1, steps=1)
    return batch, losses, jax.device_get(state.params)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1), (2, 1, 4, 1)])
def test_sharded_step_equals_single_device(shape, reference):
    batch, ref_losses, ref_params = reference
    mesh = make_mesh(*shape)
    losses, state = run_step(mesh, batch, accum=1, steps=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.params, ref_params)
    # the arrays really are split as the rules say
    specs = params_lib.param_specs(tfm.declare_params(CFG), mesh, make_rules())
    assert specs["layers"]["q"] == P(None, "fsdp", "tensor", None)
    assert specs["embed"] == P("tensor", "fsdp")
    assert state.params["layers"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert state.params["layers"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    mu = state.opt_state[1][0].mu["layers"]["gate"]  # Adam moments follow the params
    assert mu.sharding.spec == P(None, "fsdp", "tensor")
    shard_shape = state.params["layers"]["q"].addressable_shards[0].data.shape
    assert shard_shape == (CFG.layers, CFG.hidden // shape[1], CFG.heads // shape[2], CFG.resolved_head_dim)


def test_gradient_accumulation_equals_big_batch(reference):
    batch, ref_losses, ref_params = reference
    losses, state = run_step(make_mesh(2, 2, 2, 1), batch, accum=2, steps=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.params, ref_params)


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 1, 2, 4)])
def test_sequence_parallel_step_equals_single_device(shape, reference):
    """mesh.sequence=4: ring attention with the zigzag layout, activations sharded along the sequence."""
    batch, ref_losses, ref_params = reference
    assert CFG.attention == "xla"  # the model switches to the ring from the mesh alone
    losses, state = run_step(make_mesh(*shape), batch, accum=1, steps=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_close(state.params, ref_params)


def test_nonfinite_loss_skips_update():
    batch = random_rows(8, 16)
    mesh = make_mesh(8, 1, 1, 1)
    rules = make_rules()
    decls = tfm.declare_params(CFG)
    trained = TrainedModel(decls, OPT, 10, mesh, rules, jnp.float32)

    def bad_loss(params, mb, norms, frozen):
        loss, m = sft_loss_fn(params, mb, norms, frozen)
        return loss * jnp.nan, dict(m, loss=loss * jnp.nan)

    with use_rules(mesh, rules):
        params = params_lib.init_params(decls, 0, shardings=trained.param_shardings)
        before = jax.device_get(params)
        state = trained.new_state(params, jax.random.key(1))
        step = base.make_train_step(bad_loss, normalizers, trained)
        state, metrics = step(state, None, base.to_global_batch(batch, SFT_FIELDS, mesh, rules, 1))
    assert int(metrics["skipped"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, before)
    assert int(adam_count(state.opt_state)) == 0


def test_packed_loss_equals_unpacked():
    """Two examples packed in one row give the same per-token log-probs as each alone, padded."""
    params = params_lib.init_params(tfm.declare_params(CFG), 3)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 64, 9).astype(np.int32), rng.integers(3, 64, 6).astype(np.int32)
    T = 16

    def row(parts):
        tok = np.zeros(T, np.int32); tgt = np.zeros(T, np.int32); seg = np.zeros(T, np.int32)
        pos = np.zeros(T, np.int32); m = np.zeros(T, np.float32)
        i = 0
        for s, x in enumerate(parts, 1):
            n = len(x) - 1
            tok[i:i + n], tgt[i:i + n], seg[i:i + n], pos[i:i + n], m[i:i + n] = x[:-1], x[1:], s, np.arange(n), 1
            i += n
        return dict(tokens=tok, targets=tgt, segment_ids=seg, positions=pos, loss_mask=m)

    packed = jax.tree.map(lambda *r: np.stack(r), row([a, b]))
    unpacked = jax.tree.map(lambda *r: np.stack(r), row([a]), row([b]))
    lp_packed = np.asarray(base.policy_token_logps(params, packed, CFG))
    lp_unpacked = np.asarray(base.policy_token_logps(params, unpacked, CFG))
    np.testing.assert_allclose(lp_packed[0, :8], lp_unpacked[0, :8], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lp_packed[0, 8:13], lp_unpacked[1, :5], rtol=1e-5, atol=1e-7)
    loss_p = sft_loss(lp_packed, packed["loss_mask"])[0]
    loss_u = sft_loss(lp_unpacked, unpacked["loss_mask"])[0]
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)


def test_no_attention_across_segments():
    params = params_lib.init_params(tfm.declare_params(CFG), 4)
    batch = {k: v[:1] for k, v in random_rows(1, 24, seed=5).items()}
    seg = batch["segment_ids"][0]
    logits = lambda b: tfm.lm_logits(params, tfm.forward(params, b["tokens"], b["positions"], b["segment_ids"], CFG), CFG)  # noqa: E731
    base_logits = np.asarray(logits(batch))
    perturbed = dict(batch, tokens=batch["tokens"].copy())
    perturbed["tokens"][0, seg == 1] = (perturbed["tokens"][0, seg == 1] + 7) % 64
    new_logits = np.asarray(logits(perturbed))
    np.testing.assert_array_equal(new_logits[0, seg == 2], base_logits[0, seg == 2])
    assert np.abs(new_logits[0, seg == 1] - base_logits[0, seg == 1]).max() > 1e-3


def test_rules_validation_names_the_parameter():
    cfg = ModelConfig(vocab_size=64, hidden=36, mlp=64, layers=1, heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ShardingRuleError, match=r"^embed: dimension 1 \(embed=36\) is not divisible by mesh axes fsdp of size 8"):
        params_lib.param_specs(tfm.declare_params(cfg), make_mesh(1, 8, 1, 1), make_rules())
    with pytest.raises(ShardingRuleError, match=r"mesh axis 'tensor' is used twice"):
        params_lib.param_specs(tfm.declare_params(CFG), make_mesh(1, 1, 8, 1), make_rules({"embed": "tensor"}))
    with pytest.raises(ShardingRuleError, match=r"mesh.rules.mlp: unknown mesh axis 'tensr'"):
        make_rules({"mlp": "tensr"})


def test_make_mesh_fills_minus_one_and_keeps_tensor_inner():
    mesh = make_mesh(-1, 1, 2, 1)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids[0, 0, :, 0].tolist() == [0, 1]  # neighbouring devices share a tensor group
