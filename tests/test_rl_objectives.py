"""RL objectives, advantage estimators, mismatch corrections, combined rewards, dynamic sampling and the
hacking monitor wired into the RL algorithms: each reachable by config and equal to its pure function in
``jalign.losses`` / ``jalign.rewards`` on a crafted batch; DAPO with equal bounds equals today's GRPO update
bit for bit; dynamic sampling keeps the batch full of groups that carry a signal within its cap; the monitor
fires on a run whose reward rises while its gold signal falls and not on a healthy one; resume == uninterrupted
for GRPO with dynamic sampling."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jalign.losses as L
from jalign.algorithms import base
from jalign.algorithms.registry import resolve
from jalign.config import ConfigError, load_config
from jalign.metrics import read_metrics
from jalign.models.heads import sequence_scores, token_logps
from jalign.rewards import REWARDS, combine_rewards, register_reward, score_rules, get_reward
from jalign.rollout import experience as xp
from sharding import make_mesh, make_rules, use_rules

from helpers import roles_for
from test_ppo import DATA, MODEL, OPTIM, make_reward_run

T = 0.7


def runtime(overrides, mesh=None):
    cfg = load_config(None, [*MODEL, *OPTIM, *DATA, *overrides])
    mesh = mesh or make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path("/tmp/unused"), log=lambda *_: None)


def rl(name, *extra, steps=10):
    return [f"algorithm.name={name}", "train.global_batch=4", "algorithm.num_rollouts_per_prompt=4",
            "algorithm.max_new_tokens=5", f"algorithm.temperature={T}", "algorithm.truncated_response=keep",
            f"train.steps={steps}", *extra]


# rules for crafted rewards (a random model's responses are random bytes)
def _register(name, fn):
    if name not in REWARDS:
        register_reward(name)(fn)


_register("odd_length", lambda p, r, ref: float(len(r) % 2))
_register("length_mod3", lambda p, r, ref: float(len(r.encode()) % 3 == 0))
_register("constant", lambda p, r, ref: 0.5)
# constant within a prompt's group for prompts whose first operand is even: such groups must be dropped
_register("half_constant", lambda p, r, ref: 0.5 if int(p.split("+")[0]) % 2 == 0 else float(len(r) % 2))
_register("codepoint_parity", lambda p, r, ref: float(sum(map(ord, r)) % 2))
_register("first_is_digit", lambda p, r, ref: float(r[:1].isdigit()))
_register("first_not_digit", lambda p, r, ref: float(not r[:1].isdigit()))


def build(overrides, mesh=None):
    rt = runtime(overrides, mesh)
    with use_rules(rt.mesh, rt.rules):
        algo = resolve(rt.cfg.algorithm.name)(rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
    return rt, algo, roles, state


def perturbed(params, scale=0.05, seed=1):
    """Different weights, so old (trainer) / reference / sampler log-probs disagree."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def rollout_and_prep(rt, algo, roles, state, actor_params=None, sampler_params=None, step=0):
    """A real rollout (sampled by ``sampler_params``) scored by ``actor_params``: (rollout, prep, metrics)."""
    with use_rules(rt.mesh, rt.rules):
        roll = algo.sampler(sampler_params if sampler_params is not None else state.params, roles,
                            np.arange(algo.sizes.prompts), step)
        critic = state.extra["critic"]["params"] if algo.has_critic else None
        prep, metrics, _ = algo._score(actor_params if actor_params is not None else state.params, critic,
                                       algo.scoring_roles(roles), roll.out, roll.given, state.extra["kl_coef"],
                                       roll.row_valid)
    return roll, jax.device_get(prep), jax.device_get(metrics)


def minibatch(prep, old_noise_seed=None):
    """The whole rollout as one micro-batch; optionally behaviour log-probs moved away from the policy's (as after
    an earlier update), so ratios leave 1 and the clips act."""
    mb = {k: jnp.asarray(v) for k, v in prep.items()}
    if old_noise_seed is not None:
        rng = np.random.default_rng(old_noise_seed)
        mb["old_logps"] = mb["old_logps"] + jnp.asarray(rng.normal(scale=0.4, size=prep["old_logps"].shape),
                                                        jnp.float32) * prep["weight"]
    return mb


