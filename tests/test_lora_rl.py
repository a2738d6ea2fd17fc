"""LoRA in the RL algorithms: the actor's trained params are the adapters over a frozen base role, the reference
is that base with the adapters off (no second copy), rollouts sample with the adapters applied; sharded ==
unsharded, resume == uninterrupted, and PPO's export (merged HF + PEFT adapter) loads in transformers / peft."""
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.grpo import GRPO
from jalign.algorithms.ppo import PPO
from jalign.algorithms.rl_rewards import rule_components
from jalign.checkpoint import load_params
from jalign.config import load_config
from jalign.models import lora as lora_lib
from jalign.models import transformer as tfm
from jalign.rewards import REWARDS, register_reward
from jalign.rollout.experience import rollout_rows
from sharding import make_mesh, make_rules, use_rules

from helpers import assert_trees_close, roles_for
from test_seam import _assert_bitwise, _resume_pair

ROOT = Path(__file__).parent.parent
LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2", "model.init_from=null", *LORA]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1",
         "optim.lr=1e-2", "optim.warmup_steps=0", "optim.eps=1e-4", "optim.schedule=constant"]
# a reward a random model's samples disagree on (exact match would be 0 for every sample: no gradient at all)
RL = ["data.train=builtin:addition_prompts:train", "data.eval=null", "train.global_batch=4",
      "algorithm.max_new_tokens=4", "algorithm.minibatch_size=8", "algorithm.reward_fn=odd_text_length",
      "roles.reward=null", "train.eval_every=0", "algorithm.truncated_response=keep"]
GRPO_CFG = "configs/grpo_tiny.yaml"

if "odd_text_length" not in REWARDS:
    @register_reward("odd_text_length")
    def odd_text_length(prompt, response, reference):
        return float(len(response) % 2)


def make(cls, config, shape, tmp_path, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / config, [*MODEL, *QUIET, *RL, "algorithm.num_rollouts_per_prompt=4",
                                      f"train.out_dir={tmp_path}", *extra])
    return cls(base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *_: None))


def independent_logps(params, rows, cfg, temperature):
    """log softmax(z / T)[target] from the model's logits, in NumPy (float64), masked to the response."""
    z = np.asarray(jax.jit(lambda p: tfm.lm_logits(p, tfm.forward(p, rows["tokens"], rows["positions"],
                                                                   rows["segment_ids"], cfg), cfg))(params),
                   np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(rows["targets"])[..., None], -1)[..., 0]
    return picked * np.asarray(rows["mask"])


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    algo = make(GRPO, GRPO_CFG, None, tmp_path_factory.mktemp("grpo"))
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        base_before = jax.device_get(roles["base"])
        adapters_before = jax.device_get(state.params)
        it = algo.train_batches()
        metrics = []
        for _ in range(4):
            state, m = algo.step(state, roles, next(it))
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return dict(algo=algo, state=state, roles=roles, metrics=metrics, base_before=base_before,
                adapters_before=adapters_before)


def test_grpo_with_lora_trains_only_the_adapters_over_a_frozen_base(grpo):
    algo, state, roles = grpo["algo"], grpo["state"], grpo["roles"]
    assert set(roles.params) == {"base"}  # the reference is the base itself: no second copy of the model
    assert set(state.params) == {"layers"} and set(state.params["layers"]) == set(lora_lib.TARGETS)
    n_adapter = lora_lib.param_count(state.params)
    assert n_adapter == lora_lib.param_count(algo.decls) < lora_lib.param_count(roles["base"]) / 2
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter  # Adam: adapters only
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(roles["base"]), grpo["base_before"])  # untouched
    after = jax.device_get(state.params)
    moved = {n: float(np.abs(after["layers"][n]["b"] - grpo["adapters_before"]["layers"][n]["b"]).max())
             for n in lora_lib.TARGETS}
    assert min(moved.values()) > 1e-4, moved
    m0, m3 = grpo["metrics"][0], grpo["metrics"][-1]
    assert m0["reward_std"] > 0  # the rewards disagree: there is a gradient
    assert abs(m0["kl"]) < 1e-6  # B = 0 at the start: the policy is exactly the base == the reference
    assert abs(m3["kl"]) > 1e-3  # (a k1 estimate: either sign) trained adapters move the policy away from the base...
    assert m3["logprob_max_diff"] < 1e-4  # ...and the rollouts were sampled with the adapters applied


