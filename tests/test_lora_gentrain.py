"""LoRA in the generate-then-train algorithms (rs, online_dpo, spin, cai_sl, cai_rlaif, opd): only the adapters
train over a frozen base role; the roles that are the starting policy (RS's and online DPO's reference, CAI's
default critic and judge) are that base itself (its buffers, no second copy) and give exactly the base model's
log-probs; SPIN's opponent of iteration 1 is the base with the iteration-0 adapters (a snapshot of adapters
only); resume inside a round == uninterrupted (bitwise) with an adapter-only iterate store and checkpoints;
the export is the merged model (base + adapters) and the PEFT adapter of the trained adapters."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.registry import resolve
from jalign.checkpoint import load_params
from jalign.config import load_config
from jalign.models import lora as lora_lib
from jalign.models import transformer as tfm
from sharding import make_mesh, make_rules, use_rules

from helpers import roles_for
from test_gentrain import make_lm_run
from test_gentrain_runs import np_token_logps
from test_seam import QUIET, TINY_MODEL, _assert_bitwise, _resume_pair

ROOT = Path(__file__).parent.parent
LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
RULE = ["algorithm.reward_fn=tests/gentrain_rules.py:char_score", "roles.reward=null",
        "algorithm.truncated_response=keep"]  # a random model rarely ends: rank every sample by its reward
COMMON = [*TINY_MODEL, *LORA, *QUIET, "data.eval=null", "eval.prompts=0", "train.eval_every=0",
          "train.global_batch=4", "algorithm.max_new_tokens=3", "optim.lr=1e-2", "optim.warmup_steps=0",
          "optim.schedule=constant", "optim.eps=1e-4", "algorithm.log_rollouts=true"]
# name: (config, steps, overrides); the teacher of opd is filled in by the fixture
RUNS = {
    "rs": ("rs_tiny", 2, [*RULE, "data.train=builtin:addition_prompts:train", "algorithm.rs_iterations=1",
                          "algorithm.num_rollouts_per_prompt=2"]),  # one round of 2 steps: a generator snapshot
    "online_dpo": ("online_dpo_tiny", 1, [*RULE, "data.train=builtin:addition_prompts:train", "algorithm.sft_weight=0.5",
                                          "algorithm.num_rollouts_per_prompt=2", "algorithm.reference=start"]),
    "spin": ("spin_tiny", 2, ["data.train=builtin:addition:train:64", "algorithm.spin_iterations=2"]),
    "cai_sl": ("cai_sl_tiny", 1, ["roles.critic=null", "algorithm.critique_max_new_tokens=4",
                                  "algorithm.revision_max_new_tokens=3", "algorithm.truncated_revision=keep"]),
    "cai_rlaif": ("cai_rlaif_tiny", 1, ["roles.judge=null", "data.train=builtin:addition_prompts:train",
                                        "algorithm.min_confidence=0.0", "algorithm.sft_weight=0.0"]),
    "opd": ("opd_tiny", 1, ["data.train=builtin:addition_prompts:train", "algorithm.num_rollouts_per_prompt=2"]),
}
# the roles built from config (no policy-init copy among them) and the roles that must be the base's own buffers
BUILT = {"opd": {"base", "teacher"}}
ALIASES = {"rs": ("reference",), "online_dpo": ("reference",), "cai_sl": ("critic",),
           "cai_rlaif": ("reference", "judge")}


def make(name, tmp_path, *extra):
    config, steps, overrides = RUNS[name]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [*COMMON, *overrides, f"train.steps={steps}",
                                                           f"train.out_dir={tmp_path}", *extra])
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *_: None)
    return resolve(cfg.algorithm.name)(rt), steps


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_lm_run(tmp_path_factory.mktemp("teacher"), 7, model=TINY_MODEL[:-1], sharpen=4.0)


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory, teacher_dir):
    """A tiny LoRA run of the algorithm, step by step in process: what each step started from and returned."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    algo, steps = make(name, out, *([f"roles.teacher=run:{teacher_dir}"] if name == "opd" else []))
    with use_rules(algo.rt.mesh, algo.rt.rules):
        roles = roles_for(algo)
        built = set(roles.params)
        state = algo.init_state(roles)
        algo.start(state, roles)
        base_before = jax.device_get(roles["base"])
        it = algo.train_batches()
        adapters, metrics, frozen = [jax.device_get(state.params)], [], []
        for _ in range(steps):
            state, m = algo.step(state, roles, next(it))
            frozen.append(dict(roles.params))  # the roles the step ran with (the next round replaces them)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            adapters.append(jax.device_get(state.params))
    logged = {r["step"]: r for r in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines())}
    return dict(name=name, algo=algo, state=state, roles=roles, built=built, base_before=base_before,
                adapters=adapters, metrics=metrics, frozen=frozen, logged=logged, out=out)