def logps_of(params, mb, cfg):
    return jax.jit(lambda p, b: token_logps(p, b, cfg, T))(params, mb)


# ---- objectives ----------------------------------------------------------------------------------
def _pure(name, a, lp, mb, n, seqs):
    adv, w, old = mb["advantages"], mb["weight"], mb["old_logps"]
    if name == "ppo_clip":
        return L.dapo_policy_loss(lp, old, adv, w, n, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high)[0]
    if name == "dual_clip":
        return L.dual_clip_ppo_loss(lp, old, adv, w, n, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high,
                                    dual_clip=a.dual_clip)[0]
    if name == "gspo":
        return L.gspo_loss(lp, old, adv, w, seqs, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high)[0]
    if name == "cispo":
        return L.cispo_loss(lp, old, adv, w, n, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high)[0]
    if name == "reinforce":
        return L.reinforce_loss(lp, adv, w, n)[0]
    raise AssertionError(name)


@pytest.mark.parametrize("objective", ["ppo_clip", "dual_clip", "gspo", "cispo", "reinforce"])
def test_each_policy_loss_is_its_pure_function(objective):
    extra = [f"algorithm.policy_loss={objective}", "algorithm.clip_eps_low=0.1", "algorithm.clip_eps_high=0.3",
             "algorithm.kl_in=none", "algorithm.ppo_epochs=2", "algorithm.dual_clip=1.5"]
    rt, algo, roles, state = build(rl("grpo", *extra, "algorithm.reward_fn=odd_length"))
    _, prep, _ = rollout_and_prep(rt, algo, roles, state)
    mb = minibatch(prep, old_noise_seed=0)
    norms = jax.device_get(algo.normalizers(mb))
    with use_rules(rt.mesh, rt.rules):
        loss, m = jax.jit(lambda p, b: algo.actor_loss(p, b, algo.normalizers(b), None))(state.params, mb)
    lp = logps_of(state.params, mb, algo.cfg.model)
    want = _pure(objective, algo.a, lp, mb, norms["n"], norms["seqs"])
    assert np.abs(prep["advantages"]).max() > 0.1  # a batch with a signal
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-6, atol=1e-7)
    if objective in ("ppo_clip", "dual_clip"):
        assert float(m["clip_fraction"]) > 0.05  # the bounds acted on this batch
    if objective == "dual_clip":
        assert float(m["dual_clip_fraction"]) > 0


def test_kl_in_loss_is_grpo_clip_higher_loss():
    rt, algo, roles, state = build(rl("dapo", "algorithm.kl_in=loss", "algorithm.kl_coef=0.3", "algorithm.ppo_epochs=2",
                                      "algorithm.reward_fn=odd_length", "algorithm.dynamic_sampling=false"))
    actor = perturbed(state.params)  # the policy has moved away from the reference
    _, prep, _ = rollout_and_prep(rt, algo, roles, state, actor_params=actor)
    mb = minibatch(prep, old_noise_seed=1)
    with use_rules(rt.mesh, rt.rules):
        loss, m = jax.jit(lambda p, b: algo.actor_loss(p, b, algo.normalizers(b), None))(actor, mb)
    lp = logps_of(actor, mb, algo.cfg.model)
    want, wm = L.grpo_clip_higher_loss(lp, mb["old_logps"], mb["ref_logps"], mb["advantages"], mb["weight"],
                                       beta_kl=0.3, clip_eps_low=0.2, clip_eps_high=0.28)
    assert float(wm["kl"]) > 1e-3
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-6)
    np.testing.assert_allclose(float(m["kl_loss"]), float(wm["kl"]), rtol=2e-6)


# ---- advantage estimators ------------------------------------------------------------------------
@pytest.mark.parametrize("estimator,kl_in", [("group", "reward"), ("group", "loss"), ("leave_one_out", "reward"),
                                             ("reinforce_pp", "reward"), ("reinforce_pp_baseline", "loss")])