def test_reference_logprobs_are_the_base_models_and_the_policy_is_base_plus_adapters(grpo):
    algo, state, roles = grpo["algo"], grpo["state"], grpo["roles"]
    cfg, T = algo.cfg.model, algo.a.temperature
    with use_rules(algo.rt.mesh, algo.rt.rules):
        idx = np.repeat(np.arange(4), algo.sizes.per_prompt)
        params, _ = algo.policy(state, roles)
        out = algo.sample(params, [algo.train_prompts.ids[i] for i in idx], jax.random.key(11))
        given = rule_components(algo.terms, algo.tokenizer, out, idx, algo.train_prompts)
        prep, _, _ = algo._score(state.params, None, algo.scoring_roles(roles), out, given,
                                 state.extra["kl_coef"], None)
        rows = jax.device_get(rollout_rows(out, algo.tokenizer.pad_id))
        base_params = jax.device_get(roles["base"])
        merged = jax.device_get(lora_lib.merge_adapters(roles["base"], state.params, cfg.lora))
    mask = rows["mask"]
    ref = independent_logps(base_params, rows, cfg, T)
    np.testing.assert_allclose(np.asarray(prep["ref_logps"]) * mask, ref, rtol=1e-5, atol=1e-5)
    policy = independent_logps(merged, rows, cfg, T)
    np.testing.assert_allclose(np.asarray(prep["old_logps"]) * mask, policy, rtol=1e-5, atol=1e-5)
    assert np.abs(policy - ref).max() > 1e-4  # the two really differ: the reference is not the trained policy


