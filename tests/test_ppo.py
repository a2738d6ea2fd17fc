"""PPO / GRPO / RLOO: sharded == unsharded updates, frozen roles untouched, rollout log-probs == a forward
pass, size checks before compile, and critic-free advantages that make a trivial reward rise."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.grpo import GRPO
from jalign.algorithms.ppo import PPO
from jalign.algorithms.rloo import RLOO
from jalign.config import ConfigError, load_config
from jalign.rewards import REWARDS, register_reward
from jalign.rollout.experience import rollout_rows
from sharding import make_mesh, make_rules, use_rules

import helpers
from helpers import assert_trees_close, roles_for

MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2"]
OPTIM = ["optim.lr=1e-2", "optim.eps=1e-4", "optim.warmup_steps=0", "optim.schedule=constant",
         "optim.weight_decay=0.1", "optim.grad_clip=1.0"]
DATA = ["data.train=builtin:addition_prompts:train", "data.eval=null"]


def make_reward_run(directory: Path, seed: int = 3) -> str:
    return helpers.make_reward_run(directory, MODEL, seed)


def runtime(overrides, mesh):
    cfg = load_config(None, [*MODEL, *OPTIM, *DATA, *overrides])
    return base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path("/tmp/unused"), log=lambda *_: None)


def single():
    return make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])


def ppo_overrides(rm_dir):
    return ["algorithm.name=ppo", f"roles.reward=run:{rm_dir}", "train.global_batch=8",
            "algorithm.num_rollouts_per_prompt=2", "algorithm.micro_batch_size=8", "algorithm.max_new_tokens=6",
            "algorithm.temperature=0.7", "algorithm.entropy_coef=0.01"]


def on_mesh(out, mesh, rules):
    """A rollout (the sampler's device output) placed on another mesh, rows over the data-parallel axes."""
    def put(x):
        axes = (("batch",) + (None,) * (np.ndim(x) - 1)) if np.ndim(x) else ()
        return jax.device_put(np.asarray(x), base.field_sharding(mesh, rules, axes, leading_accum=False))

    return {k: put(v) for k, v in out.items()}


def one_update(rt, out=None):
    """init -> (rollout) -> score -> one PPO update; returns everything the tests compare."""
    with use_rules(rt.mesh, rt.rules):
        algo = PPO(rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
        if out is None:
            idx = np.repeat(np.arange(8), algo.sizes.per_prompt)  # the rollout batch: K samples of 8 prompts
            out = algo.sample(state.params, [algo.train_prompts.ids[i] for i in idx], jax.random.key(5))
        else:
            out = on_mesh(out, rt.mesh, rt.rules)
        frozen_before = jax.device_get(roles.params)
        initial = jax.device_get(state.params)
        prep, pm, _ = algo._score(state.params, state.extra["critic"]["params"], algo.scoring_roles(roles), out,
                                  None, state.extra["kl_coef"])
        state, metrics = algo.update(state, prep, 0)
        return dict(algo=algo, roles=roles, out=jax.device_get(out), rows=jax.device_get(rollout_rows(out, 0)),
                    pm=jax.device_get(pm), metrics=jax.device_get(metrics), initial=initial,
                    actor=jax.device_get(state.params), critic=jax.device_get(state.extra["critic"]["params"]),
                    frozen_before=frozen_before, frozen_after=jax.device_get(roles.params))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_reward_run(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def reference(rm_dir):
    return one_update(runtime(ppo_overrides(rm_dir), single()))


def test_update_changes_actor_and_critic_but_not_frozen_roles(reference):
    r = reference
    assert np.isfinite(r["metrics"]["actor_loss"]) and np.isfinite(r["metrics"]["value_loss"])
    assert r["metrics"]["skipped"] == 0
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), r["actor"], r["initial"])
    assert max(jax.tree.leaves(moved)) > 0
    # reference and reward model are bit-identical after training
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), r["frozen_after"], r["frozen_before"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), r["frozen_before"]["reference"], r["initial"])
    assert r["frozen_before"]["reward"] is not None