def test_each_advantage_estimator_is_its_pure_function(estimator, kl_in):
    rt, algo, roles, state = build(rl("rloo", f"algorithm.advantage={estimator}", f"algorithm.kl_in={kl_in}",
                                      "algorithm.kl_coef=0.2", "algorithm.reward_fn=odd_length",
                                      "algorithm.scale_advantages=false"))
    actor = perturbed(state.params)
    roll, prep, _ = rollout_and_prep(rt, algo, roles, state, actor_params=actor, sampler_params=actor)
    mb = minibatch(prep)
    mask, score = prep["weight"], prep["score"]
    old = np.asarray(logps_of(actor, mb, algo.cfg.model))
    ref = np.asarray(logps_of(roles["reference"], mb, algo.cfg.model))
    np.testing.assert_allclose(prep["old_logps"] if "old_logps" in prep else old, old, atol=1e-5)
    k1 = L.kl_k1(old, ref, mask)
    P, K = 4, 4
    seq_r = score - 0.2 * np.sum(k1, -1) if kl_in == "reward" else score
    if estimator == "group":
        want = L.grpo_advantages(seq_r.reshape(P, K), scale=False).reshape(-1)
    elif estimator == "leave_one_out":
        want = L.rloo_advantages(seq_r.reshape(P, K)).reshape(-1)
    elif estimator == "reinforce_pp":
        want = L.reinforce_pp_advantages(score, mask, k1, beta_kl=0.2)
    else:
        want = L.reinforce_pp_baseline_advantages(seq_r.reshape(P, K), mask)
    assert np.abs(np.sum(k1)) > 1e-3 and np.ptp(score) > 0
    np.testing.assert_allclose(prep["advantages"], np.asarray(want), rtol=1e-4, atol=2e-5)


def test_impossible_combinations_are_config_errors():
    cases = [
        (rl("grpo", "algorithm.advantage=gae", "algorithm.reward_fn=odd_length"), "needs a critic"),
        (rl("grpo", "algorithm.policy_loss=gspo", "algorithm.advantage=reinforce_pp", "algorithm.reward_fn=odd_length"),
         "one advantage per sequence"),
        (rl("gspo", "algorithm.mismatch_correction=token_tis", "algorithm.reward_fn=odd_length"),
         "sequence mismatch_correction"),
        (rl("grpo", "algorithm.policy_loss=gpso", "algorithm.reward_fn=odd_length"), "did you mean 'gspo'"),
        (rl("grpo", "algorithm.advantage=leave_one_outt", "algorithm.reward_fn=odd_length"), "did you mean"),
        (rl("grpo", "algorithm.policy_loss=dual_clip", "algorithm.dual_clip=0.5", "algorithm.reward_fn=odd_length"),
         "dual_clip must be > 1"),
        (rl("dapo", "algorithm.overlong_buffer=9", "algorithm.reward_fn=odd_length"), "overlong_buffer=9 must be in"),
        (rl("grpo", "algorithm.reward_fn=odd_length", "algorithm.rewards=[{fn: length_mod3}]"), "both set"),
        (rl("grpo", "algorithm.rewards=[{fn: length_mod3, weight: 0}]"), "every weight is 0"),
        (rl("grpo", "algorithm.rewards=[{model: reward}]"), "roles.reward is not set"),
    ]
    for overrides, text in cases:
        with pytest.raises(ConfigError, match=text):
            build(overrides)


def test_reinforce_over_several_epochs_warns_and_one_epoch_does_not():
    """Unclipped REINFORCE has no importance ratio: a second epoch reuses an older policy's samples
    uncorrected (RLOO drifted so on the tiny task); the run says so once at start, naming the keys."""
    for epochs, warned in ((2, True), (1, False)):
        rt = runtime(rl("rloo", "algorithm.reward_fn=odd_length", f"algorithm.ppo_epochs={epochs}"))
        lines = []
        rt.log = lines.append
        with use_rules(rt.mesh, rt.rules):
            resolve("rloo")(rt)
        hits = [x for x in lines if "policy_loss=reinforce" in x and f"ppo_epochs={epochs}" in x]
        assert len(hits) == int(warned), lines