def test_lora_grpo_step_sharded_equals_single_device(grpo, tmp_path):
    """The same rollout (sampled once, placed on each mesh) gives the same update on 8 devices as on one."""
    trained = jax.device_get(grpo["state"].params)  # B != 0: the A path has a gradient too

    def one_step(shape, out_host, idx):
        algo = make(GRPO, GRPO_CFG, shape, tmp_path / str(shape))
        with use_rules(algo.rt.mesh, algo.rt.rules):
            roles = roles_for(algo)
            state = algo.init_state(roles)
            state = state.replace(params=jax.device_put(trained, algo.actor.param_shardings))
            out = {k: jax.device_put(v, base.field_sharding(algo.rt.mesh, algo.rt.rules,
                                                            ("batch",) + (None,) * (np.ndim(v) - 1),
                                                            leading_accum=False)) for k, v in out_host.items()}
            given = rule_components(algo.terms, algo.tokenizer, out, idx, algo.train_prompts)
            prep, pm, _ = algo._score(state.params, None, algo.scoring_roles(roles), out, given,
                                      state.extra["kl_coef"], None)
            state, tm = algo.update(state, prep, 0, algo.actor_roles(roles))
            return jax.device_get(state.params), jax.device_get({**pm, **tm})

    single = grpo["algo"]
    idx = np.repeat(np.arange(4, 8), single.sizes.per_prompt)
    with use_rules(single.rt.mesh, single.rt.rules):
        params, _ = single.policy(grpo["state"], grpo["roles"])
        out = jax.device_get(single.sample(params, [single.train_prompts.ids[i] for i in idx], jax.random.key(3)))
    ref_params, ref_m = one_step(None, out, idx)
    params8, m8 = one_step((2, 2, 2, 1), out, idx)
    for k in ("actor_loss", "policy_loss", "kl", "kl_loss", "reward_mean", "policy_grad_norm"):
        np.testing.assert_allclose(m8[k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_trees_close(params8, ref_params, rtol=1e-5)


def test_lora_grpo_resume_equals_uninterrupted(tmp_path):
    straight, sliced = _resume_pair(tmp_path, GRPO_CFG, [
        *LORA, *RL, "model.layers=2", "algorithm.num_rollouts_per_prompt=4", "optim.lr=1e-2",
        "optim.warmup_steps=0"])
    _assert_bitwise(straight, sliced, 4)  # training metrics and the checkpointed params, bitwise
    adapters = jax.device_get(load_params(straight))
    assert set(adapters) == {"layers"} and set(adapters["layers"]) == set(lora_lib.TARGETS)  # adapters only


def test_ppo_with_lora_exports_a_merged_model_and_a_peft_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from jalign.models.hf_io import save_hf
    from jalign.trainer import train

    run, hf = tmp_path / "run", tmp_path / "hf"
    extra = ["algorithm.num_rollouts_per_prompt=2", "train.steps=3", "data.eval=builtin:addition_prompts:eval",
             "eval.prompts=8", "eval.max_new_tokens=3", "train.eval_every=3"]
    cfg = load_config(ROOT / "configs/ppo_tiny.yaml", [*MODEL, *QUIET, *RL, *extra, f"train.out_dir={run}",
                                                       f"train.export_hf={hf}"])
    last = train(cfg)
    assert np.isfinite(last["actor_loss"]) and np.isfinite(last["value_loss"])
    kl = {k: last[k] for k in ("eval/greedy_kl", "eval/kl") if k in last}  # the evaluation's KL: to the base
    assert kl and all(np.isfinite(v) and v != 0 for v in kl.values()), sorted(last)
    adapters = jax.device_get(load_params(run))
    assert set(adapters) == {"layers"}  # the actor checkpoint holds the adapters (the critic is in extra, full)
    algo = PPO(base.Runtime(cfg=cfg, mesh=make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]), rules=make_rules(),
                            run_dir=run, log=lambda *_: None))
    assert set(algo.role_specs()) >= {"base"} and "reference" not in algo.role_specs()
    assert "score" in algo.critic_decls and "layers" in algo.critic_decls  # the critic is a full model
    ids = np.array([[1, 4, 20, 30, 40, 5, 60, 61]], np.int32)
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        params = algo.trainable.forward_params(adapters, roles)
        mcfg = algo.cfg.model
        pos, seg = np.arange(8, dtype=np.int32)[None], np.ones_like(ids)
        ours = np.asarray(jax.jit(lambda p: tfm.lm_logits(p, tfm.forward(p, ids, pos, seg, mcfg), mcfg))(params))
        save_hf(jax.device_get(roles["base"]), mcfg, tmp_path / "base")
    assert np.abs(adapters["layers"]["q"]["b"]).max() > 0  # the adapters trained: the check below is not the base
    merged = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    t_ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        theirs = merged(input_ids=t_ids).logits.numpy()
        tuned = peft.PeftModel.from_pretrained(hf_base, hf / "adapter").eval()(input_ids=t_ids).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tuned, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_qlora_grpo_step_on_a_quantised_base(tmp_path, fmt):
    """QLoRA + RL: one GRPO step over a base stored quantised (int8, 4-bit NormalFloat): the rollout samples and
    the scoring runs through the dequantise-on-use base, the objective is finite, the adapters move, the stored
    base (codes and scales) is bit-identical afterwards and is also the reference (KL 0 at B = 0)."""
    from jalign.models import quant

    algo = make(GRPO, GRPO_CFG, None, tmp_path, "model.hidden=64", "model.layers=1", f"model.quantize_base={fmt}")
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        assert set(roles.params) == {"base"} and all(quant.is_quantized(roles["base"]["layers"][n])
                                                     for n in lora_lib.TARGETS)
        codes = roles["base"]["layers"]["q"]["qvalue"]
        assert codes.dtype == (np.int8 if fmt == "int8" else np.uint8)  # nf4: two 4-bit codes per byte
        before = jax.device_get(roles["base"])
        state, m = algo.step(state, roles, next(algo.train_batches()))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        after = jax.device_get(state.params)
    assert np.isfinite(m["actor_loss"]) and np.isfinite(m["policy_grad_norm"]) and m["skipped"] == 0, m
    assert m["reward_std"] > 0 and m["policy_grad_norm"] > 0  # the rewards disagree: a real gradient
    assert abs(m["kl"]) < 1e-5 and m["logprob_max_diff"] < 1e-4  # B = 0: sampler == policy == the quantised base
    moved = [float(np.abs(after["layers"][n]["b"]).max()) for n in lora_lib.TARGETS]
    assert min(moved) > 1e-5, moved
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(roles["base"]), before)