def test_rollout_logprobs_equal_a_fresh_forward_pass(reference):
    r = reference
    rows, algo = r["rows"], r["algo"]
    mask = rows["mask"] > 0
    assert mask.sum() > 8 and np.abs(rows["sampler_logps"][mask]).min() > 0
    fresh = jax.jit(lambda p, b: base.policy_token_logps(p, b, algo.cfg.model, 0.7))(
        r["initial"], {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets")})
    np.testing.assert_allclose(np.asarray(fresh)[mask], rows["sampler_logps"][mask], atol=2e-5)
    assert r["pm"]["logprob_max_diff"] < 2e-5


def test_frozen_roles_parked_in_host_memory_give_the_same_update(reference, rm_dir):
    r = one_update(runtime(ppo_overrides(rm_dir) + ["roles.reference.offload=true", "roles.reward.offload=true"],
                           single()), out=reference["out"])
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(r["roles"].params)}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(r["roles"].on_device())} == {"device"}
    for key in ("actor_loss", "value_loss", "kl", "reward_mean"):
        assert r["metrics"].get(key, r["pm"].get(key)) == reference["metrics"].get(key, reference["pm"].get(key))
    jax.tree.map(np.testing.assert_array_equal, r["actor"], reference["actor"])
    jax.tree.map(np.testing.assert_array_equal, r["frozen_after"], reference["frozen_before"])


def test_reward_standardization_is_applied_before_the_penalty_and_kl(reference, rm_dir):
    def scores(extra):
        rt = runtime(ppo_overrides(rm_dir) + extra, single())
        with use_rules(rt.mesh, rt.rules):
            algo = PPO(rt)
            roles = roles_for(algo)
            state = algo.init_state(roles)
            prep, pm, _ = algo._score(state.params, state.extra["critic"]["params"], algo.scoring_roles(roles),
                                      on_mesh(reference["out"], rt.mesh, rt.rules), None, state.extra["kl_coef"])
            return jax.device_get(prep)["score"], jax.device_get(pm)

    standardize = ["algorithm.reward_offset=0.5", "algorithm.reward_scale=2.0", "algorithm.reward_clip=0.1"]
    raw, _ = scores(["algorithm.truncated_response=keep"])
    std, pm = scores(["algorithm.truncated_response=keep", *standardize])
    assert np.ptp(raw) > 0.3 and np.all(raw != 0)  # the random reward model spreads the rows past the clip
    expected = np.clip((raw - 0.5) / 2.0, -0.1, 0.1)
    np.testing.assert_allclose(std, expected, rtol=1e-6, atol=1e-7)
    assert pm["reward_mean"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # The random policy never ends within max_new_tokens: under "penalize" every row gets the penalty
    # itself (in standardised units), not a standardised penalty.
    assert not reference["rows"]["ended"].any()
    penalized, _ = scores(["algorithm.truncation_penalty=-1.0", *standardize])
    np.testing.assert_array_equal(penalized, np.full_like(raw, -1.0))


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 2, 1)])
def test_sharded_update_equals_unsharded(reference, rm_dir, shape):
    r = one_update(runtime(ppo_overrides(rm_dir), make_mesh(*shape)), out=reference["out"])
    for key in ("actor_loss", "value_loss", "policy_loss", "entropy"):
        # the first-epoch policy loss is a mean of whitened advantages (~0 by construction): a sum of O(1)
        # terms that cancel, so its float noise is ~1e-7 absolute whatever the sharding
        np.testing.assert_allclose(r["metrics"][key], reference["metrics"][key], rtol=1e-5, atol=1e-6)
    assert_trees_close(r["actor"], reference["actor"])
    assert_trees_close(r["critic"], reference["critic"])


def test_size_errors_are_clear_and_raised_before_compiling(rm_dir):
    from jax._src import monitoring

    compiles = []

    def listener(event, duration, **kw):
        if "backend_compile" in event:  # XLA compiling a program (tracing shapes is not compiling)
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        _size_errors(rm_dir)
        assert compiles == []  # every size error came before any program was compiled
        jax.jit(lambda x: x * 1.2345 + 0.5)(jnp.ones(3))  # the listener does see a compile
        assert compiles
    finally:
        monitoring.unregister_event_duration_listener(listener)


def _size_errors(rm_dir):
    mesh = make_mesh(8, 1, 1, 1)
    cases = [
        (["algorithm.minibatch_size=6"], "minibatch_size=6 does not divide the rollout batch"),
        (["algorithm.micro_batch_size=4"], "not divisible by the data-parallel size"),
        (["algorithm.minibatch_size=8", "algorithm.micro_batch_size=16"], "micro_batch_size=16 does not divide"),
        (["train.micro_batch=4"], "train.micro_batch is not used"),
        (["algorithm.reward_fn=exact_match"], "exactly one of roles.reward"),
        (["algorithm.reward_scale=0"], "algorithm.reward_scale: must be > 0, got 0.0"),  # now at load_config
    ]
    for extra, text in cases:
        with pytest.raises(ConfigError, match=text):
            PPO(runtime([*ppo_overrides(rm_dir), *extra], mesh))
    with pytest.raises(ConfigError, match="needs at least 2 samples per prompt"):
        GRPO(runtime(["algorithm.name=grpo", "algorithm.reward_fn=exact_match", "train.global_batch=8",
                      "algorithm.num_rollouts_per_prompt=1"], mesh))
    with pytest.raises(ValueError, match="unknown reward 'exact_mach'; did you mean 'exact_match'"):
        RLOO(runtime(["algorithm.name=rloo", "algorithm.reward_fn=exact_mach", "train.global_batch=8"], mesh))