# ---- DAPO == today's GRPO with equal bounds -------------------------------------------------------
def _todays_grpo_actor_loss(algo):
    """GRPO's actor loss as it was before the objectives became selectable (jalign/algorithms/grpo.py)."""
    def loss_fn(params, mb, norms, roles):
        logps, e_loss, ent = algo.policy_terms(params, mb, norms)
        gl, m = L.grpo_loss(logps, algo.old_logps(mb, logps), mb["ref_logps"], mb["advantages"], mb["weight"],
                            algo.a.clip_eps, algo.a.kl_coef, norms["n"])
        loss = gl + e_loss
        out = {"loss": loss, "policy_loss": m["policy_loss"], "kl_loss": m["kl"],
               "clip_fraction": m["clip_fraction"], "approx_kl": m["approx_kl"], "num_tokens": m["num_tokens"]}
        if ent is not None:
            out["entropy"] = ent
        return loss, out

    return loss_fn


def _update(rt, algo, state, prep, loss_fn=None):
    if loss_fn is not None:
        algo.build_update(loss_fn)
    with use_rules(rt.mesh, rt.rules):
        new, m = algo.update(state, jax.tree.map(jnp.asarray, prep), 0)
    return jax.device_get(new.params), jax.device_get(m)


@pytest.mark.parametrize("epochs", [1, 2])
def test_dapo_with_equal_bounds_is_todays_grpo_update_exactly(epochs):
    common = ["algorithm.reward_fn=odd_length", f"algorithm.ppo_epochs={epochs}", "algorithm.minibatch_size=8",
              "algorithm.entropy_coef=0.01"]
    rt, grpo, roles, gstate = build(rl("grpo", *common))
    _, prep, _ = rollout_and_prep(rt, grpo, roles, gstate)
    today, tm = _update(rt, grpo, gstate, prep, _todays_grpo_actor_loss(grpo))
    rt, grpo2, roles2, gstate2 = build(rl("grpo", *common))
    now, nm = _update(rt, grpo2, gstate2, prep)
    rt, dapo, roles3, dstate = build(rl("dapo", *common, "algorithm.clip_eps_low=0.2", "algorithm.clip_eps_high=0.2",
                                        "algorithm.kl_in=loss", "algorithm.kl_coef=0.04",
                                        "algorithm.dynamic_sampling=false", "algorithm.overlong_buffer=0"))
    d, dm = _update(rt, dapo, dstate, prep)
    jax.tree.map(np.testing.assert_array_equal, now, today)
    jax.tree.map(np.testing.assert_array_equal, d, today)
    for k in ("actor_loss", "kl_loss", "clip_fraction", "entropy"):
        assert nm[k] == tm[k] == dm[k], k
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(today),
                                                            jax.tree.leaves(jax.device_get(roles2["reference"]))))
    assert moved > 0


# ---- mismatch correction -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_tis", "sequence_tis", "sequence_mis"])
def test_mismatch_weights_are_applied_as_configured(mode):
    rt, algo, roles, state = build(rl("grpo", "algorithm.reward_fn=odd_length", f"algorithm.mismatch_correction={mode}",
                                      "algorithm.mismatch_cap=1.5", "algorithm.kl_in=none"))
    sampler = perturbed(state.params, 0.03)  # rollout engine and trainer disagree
    roll, prep, pm = rollout_and_prep(rt, algo, roles, state, sampler_params=sampler)
    rows = jax.device_get(xp.rollout_rows(roll.out, algo.tokenizer.pad_id))
    fn = {"token_tis": L.token_tis_weights, "sequence_tis": L.sequence_tis_weights,
          "sequence_mis": L.sequence_mis_weights}[mode]
    want, wm = fn(prep["old_logps"], rows["sampler_logps"], rows["mask"], cap=1.5)
    np.testing.assert_allclose(prep["is_weight"], np.asarray(want), rtol=1e-6)
    w = np.asarray(want)
    assert np.ptp(w[w > 0]) > 0.05 and (w.max() == pytest.approx(1.5) or mode == "sequence_mis")
    assert pm["is_weight_mean"] == pytest.approx(float(wm["is_weight_mean"]), rel=1e-5)
    assert pm["logprob_abs_diff_mean"] > 1e-3 and pm["mismatch_k3"] >= 0
    mb = minibatch(prep, old_noise_seed=2)
    with use_rules(rt.mesh, rt.rules):
        loss, _ = jax.jit(lambda p, b: algo.actor_loss(p, b, algo.normalizers(b), None))(state.params, mb)
    lp = logps_of(state.params, mb, algo.cfg.model)
    adv = np.asarray(prep["advantages"])[:, None] * (w if w.ndim == 2 else w[:, None])
    want_loss, _ = L.dapo_policy_loss(lp, mb["old_logps"], adv, mb["weight"], clip_eps_low=0.2, clip_eps_high=0.2)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-6, atol=1e-7)


