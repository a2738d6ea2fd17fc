"""Packed rows for RL (``algorithm.pack_rows``): the plan places every sample, packed == unpacked for the score
pass (old and reference log-probs, critic values, reward-model rewards, advantages) and for one update (loss,
metrics, updated actor and critic) for GRPO, PPO and GSPO, no attention across packed samples, and a rollout
that does not fit runs unpacked with a logged line."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms import packed_rows as pk
from jalign.algorithms.rl_sampling import Rollout
from jalign.config import ConfigError, load_config
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.heads import token_logps
from sharding import make_mesh, make_rules, use_rules

import helpers
from helpers import assert_trees_close, roles_for

MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2"]
COMMON = MODEL + ["optim.lr=1e-2", "optim.eps=1e-4", "optim.warmup_steps=0", "optim.schedule=constant",
                  "optim.grad_clip=1.0", "data.train=builtin:addition_prompts:train", "data.eval=null",
                  "train.global_batch=4", "algorithm.num_rollouts_per_prompt=4", "algorithm.max_new_tokens=40",
                  "algorithm.temperature=0.7", "algorithm.truncated_response=keep"]


# ---- the plan, pack and unpack (no model) -----------------------------------------------------------
def ffd_reference(lengths, rows, row_len):
    """First-fit decreasing in plain Python: (row, offset) per sample, None where it does not fit."""
    fill, out = [0] * rows, [None] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):  # stable: ties keep sample order
        for r in range(rows):
            if fill[r] + lengths[b] <= row_len:
                out[b] = (r, fill[r])
                fill[r] += lengths[b]
                break
    return out


def left_padded_rows(prompt_lens, resp_lens, P, N, seed=0):
    """Rows in the rollout layout: prompt left-padded to P, then the response, then padding."""
    rng = np.random.default_rng(seed)
    n, S = len(prompt_lens), P + N
    seg = np.zeros((n, S), np.int32)
    pos = np.zeros((n, S), np.int32)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        seg[b, P - p:P + r] = 1
        pos[b, P - p:P + r] = np.arange(p + r)
    tokens = np.where(seg > 0, rng.integers(3, 288, (n, S)), 0).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int32)], 1)
    return {"tokens": tokens, "targets": targets, "positions": pos, "segment_ids": seg}


def test_plan_is_first_fit_decreasing_and_pack_unpack_round_trips():
    rng = np.random.default_rng(0)
    P, N = 8, 24
    pl, rl = rng.integers(1, P + 1, 12), np.minimum(rng.geometric(0.15, 12), N)
    rows = left_padded_rows(pl, rl, P, N)
    lengths = pl + rl
    R, C = 8, 32
    row, off, ok = jax.device_get(pk.first_fit_decreasing(jnp.asarray(lengths), R, C))
    expected = ffd_reference(list(lengths), R, C)
    for b, e in enumerate(expected):
        assert bool(ok[b]) == (e is not None)
        if e is not None:
            assert (int(row[b]), int(off[b])) == e
    assert ok.all(), "the case is meant to fit"
    view = jax.device_get(pk.packed_view({k: jnp.asarray(v) for k, v in rows.items()}, R, C))
    packed, dest = view["rows"], view["dest"]
    real = rows["segment_ids"] > 0
    # every real token lands once, in its own segment, with its own position; padding never receives one
    assert np.sum(packed["segment_ids"] > 0) == real.sum()
    np.testing.assert_array_equal(np.sort(dest[real]), np.sort(np.flatnonzero(packed["segment_ids"].reshape(-1))))
    for k in ("tokens", "targets", "positions"):
        back = np.asarray(pk.unpack(jnp.asarray(packed[k]), jnp.asarray(dest)))
        np.testing.assert_array_equal(np.where(real, back, 0), np.where(real, rows[k], 0))
    for b in range(len(pl)):
        r, o = int(row[b]), int(off[b])
        np.testing.assert_array_equal(packed["segment_ids"][r, o:o + lengths[b]], b + 1)
        np.testing.assert_array_equal(packed["positions"][r, o:o + lengths[b]], np.arange(lengths[b]))
    # one row too few: the longest samples are placed, the rest reported (the step then runs unpacked)
    assert not bool(pk.plan_fits(jnp.asarray(rows["segment_ids"]), 1, C))


def test_no_attention_across_packed_samples():
    cfg = load_config(None, MODEL).model
    params = params_lib.init_params(tfm.declare_params(cfg), 0)
    rows = left_padded_rows([5, 3, 7], [9, 20, 4], 8, 24, seed=1)
    fn = jax.jit(lambda p, r: pk.per_token(lambda x: token_logps(p, x, cfg), pk.packed_view(r, 1, 64)))
    jrows = {k: jnp.asarray(v) for k, v in rows.items()}
    packed = np.asarray(fn(params, jrows))
    assert int(jnp.max(pk.packed_view(jrows, 1, 64)["rows"]["segment_ids"])) == 3  # all three in one row
    unpacked = np.asarray(jax.jit(lambda p, r: token_logps(p, r, cfg))(params, jrows))
    real = rows["segment_ids"] > 0
    np.testing.assert_allclose(packed[real], unpacked[real], atol=2e-5)
    # new tokens for sample 1 (same lengths): samples 0 and 2, in the same packed row, see no change at all
    other = dict(rows)
    rng = np.random.default_rng(7)
    other["tokens"] = np.where(np.arange(3)[:, None] == 1, np.where(real, rng.integers(3, 288, real.shape), 0),
                               rows["tokens"]).astype(np.int32)
    other["targets"] = np.concatenate([other["tokens"][:, 1:], np.zeros((3, 1), np.int32)], 1)
    changed = np.asarray(fn(params, {k: jnp.asarray(v) for k, v in other.items()}))
    keep = real & (np.arange(3)[:, None] != 1)
    np.testing.assert_array_equal(changed[keep], packed[keep])
    assert np.abs(changed[1][real[1]] - packed[1][real[1]]).max() > 1e-3  # the changed sample did change


# ---- RL algorithms: packed == unpacked -------------------------------------------------------------
def make_reward_run(directory: Path, seed: int = 3) -> str:
    return helpers.make_reward_run(directory, MODEL, seed)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_reward_run(tmp_path_factory.mktemp("rm"))


def build(overrides, mesh=None, logs=None):
    from jalign.algorithms.registry import resolve

    cfg = load_config(None, [*COMMON, *overrides])
    mesh = mesh or make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    log = (lambda *m: logs.append(" ".join(map(str, m)))) if logs is not None else (lambda *_: None)
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path("/tmp/unused"), log=log)
    with use_rules(rt.mesh, rt.rules):
        return resolve(cfg.algorithm.name)(rt)


def long_tailed_rollout(algo, seed=0):
    """A sampler output (``rollout_rows``' input) with long-tailed response lengths and varied prompts."""
    rng = np.random.default_rng(seed)
    B, P, N = algo.sizes.rollout, algo.P, algo.N
    mx = algo.a.max_new_tokens
    pl = rng.integers(max(1, P // 3), P + 1, B)
    lengths = np.minimum(np.maximum(1, np.round(rng.lognormal(np.log(5), 0.8, B))), mx).astype(np.int32)
    lengths[0] = mx  # one answer as long as allowed: the group pays for it unpacked
    seg = (np.arange(P)[None, :] >= P - pl[:, None]).astype(np.int32)
    pos = np.where(seg > 0, np.arange(P)[None, :] - (P - pl[:, None]), 0).astype(np.int32)
    return {"prompt_tokens": np.where(seg > 0, rng.integers(3, 288, (B, P)), 0).astype(np.int32),
            "prompt_positions": pos, "prompt_segment_ids": seg, "prompt_lengths": pl.astype(np.int32),
            "tokens": rng.integers(3, 288, (B, N)).astype(np.int32), "lengths": lengths,
            "logprobs_tempered": -rng.uniform(0.5, 6.0, (B, N)).astype(np.float32),
            "ended_with_eos": lengths < mx}


def placed(out, mesh, rules):
    def put(x):
        axes = ("batch",) + (None,) * (np.ndim(x) - 1)
        return jax.device_put(np.asarray(x), base.field_sharding(mesh, rules, axes, leading_accum=False))

    return {k: put(v) for k, v in out.items()}


def score_and_update(algo, out, packed):
    """(prep, score metrics, update metrics, actor, critic) of one score pass and one step's updates."""
    rt = algo.rt
    with use_rules(rt.mesh, rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        critic = state.extra["critic"]["params"] if algo.has_critic else None
        out = placed(out, rt.mesh, rt.rules)
        if packed:  # the case is meant to fit (the step would check this and run unpacked otherwise)
            assert algo.packs_this_step(out, algo.update_order(0), 0)
        score = algo._score_packed if packed else algo._score_unpacked
        prep, pm, _ = score(state.params, critic, algo.scoring_roles(roles), out, None, state.extra["kl_coef"])
        state, um = algo.update(state, prep, 0, packed=packed)
        return dict(prep=jax.device_get(prep), pm=jax.device_get(pm), um=jax.device_get(um),
                    actor=jax.device_get(state.params),
                    critic=jax.device_get(state.extra["critic"]["params"]) if algo.has_critic else None)


CASES = {
    # two minibatches: the old log-probs are scored before the update; rewards from the reward model role
    "grpo": ["algorithm.name=grpo", "algorithm.minibatch_size=8", "algorithm.micro_batch_size=4",
             "algorithm.entropy_coef=0.01"],
    "ppo": ["algorithm.name=ppo", "algorithm.micro_batch_size=8", "algorithm.ppo_epochs=2"],
    "gspo": ["algorithm.name=gspo", "algorithm.minibatch_size=8", "algorithm.clip_eps_low=0.02",
             "algorithm.clip_eps_high=0.03"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_packed_score_and_update_equal_unpacked(name, rm_dir):
    algo = build(CASES[name] + [f"roles.reward=run:{rm_dir}", "algorithm.pack_rows=true"])
    assert algo.pack is not None and algo.pack.row_len == algo.P + algo.N
    out = long_tailed_rollout(algo)
    u = score_and_update(algo, out, packed=False)
    p = score_and_update(algo, out, packed=True)
    mask = u["prep"]["weight"] > 0
    assert mask.sum() > 40
    # the score pass: every per-token quantity at the trained positions, every per-sample one everywhere
    token_keys = ["old_logps", "advantages"] + (["values", "returns"] if name == "ppo" else [])
    token_keys += ["ref_logps"] if "ref_logps" in u["prep"] else []
    assert "old_logps" in u["prep"] and ("values" in u["prep"]) == (name == "ppo")
    for k in token_keys:
        a, b = p["prep"][k], u["prep"][k]
        if a.ndim == 2:
            a, b = a[mask], b[mask]
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(p["prep"]["score"], u["prep"]["score"], atol=1e-5, err_msg="reward-model score")
    assert np.ptp(u["prep"]["score"]) > 0  # the reward model tells the samples apart
    # the same real tokens in the packed rows (pack_rows_per_micro defaults to half the micro-batch)
    rows_u, rows_p = algo.sizes.rollout, algo.pack.score_rows
    assert rows_p * 2 == rows_u
    np.testing.assert_allclose((1 - p["pm"]["padding_fraction"]) * rows_p, (1 - u["pm"]["padding_fraction"]) * rows_u,
                               rtol=1e-6)
    for k in ("kl", "reward_mean", "reward_std", "logprob_max_diff"):
        np.testing.assert_allclose(p["pm"][k], u["pm"][k], atol=2e-5, rtol=1e-4, err_msg=k)
    # one step of updates: losses, metrics and the updated parameters
    for k, v in u["um"].items():
        np.testing.assert_allclose(p["um"][k], v, atol=2e-5, rtol=1e-4, err_msg=k)
    assert_trees_close(p["actor"], u["actor"])
    if name == "ppo":
        assert_trees_close(p["critic"], u["critic"])


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_packed_update_on_a_sharded_mesh_equals_unsharded(name, rm_dir):
    extra = CASES[name] + [f"roles.reward=run:{rm_dir}", "algorithm.pack_rows=true"]
    single = build(extra)
    out = long_tailed_rollout(single)
    ref = score_and_update(single, out, packed=True)
    rows = single.pack.micro_rows  # the same packed shapes on the sharded mesh
    sharded = build(extra + [f"algorithm.pack_rows_per_micro={rows}"],
                    mesh=make_mesh(2, 1, 2, 1, devices=jax.devices()[:4]))
    r = score_and_update(sharded, out, packed=True)
    for k in ("actor_loss", "policy_loss") + (("value_loss",) if name == "ppo" else ("kl_loss", "entropy")):
        np.testing.assert_allclose(r["um"][k], ref["um"][k], atol=2e-5, rtol=1e-4, err_msg=k)
    # PPO: two epochs of Adam (eps 1e-4) on whitened advantages amplify f32 reduction-order noise; unpacked
    # rows on the same two meshes differ by 7e-6 of the scale, packed by 1.8e-5 (a misplaced sample is O(1))
    assert_trees_close(r["actor"], ref["actor"], rtol=5e-5 if name == "ppo" else 1e-5)
    if name == "ppo":
        assert_trees_close(r["critic"], ref["critic"])


def test_a_rollout_that_does_not_fit_runs_unpacked_and_says_so(rm_dir):
    logs = []
    overrides = CASES["grpo"] + [f"roles.reward=run:{rm_dir}"]
    algo = build(overrides + ["algorithm.pack_rows=true", "algorithm.pack_rows_per_micro=1"], logs=logs)
    plain = build(overrides)
    out = long_tailed_rollout(algo)
    results = {}
    for key, a in (("packed", algo), ("plain", plain)):
        rt = a.rt
        with use_rules(rt.mesh, rt.rules):
            a.sampler = lambda *args, _o=placed(out, rt.mesh, rt.rules): Rollout(_o, np.arange(16) // 4, {})
            roles = roles_for(a)
            state, m = a.step(a.init_state(roles), roles, {"prompt_index": np.arange(4)})
            results[key] = (jax.device_get(state.params), jax.device_get(m))
    assert any("do not fit algorithm.pack_rows_per_micro=1" in line and "unpacked" in line for line in logs), logs
    (pa, pm), (ua, um) = results["packed"], results["plain"]
    assert pm["pack_fallback"] == 1.0 and "pack_fallback" not in um
    for k in ("actor_loss", "reward_mean", "kl_loss"):
        assert pm[k] == um[k], k
    jax.tree.map(np.testing.assert_array_equal, pa, ua)  # the same programs on the same samples: nothing dropped


def test_pack_keys_are_checked_before_compiling(rm_dir):
    base_o = CASES["grpo"] + [f"roles.reward=run:{rm_dir}", "algorithm.pack_rows=true"]
    with pytest.raises(ConfigError, match="algorithm.pack_row_len=12 must be a positive multiple of 8"):
        build(base_o + ["algorithm.pack_row_len=12"])
    with pytest.raises(ConfigError, match="pack_rows_per_micro=3 must be a positive multiple of the data-parallel"):
        build(base_o + ["algorithm.pack_rows_per_micro=3"], mesh=make_mesh(2, 1, 2, 1, devices=jax.devices()[:4]))
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        build(base_o + ["algorithm.pack_row_len=8192"])