if "first_is_digit" not in REWARDS:
    @register_reward("first_is_digit")
    def first_is_digit(prompt, response, reference):
        return float(response[:1].isdigit())

if "odd_text_length" not in REWARDS:
    @register_reward("odd_text_length")
    def odd_text_length(prompt, response, reference):
        return float(len(response) % 2)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_critic_free_advantages_raise_a_trivial_reward(name):
    rt = runtime([f"algorithm.name={name}", "algorithm.reward_fn=first_is_digit", "train.global_batch=4",
                  "algorithm.num_rollouts_per_prompt=8", "algorithm.max_new_tokens=2", "algorithm.kl_coef=0.0",
                  "algorithm.truncated_response=keep", "optim.lr=3e-2", "train.steps=40"], single())
    with use_rules(rt.mesh, rt.rules):
        algo = {"grpo": GRPO, "rloo": RLOO}[name](rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        it = algo.train_batches()
        rewards = []
        for _ in range(25):
            state, m = algo.step(state, roles, next(it))
            rewards.append(float(m["reward_mean"]))
    assert np.mean(rewards[:3]) < 0.3 and np.mean(rewards[-3:]) > 0.7, rewards


def test_ppo_objective_and_estimator_by_config(reference, rm_dir):
    """PPO's clip-higher bounds reach its loss; a critic-free estimator drops the critic; a rule next to the
    reward model is one more weighted term of the sequence reward."""
    out = reference["out"]
    rt = runtime(ppo_overrides(rm_dir) + ["algorithm.advantage=group", "algorithm.kl_in=loss",
                                          "algorithm.clip_eps_low=0.1", "algorithm.clip_eps_high=0.3"], single())
    with use_rules(rt.mesh, rt.rules):
        algo = PPO(rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
        assert not algo.has_critic and "critic" not in state.extra
        prep, pm, _ = algo._score(state.params, None, algo.scoring_roles(roles), on_mesh(out, rt.mesh, rt.rules),
                                  None, state.extra["kl_coef"])
        state, m = algo.update(state, prep, 0)
    assert np.isfinite(float(m["actor_loss"])) and "value_loss" not in m and "clip_fraction_high" in m
    prep = jax.device_get(prep)
    s = prep["score"].reshape(8, 2)
    np.testing.assert_allclose(prep["advantages"].reshape(8, 2), (s - s.mean(-1, keepdims=True))
                               / (s.std(-1, ddof=1, keepdims=True) + 1e-6), rtol=1e-4, atol=1e-5)
    # the reward model and a rule, weighted; each term logged
    both = runtime(ppo_overrides(rm_dir) + ["algorithm.truncated_response=keep", "algorithm.rewards=[{model: reward, "
                                            "weight: 1.0}, {fn: odd_text_length, weight: 0.5}]"], single())
    keep = runtime(ppo_overrides(rm_dir) + ["algorithm.truncated_response=keep"], single())
    scores = {}
    for name, rt in (("both", both), ("rm", keep)):
        with use_rules(rt.mesh, rt.rules):
            algo = PPO(rt)
            roles = roles_for(algo)
            state = algo.init_state(roles)
            placed = on_mesh(out, rt.mesh, rt.rules)
            given = {}
            if name == "both":
                from jalign.algorithms.rl_rewards import rule_components

                given = rule_components(algo.terms, algo.tokenizer, placed, np.repeat(np.arange(8), 2),
                                        algo.train_prompts)
            prep, pm, _ = algo._score(state.params, state.extra["critic"]["params"], algo.scoring_roles(roles), placed,
                                      given, state.extra["kl_coef"])
            scores[name] = (jax.device_get(prep)["score"], jax.device_get(pm), jax.device_get(given))
    rule = np.asarray(scores["both"][2]["odd_text_length"])
    assert np.ptp(rule) > 0
    np.testing.assert_allclose(scores["both"][0], scores["rm"][0] + 0.5 * rule, rtol=1e-6, atol=1e-6)
    assert scores["both"][1]["reward/rm"] == pytest.approx(float(np.mean(scores["rm"][0])), rel=1e-5)
    assert scores["both"][1]["reward/odd_text_length"] == pytest.approx(float(rule.mean()))