# ---- several rewards -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_reward_run(tmp_path_factory.mktemp("rm"))


def test_combined_rewards_are_the_weighted_sum_of_their_terms(rm_dir):
    rewards = "[{fn: odd_length, weight: 1.0}, {fn: length_mod3, weight: 0.3}, {model: reward, weight: 0.5}]"
    rt, algo, roles, state = build(rl("grpo", f"roles.reward=run:{rm_dir}", f"algorithm.rewards={rewards}",
                                      "algorithm.reward_offset=0.2", "algorithm.reward_scale=2.0"))
    roll, prep, pm = rollout_and_prep(rt, algo, roles, state)
    out = jax.device_get(roll.out)
    texts = xp.decode_responses(algo.tokenizer, out["tokens"], out["lengths"], out["ended_with_eos"])
    idx = roll.row_prompts
    cols = score_rules({"odd_length": get_reward("odd_length"), "length_mod3": get_reward("length_mod3")},
                       [algo.train_prompts.texts[i] for i in idx], texts, [algo.train_prompts.answers[i] for i in idx])
    rows = xp.rollout_rows(roll.out, algo.tokenizer.pad_id)
    raw = np.asarray(jax.jit(lambda p, r: sequence_scores(p, r["tokens"], r["positions"], r["segment_ids"],
                                                          algo.rm_cfgs["reward"])[:, 0])(roles["reward"], rows))
    cols["rm"] = (raw - 0.2) / 2.0
    total, _ = combine_rewards(cols, {"odd_length": 1.0, "length_mod3": 0.3, "rm": 0.5})
    assert np.ptp(cols["odd_length"]) > 0 and np.ptp(cols["length_mod3"]) > 0 and np.ptp(cols["rm"]) > 0
    np.testing.assert_allclose(prep["score"], total, rtol=1e-5, atol=1e-6)
    for k in ("odd_length", "length_mod3", "rm"):
        assert pm[f"reward/{k}"] == pytest.approx(float(np.mean(cols[k])), rel=1e-5, abs=1e-6)


def test_a_reward_model_term_can_bring_its_own_weights(rm_dir, tmp_path):
    other = make_reward_run(tmp_path / "gold", seed=9)
    rewards = f"[{{fn: odd_length, weight: 1.0}}, {{model: {other}, weight: 0.0, name: gold}}]"
    rt, algo, roles, state = build(rl("grpo", f"algorithm.rewards={rewards}"))
    assert "reward_gold" in roles and "reward" not in roles
    _, prep, pm = rollout_and_prep(rt, algo, roles, state)
    np.testing.assert_array_equal(prep["score"], np.asarray(jax.device_get(
        rollout_and_prep(*build(rl("grpo", "algorithm.reward_fn=odd_length"))[:4])[1]["score"])))
    assert "reward/gold" in pm and pm["reward/gold"] != 0