def test_only_the_adapters_train_over_a_frozen_base(run):
    algo, state, roles, name = run["algo"], run["state"], run["roles"], run["name"]
    assert run["built"] == BUILT.get(name, {"base"})  # no second copy of the model for a start-policy role
    for alias in ALIASES.get(name, ()):
        assert roles.params[alias] is roles.params["base"], alias  # the base's own arrays
    assert set(state.params) == {"layers"} and set(state.params["layers"]) == set(lora_lib.TARGETS)
    n_adapter = lora_lib.param_count(state.params)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter  # Adam: adapters only
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(roles["base"]), run["base_before"])
    for m in run["metrics"]:
        assert m["skipped"] == 0 and np.isfinite(m["loss"]) and m["num_tokens"] > 0, m
    start, end = run["adapters"][0], run["adapters"][-1]
    assert all(np.abs(start["layers"][n]["b"]).max() == 0 for n in lora_lib.TARGETS)  # B = 0: starts at the base
    moved = [float(np.abs(end["layers"][n]["b"]).max()) for n in lora_lib.TARGETS]
    assert min(moved) > 1e-5, moved


def side_logp_sums(params, cfg, train: dict) -> np.ndarray:
    """Per pair side, the sum of log p(target) over the loss mask, in float64 NumPy: [rows, 2]."""
    rows = {k: np.asarray(train[k]).reshape((-1,) + np.asarray(train[k]).shape[2:])
            for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    return (np_token_logps(params, cfg, rows) * rows["loss_mask"]).sum(-1)


def merged(run, adapters):
    return jax.device_get(lora_lib.merge_adapters(run["roles"]["base"], adapters, run["algo"].cfg.model.lora))


def test_start_policy_roles_and_iterates_give_the_base_and_the_snapshot_adapters(run):
    name, cfg = run["name"], run["algo"].cfg.model
    base_params = run["base_before"]
    if name in ("online_dpo", "cai_rlaif"):  # the reference's log-prob sums of the pairs are the base model's
        train = run["logged"][1]["train"]
        np.testing.assert_allclose(np.asarray(train["ref_logps"]).reshape(-1, 2),
                                   side_logp_sums(base_params, cfg, train), rtol=1e-5, atol=1e-5)
    elif name == "spin":
        # iteration 0's opponent: the start adapters (B = 0): exactly the base's log-probs
        t0, t1 = run["logged"][1]["train"], run["logged"][2]["train"]
        np.testing.assert_allclose(np.asarray(t0["ref_logps"]).reshape(-1, 2), side_logp_sums(base_params, cfg, t0),
                                   rtol=1e-5, atol=1e-5)
        # iteration 1's opponent: the same base with a snapshot of the adapters after step 1, bit for bit
        opponent = run["frozen"][1]["opponent"]
        for n in lora_lib.TARGETS:
            w = opponent["layers"][n]
            assert isinstance(w, lora_lib.LoRAWeight) and w.base is run["roles"].params["base"]["layers"][n]
            np.testing.assert_array_equal(jax.device_get(w.a), run["adapters"][1]["layers"][n]["a"])
            np.testing.assert_array_equal(jax.device_get(w.b), run["adapters"][1]["layers"][n]["b"])
        expected = side_logp_sums(merged(run, run["adapters"][1]), cfg, t1)
        np.testing.assert_allclose(np.asarray(t1["ref_logps"]).reshape(-1, 2), expected, rtol=1e-5, atol=1e-5)
        assert np.abs(expected - side_logp_sums(base_params, cfg, t1)).max() > 1e-4  # it is not the base any more
    elif name == "rs":  # the round's generator: the base with a snapshot of the start adapters
        gen = run["frozen"][-1]["generator"]
        for n in lora_lib.TARGETS:
            assert gen["layers"][n].base is run["roles"].params["base"]["layers"][n]
            np.testing.assert_array_equal(jax.device_get(gen["layers"][n].b), run["adapters"][0]["layers"][n]["b"])
        assert abs(run["metrics"][0]["kl_to_start"]) < 1e-5  # B = 0: the samples' KL to the start (the base) is 0
    else:
        pytest.skip({"cai_sl": "its critic is the base's buffers (test above); a 1-step round has no iterate role",
                     "opd": "no frozen role of the policy (its one role is the teacher)"}[name])


@pytest.mark.slow
def test_lora_rs_resume_inside_a_round_equals_uninterrupted_and_exports(tmp_path):
    # 4 steps in 2 rounds, stopped after step 3: the resumed run reloads round 1's adapters from RUN_DIR/iterates
    extra = [*LORA, *RULE, "data.train=builtin:addition_prompts:train", "data.eval=null", "train.global_batch=4",
             "algorithm.max_new_tokens=3", "algorithm.rs_iterations=2", "algorithm.num_rollouts_per_prompt=2",
             "optim.lr=1e-2", "optim.warmup_steps=0", "train.eval_every=0", "algorithm.log_rollouts=true",
             "mesh.data=4", "mesh.tensor=2", f"train.export_hf={tmp_path / 'hf'}"]  # 4 kept rows over 4 data shards
    straight, sliced = _resume_pair(tmp_path, "configs/rs_tiny.yaml", extra, steps=4, at=3)
    _assert_bitwise(straight, sliced, 4)
    assert (sliced / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
    for run_dir in (straight, sliced / "iterates"):  # checkpoints and iterates: the adapters only
        saved = jax.device_get(load_params(run_dir))
        assert set(saved) == {"layers"} and set(saved["layers"]) == set(lora_lib.TARGETS)
        assert all(set(v) == {"a", "b"} for v in saved["layers"].values())
    check_export(tmp_path / "hf", jax.device_get(load_params(straight)), load_config(straight / "config.yaml"))


def check_export(hf, adapters, cfg):
    """The export of a LoRA run: the merged HF checkpoint is base + (alpha/r) A B, and the PEFT adapter
    directory holds exactly the trained adapters (both read back by jalign's HF / PEFT readers; that those
    formats load in transformers / peft with the same logits is tested in test_lora.py and, for an RL export,
    in test_lora_rl.py)."""
    from jalign.models import params as params_lib
    from jalign.models.hf_io import load_hf_params
    from jalign.models.peft_io import load_peft
    from jalign.roles import policy_init_seed

    mcfg = cfg.model
    base_params = params_lib.init_params(tfm.declare_params(mcfg), policy_init_seed(cfg.train.seed))  # the random base
    assert np.abs(adapters["layers"]["q"]["b"]).max() > 0  # trained: the merged model is not the base
    expected = jax.device_get(lora_lib.merge_adapters(base_params, adapters, mcfg.lora))
    got = jax.device_get(load_hf_params(hf, mcfg))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
    imported, lora_cfg = load_peft(hf / "adapter", mcfg)
    assert (lora_cfg.rank, lora_cfg.alpha) == (mcfg.lora.rank, mcfg.lora.alpha)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(imported), adapters)