# ---- dynamic sampling ----------------------------------------------------------------------------
def test_dynamic_sampling_drops_groups_that_agree_and_keeps_the_batch_full():
    rt, algo, roles, state = build(rl("dapo", "algorithm.reward_fn=half_constant", "algorithm.max_resample_rounds=8",
                                      "algorithm.overlong_buffer=0", "train.global_batch=8",
                                      "algorithm.num_rollouts_per_prompt=2"))
    state_before = algo.train_iter.get_state()
    roll, prep, pm = rollout_and_prep(rt, algo, roles, state)
    m = roll.metrics
    P, K = 8, 2
    assert roll.row_valid is None and m["dynamic_sampling/short_groups"] == 0  # full
    assert m["dynamic_sampling/dropped_groups"] >= 4  # every even-operand prompt at least
    assert m["dynamic_sampling/rounds"] >= 2
    assert m["dynamic_sampling/drawn_groups"] == P * m["dynamic_sampling/rounds"]
    assert m["dynamic_sampling/extra_rollouts"] == (m["dynamic_sampling/rounds"] - 1) * P * K
    # the prompt stream advanced by exactly the extra rounds
    it = type(algo.train_iter)(len(algo.train_prompts), P, algo.cfg.data.seed, algo.cfg.data.shuffle)
    it.set_state(state_before)
    for _ in range(int(m["dynamic_sampling/rounds"]) - 1):
        next(it)
    assert algo.train_iter.get_state() == it.get_state()
    score = prep["score"].reshape(P, K)
    trained = (prep["weight"].sum(-1) > 0).reshape(P, K).any(-1)
    assert trained.all() and (score.max(-1) > score.min(-1)).all()  # no group that agrees reaches the loss
    prompts = [algo.train_prompts.texts[i] for i in roll.row_prompts]
    assert all(int(p.split("+")[0]) % 2 for p in prompts)
    # the rows are the sampled rollouts of those prompts, rewards included
    texts = xp.decode_responses(algo.tokenizer, *(jax.device_get(roll.out[k]) for k in
                                                  ("tokens", "lengths", "ended_with_eos")))
    np.testing.assert_array_equal(prep["score"], [float(len(t) % 2) for t in texts])


def test_dynamic_sampling_stops_at_the_cap_and_masks_the_rest():
    rt, algo, roles, state = build(rl("dapo", "algorithm.reward_fn=constant", "algorithm.max_resample_rounds=2",
                                      "algorithm.overlong_buffer=0"))
    state_before = algo.train_iter.get_state()
    roll, prep, pm = rollout_and_prep(rt, algo, roles, state)
    m = roll.metrics
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/short_groups"] == 4
    assert m["dynamic_sampling/dropped_groups"] == 12 and m["dynamic_sampling/extra_rollouts"] == 2 * 16
    assert algo.train_iter.get_state() != state_before
    assert float(prep["weight"].sum()) == 0 and pm["trained_fraction"] == 0
    with use_rules(rt.mesh, rt.rules):
        new, um = algo.update(state, jax.tree.map(jnp.asarray, prep), 0)
    assert um["num_tokens"] == 0 and float(um["actor_loss"]) == 0.0


# ---- the monitor hook ----------------------------------------------------------------------------
def trainer_cfg(out, rewards, *extra):
    return load_config(None, [
        *MODEL, *OPTIM, "optim.lr=3e-2", "data.train=builtin:addition_prompts:train",
        "data.eval=builtin:addition_prompts:eval", "algorithm.name=grpo", f"algorithm.rewards={rewards}",
        "train.global_batch=8", "algorithm.num_rollouts_per_prompt=4", "algorithm.max_new_tokens=2",
        "algorithm.kl_coef=0.0", "algorithm.truncated_response=keep", "train.steps=20", "train.eval_every=4",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false",
        "eval.prompts=64", "eval.greedy=false", "eval.sampled=true", "eval.max_new_tokens=2", "eval.log_samples=2",
        "algorithm.monitor.window=3", "algorithm.monitor.min_reward_rise=0.1", "algorithm.monitor.min_gold_drop=0.1",
        f"train.out_dir={out}", *extra])


def _evals(run_dir):
    return [r for r in read_metrics(run_dir) if "eval/monitor/reward_gold_corr" in r]


@pytest.fixture(scope="module")
def hacked(tmp_path_factory):
    """GRPO whose reward (first token is a digit) rises while its gold signal (first token is not a digit)
    falls by construction."""
    from jalign.trainer import train

    out = tmp_path_factory.mktemp("hacked")
    logs = []
    cfg = trainer_cfg(out, "[{fn: first_is_digit, weight: 1.0}, {fn: first_not_digit, weight: 0.0, name: gold}]")
    import jalign.trainer as trainer_mod

    orig = trainer_mod.MetricsWriter.message
    trainer_mod.MetricsWriter.message = lambda self, text: (logs.append(text), orig(self, text))[1]
    try:
        train(cfg)
    finally:
        trainer_mod.MetricsWriter.message = orig
    return out, logs


def test_monitor_alarm_fires_when_the_reward_rises_and_gold_falls(hacked):
    out, logs = hacked
    ev = _evals(out)
    reward = [r["eval/reward"] for r in ev]
    gold = [r["eval/reward/gold"] for r in ev]
    assert reward[-1] > reward[0] + 0.3 and gold[-1] < gold[0] - 0.3, (reward, gold)
    alarms = [r["eval/monitor/hacking_alarm"] for r in ev]
    assert alarms[0] == 0 and max(alarms) == 1
    first = next(r["step"] for r in ev if r["eval/monitor/hacking_alarm"])
    assert ev[-1]["eval/monitor/first_alarm_step"] == first
    assert ev[-1]["eval/monitor/reward_gold_corr"] < -0.9
    assert any("WARNING: possible reward hacking" in line and f"step {first}" in line for line in logs)
    for k in ("kl_per_token", "repetition_rate", "truncated_fraction", "entropy", "response_length"):
        assert f"eval/{k}" in ev[-1]
    assert "eval/monitor/train_hacking_alarm" in ev[-1] and "eval/monitor/entropy_ratio" in ev[-1]
    # the completions table carries every reward term
    import json

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and all({"reward", "reward/first_is_digit", "reward/gold", "exact_match"} <= set(r) for r in rows)
    assert all(r["reward"] == r["reward/first_is_digit"] for r in rows)


def test_monitor_stays_quiet_on_a_healthy_run(tmp_path):
    from jalign.trainer import train

    cfg = trainer_cfg(tmp_path, "[{fn: first_is_digit, weight: 1.0}, {fn: first_is_digit, weight: 0.0, name: gold}]",
                      "train.steps=12")
    train(cfg)
    ev = _evals(tmp_path)
    assert ev[-1]["eval/reward"] > ev[0]["eval/reward"] + 0.2
    assert all(r["eval/monitor/hacking_alarm"] == 0 for r in ev)
    assert ev[-1]["eval/monitor/first_alarm_step"] == -1 and ev[-1]["eval/monitor/reward_gold_corr"] > 0.9


# ---- resume --------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted_for_grpo_with_dynamic_sampling(tmp_path):
    from jalign.checkpoint import load_params
    from jalign.trainer import train

    def cfg(out, *extra):
        return load_config(None, [
            *MODEL, *OPTIM, "data.train=builtin:addition_prompts:train", "data.eval=builtin:addition_prompts:eval",
            "algorithm.name=grpo", "algorithm.reward_fn=codepoint_parity", "algorithm.dynamic_sampling=true",
            "algorithm.max_resample_rounds=2", "train.global_batch=8", "algorithm.num_rollouts_per_prompt=2",
            "algorithm.max_new_tokens=4", "algorithm.ppo_epochs=2", "algorithm.minibatch_size=8",
            "train.steps=6", "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=1",
            "train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "eval.prompts=16",
            "eval.max_new_tokens=4", f"train.out_dir={out}", *extra])

    train(cfg(tmp_path / "straight"))
    assert train(cfg(tmp_path / "sliced", "train.stop_after_steps=3"))["step"] == 3
    train(cfg(tmp_path / "sliced"))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "sliced")
    keys = ("actor_loss", "reward_mean", "dynamic_sampling/rounds", "dynamic_sampling/dropped_groups")
    series = lambda rows: {(r["step"], k): r[k] for r in rows for k in keys if k in r}  # noqa: E731
    assert series(a) == series(b) and len(series(a)) == 6 * len(keys)
    assert sum(r.get("dynamic_sampling/dropped_groups", 0) for r in a) > 0  # the resampling path ran
    ev = lambda rows: [(r["step"], r["eval/monitor/length_ratio"]) for r in rows if "eval/monitor/length_ratio" in r]  # noqa: E731
    assert ev(a) == ev(b) and len(ev(a)) == 3  # the monitor's baseline survived the resume
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_params(tmp_path / "straight")),
                 jax.device_get(load_params(tmp_path / "sliced")))
    import json

    meta = json.loads((tmp_path / "sliced" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["generation_eval"]["monitor"]["steps"] == [0, 3, 6]
