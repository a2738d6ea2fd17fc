"""jalign plan against reality: the plan's per-device figures of a tiny run equal what the real run's compiled
train step reports and what its state really occupies on each device; the rollout engine's planned refill and
decode equal what the real engine compiled on a real rollout; a config that does not fit is refused with knobs
that, re-planned, do fit; the real-size configs (Llama-3-8B SFT/DPO/GRPO on 8, Qwen2.5-7B PPO on 16, Llama-3-70B
DPO on 64 simulated devices; reduced depth, abstract only) fit 80 GB with the resident bytes their parameter
counts give; ``jalign train --dry-run`` writes nothing; every shipped tiny config gets a verdict, or one message
naming what the plan cannot size."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.config import ConfigError, load_config
from jalign.plan import GiB, format_plan, plan_config
from sharding.rules import use_rules
from tests.helpers import roles_for

ROOT = Path(__file__).parent.parent
SFT = ROOT / "configs/sft_tiny.yaml"
# data 2 x fsdp 4 so that the plan's shardings matter; no generation-based eval (compiled in its own test files)
TINY = ["mesh.data=2", "mesh.fsdp=4", "model.hidden=64", "model.mlp=128", "model.layers=2", "model.heads=4",
        "model.kv_heads=2", "data.seq_len=32", "train.global_batch=16", "train.micro_batch=8", "eval.prompts=0",
        "train.progress=false", "train.tensorboard=false"]


def _per_device_bytes(tree, device) -> int:
    """Bytes of ``tree``'s shards that really sit on ``device``."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for s in x.addressable_shards if s.device == device)


def test_plan_equals_the_real_runs_compiled_step_and_state(tmp_path):
    from jalign.trainer import setup

    overrides = TINY + [f"train.out_dir={tmp_path / 'run'}"]
    plan = plan_config(load_config(SFT, overrides), overrides=tuple(overrides), knobs=False)
    step = next(p for p in plan.programs if p.name == "train_step")

    rt, algo = setup(load_config(SFT, overrides))
    with use_rules(rt.mesh, rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        batch = algo.global_batch(algo.prepare_batch(next(algo.train_batches()), "train"))
        compiled = algo._train_step.lower(state, algo.step_inputs(roles), batch).compile()
    m = compiled.memory_analysis()
    # The same program from shapes only: XLA's own figures agree to 2 % (the batch's int/float dtypes and
    # shardings are the only things the plan reconstructs rather than reads).
    for ours, real in ((step.arguments, m.argument_size_in_bytes), (step.outputs, m.output_size_in_bytes),
                       (step.temporaries, m.temp_size_in_bytes), (step.aliased, m.alias_size_in_bytes)):
        assert abs(ours - real) <= 0.02 * real + 1024, (ours, real)
    # What the run really allocates: its params and optimizer state on every device equal the plan's
    # resident buffers exactly (the plan's train-step peak = those + the batch + XLA's temporaries).
    planned = plan.persistent["params"]["device"] + plan.persistent["opt_state"]["device"]
    for d in jax.devices():
        real = _per_device_bytes(state.params, d) + _per_device_bytes(state.opt_state, d)
        assert planned == real, (d, planned, real)
    assert step.arguments >= planned and step.peak >= planned
    # the run's real step runs on these shapes (and the plan's arguments cover them)
    with use_rules(rt.mesh, rt.rules):
        state, metrics = algo.step(state, roles, next(algo.train_batches()))
    assert np.isfinite(float(metrics["loss"]))
    assert not (tmp_path / "run").exists()  # neither the plan nor the setup wrote the run directory


def test_a_config_that_does_not_fit_is_refused_with_knobs_that_fit():
    overrides = tuple(TINY + ["train.micro_batch=16", "data.eval=null"])  # the train step only: each knob re-plans
    cfg = load_config(SFT, list(overrides))
    free = plan_config(copy.deepcopy(cfg), overrides=overrides, knobs=False)
    budget = 0.85 * free.peak  # below the peak, above what a smaller micro batch needs
    plan = plan_config(cfg, overrides=overrides, device_memory=budget)
    assert plan.fits is False
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "knobs that make it fit" in text, text
    fitting = [k for k in plan.knobs if k["fits"]]
    assert fitting, plan.knobs
    assert any(o.startswith("train.micro_batch=") for k in fitting for o in k["overrides"]), fitting
    # the knob is real: the config with it, planned afresh, fits the same budget
    again = plan_config(load_config(SFT, list(overrides) + fitting[0]["overrides"]), device_memory=budget,
                        knobs=False)
    assert again.fits and again.peak <= budget and abs(again.peak - fitting[0]["peak"]) < 1e-6 * budget


def _cli(*args, timeout=300, devices=8):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "jalign", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_dry_run_writes_nothing_and_refuses_what_does_not_fit(tmp_path):
    run = tmp_path / "run"
    ok = _cli("train", str(SFT), *TINY, f"train.out_dir={run}", "--dry-run")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train_step" in ok.stdout and "run peak:" in ok.stdout
    tiny = _cli("train", str(SFT), *TINY, f"train.out_dir={run}", "--dry-run", "--device-memory", "0.0001",
                "--no-knobs")
    assert tiny.returncode == 4, (tiny.stdout[-2000:], tiny.stderr[-2000:])
    assert "DOES NOT FIT" in tiny.stdout
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_70b_dpo_plans_on_64_simulated_devices_from_shapes_only(tmp_path):
    """configs/dpo_llama3_70b.yaml (weights not on this machine): compiled at its full 80 layers; every program
    fits 80 GB devices and the resident params + moments are those of 70B over the mesh."""
    out = tmp_path / "plan.json"
    p = _cli("plan", "configs/dpo_llama3_70b.yaml", "--devices", "64", "--device-memory", "80", "--no-knobs",
             "--json", str(out), timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    plan = json.loads(out.read_text())
    assert plan["devices"] == 64 and plan["layers"] == 80 and plan["planned_layers"] is None
    assert plan["fits"] is True and plan["peak"] <= 80 * GiB
    names = [q["name"] for q in plan["programs"]]
    assert names[0] == "reference_logps" and "train_step" in names, names
    # 70.6e9 f32 params and two f32 Adam moments over 64 devices
    n = 70_553_706_496
    resident = plan["persistent"]["params"]["device"] + plan["persistent"]["opt_state"]["device"]
    assert abs(resident - 3 * 4 * n / 64) < 0.01 * resident, resident / GiB
    assert "not here" in " ".join(plan["notes"])  # planned from the config's architecture, no weights read


@pytest.mark.parametrize("config,extra", [
    ("kto_tiny", ["algorithm.reference=precomputed"]),
    ("dpo_tiny", ["model.lora.rank=4", "algorithm.reference=precomputed"]),
    ("dpo_tiny", ["algorithm.loss=simpo"]),
    ("sft_tiny", ["model.lora.rank=4"]),
])  # the shipped configs as they are: test_every_shipped_tiny_config_gets_a_verdict
def test_algorithms_of_main_give_their_programs(config, extra):
    arch = ["model.vocab_size=384", "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4",
            "model.kv_heads=2", "model.tokenizer=byte", "eval.prompts=0", "data.seq_len=16"]
    plan = plan_config(load_config(ROOT / f"configs/{config}.yaml", arch + extra), knobs=False)
    names = [p.name for p in plan.programs]
    assert "train_step" in names
    if "algorithm.reference=precomputed" in extra:
        assert names[0] == "reference_logps"
    if "model.lora.rank=4" in extra:
        # the trained params are the adapters; the frozen base is a role on the devices during the step
        assert "role:base" in plan.persistent
        assert plan.persistent["params"]["device"] < plan.persistent["role:base"]["device"]
        step = next(p for p in plan.programs if p.name == "train_step")
        assert "role:base" in step.uses and step.resident == 0
    if "algorithm.loss=simpo" in extra:
        assert not any(k.startswith("role:") for k in plan.persistent)  # reference-free: no reference built


# ---- the rollout engine ------------------------------------------------------------------------
GRPO_TINY = ROOT / "configs/grpo_tiny.yaml"
ENGINE_RUN = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
              "model.kv_heads=2", "model.init_from=null", "mesh.data=2", "mesh.fsdp=4", "data.eval=null",
              "train.global_batch=4", "algorithm.num_rollouts_per_prompt=4", "algorithm.minibatch_size=8",
              "algorithm.max_new_tokens=4", "train.progress=false", "train.tensorboard=false"]


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_engine_plan_equals_the_real_engines_compiled_programs(tmp_path, monkeypatch):
    """GRPO's rollout as the engine runs it (slots, page pool, prefill rows, decode window): the plan's largest
    refill and widest decode equal what the real engine compiled for the calls it made on a real rollout (XLA's
    figures to 2 % + 1 KiB), and its decode holds the page pools the config implies."""
    import jax.numpy as jnp

    from jalign.rollout import programs as rp
    from jalign.trainer import setup

    calls = {"refill": {}, "decode": {}}
    refill, decode = rp.Programs.refill, rp.Programs.decode

    def spy_refill(self, state, params, adm, rows):
        calls["refill"][rows["tokens"].shape[0]] = (self, _abstract((state, params, adm, rows)))
        return refill(self, state, params, adm, rows)

    def spy_decode(self, state, params, n_steps, exit_on_free, width):
        scalars = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_))
        calls["decode"][width] = (self, _abstract((state, params)) + scalars)
        return decode(self, state, params, n_steps, exit_on_free, width)

    monkeypatch.setattr(rp.Programs, "refill", spy_refill)
    monkeypatch.setattr(rp.Programs, "decode", spy_decode)
    overrides = ENGINE_RUN + [f"train.out_dir={tmp_path / 'run'}"]
    rt, algo = setup(load_config(GRPO_TINY, overrides))
    with use_rules(rt.mesh, rt.rules):
        roles = roles_for(algo)
        state = algo.init_state(roles)
        prompts = algo.train_prompts.ids
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))  # the run's prompt block
        rows = [prompts[i] for i in np.repeat([longest, 0, 1, 2], algo.sizes.per_prompt)]
        out = algo.sample(algo.policy(state, roles)[0], rows, jax.random.key(0))
    assert int(np.asarray(out["lengths"]).max()) >= 1
    # the CPU engine's programs (it slices the layer weights per call on CPU): accelerator=False
    plan = plan_config(load_config(GRPO_TINY, overrides), prompt_len=algo.P, knobs=False, accelerator=False)
    by_name = {p.name: p for p in plan.programs}
    planned = {"refill": by_name["rollout_prefill"], "decode": by_name["rollout"]}
    for kind in ("refill", "decode"):
        key = max(calls[kind])  # the largest refill (rows) / widest decode (page window) the run made
        prog, args = calls[kind][key]
        fn = prog.refill_fn if kind == "refill" else prog.decode_fn(key)
        with use_rules(prog.mesh, prog.rules):
            m = fn.lower(*args).compile().memory_analysis()
        ours = planned[kind]
        for a, b in ((ours.arguments, m.argument_size_in_bytes), (ours.outputs, m.output_size_in_bytes),
                     (ours.temporaries, m.temp_size_in_bytes), (ours.aliased, m.alias_size_in_bytes)):
            assert abs(a - b) <= 0.02 * b + 1024, (kind, a, b)
    lay = prog.lay  # the real engine's layout: slots, pool and shapes, as the plan states them
    assert f"{lay.num_slots} slots ({lay.slots} per shard), a pool of {lay.pages} pages x {lay.page_size}" in \
        planned["decode"].note, planned["decode"].note
    assert f"{max(calls['refill']) // lay.dp} prefill rows" in planned["refill"].note
    # independently: the donated state holds one shard's k and v pools per device (dp = 8 = the devices here)
    c = algo.cfg.model
    pool = 2 * c.layers * c.kv_heads * lay.pages * lay.page_size * c.resolved_head_dim * jnp.dtype(c.dtype).itemsize
    params = plan.persistent["params"]["device"]
    assert planned["decode"].arguments >= pool + params and planned["decode"].aliased >= pool
    assert lay.num_slots == 16 and lay.dp == 8  # 4 prompts x 4 samples, every row in a slot
    from jalign.plan import candidate_knobs  # fewer slots is a memory knob (one slot per shard at least)

    assert [k for k in candidate_knobs(load_config(GRPO_TINY, overrides), plan) if k[0].startswith("rollout.")] == \
        [["rollout.slots=8"]]


# ---- every shipped config ----------------------------------------------------------------------
ARCH = ["model.vocab_size=384", "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4",
        "model.kv_heads=2", "model.tokenizer=byte", "eval.prompts=0", "data.eval=null"]  # the run's own programs
# one shipped tiny config per algorithm (CI time): these three change only the data (and rule reward) of
# sft_tiny / grpo_tiny, not the programs
SAME_PROGRAMS_AS_ANOTHER = {"cai_critic_tiny", "sft_math_tiny", "grpo_math_tiny"}
SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*_tiny.yaml") if p.stem not in SAME_PROGRAMS_AS_ANOTHER)
GENTRAIN = {"rs_tiny": "generator", "online_dpo_tiny": None, "spin_tiny": "opponent", "opd_tiny": None,
            "steerlm2_tiny": "generator"}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_tiny_config_gets_a_verdict(name):
    """`jalign plan` on every algorithm's tiny config (its architecture shrunk): a verdict and the run's programs, or, for
    Constitutional AI (its critic and judge read prompts made of generated text), one message naming it."""
    cfg = load_config(ROOT / f"configs/{name}.yaml", ARCH)
    if name.startswith(("cai_sl", "cai_rlaif")):
        with pytest.raises(ConfigError, match=rf"{name}.yaml: algorithm.name={cfg.algorithm.name}: .*prompts built "
                                              r"from the generated answers.*jalign plan cannot size"):
            plan_config(cfg, device_memory=80 * GiB, knobs=False)
        return
    if cfg.algorithm.name == "reward" and not _sizes_its_extra_axes("reward"):  # a pair's 2 sides: not given
        with pytest.raises(ConfigError, match=r"rm_tiny.yaml: algorithm.name=reward: batch field .* the size of its "
                                              r"axis None is not given.*jalign plan cannot size"):
            plan_config(cfg, device_memory=80 * GiB, knobs=False)
        return
    plan = plan_config(cfg, device_memory=80 * GiB, knobs=False)
    assert plan.fits is True and plan.peak > 0
    assert "fits" in format_plan(plan)
    names = [p.name for p in plan.programs]
    if cfg.algorithm.name in ("ppo", "grpo", "rloo", "dapo", "gspo", "reinforce_pp"):
        # the engine's rollout, scoring with the frozen roles, the update
        assert names[:4] == ["rollout_prefill", "rollout", "score", "update"], names
        assert "role:reference" in plan.persistent and ("role:reward" in plan.persistent) == (name == "ppo_tiny")
    else:
        assert "train_step" in names, names
    if name in GENTRAIN:  # generate-then-train: the engine's rollout, the preparation, the update
        assert names[:4] == ["rollout_prefill", "rollout", "prepare", "train_step"], names
        snapshot = GENTRAIN[name]  # rs_tiny: rounds of 10 steps; spin_tiny: the opponent
        if snapshot:  # the round's snapshot of the policy sits on the devices: a copy of its params
            assert plan.persistent[f"role:{snapshot}"] == plan.persistent["params"]
            assert by(plan, "rollout").uses == (f"role:{snapshot}",)
        train = by(plan, "train_step")
        assert train.arguments >= plan.persistent["params"]["device"] + plan.persistent["opt_state"]["device"]


def _sizes_its_extra_axes(algorithm: str) -> bool:
    """Whether the algorithm gives the sizes of its batch fields' other axes (``batch_trailing_dims``)."""
    from jalign.algorithms.base import SupervisedAlgorithm
    from jalign.algorithms.registry import resolve

    return resolve(algorithm).batch_trailing_dims is not SupervisedAlgorithm.batch_trailing_dims


def by(plan, name):
    return next(p for p in plan.programs if p.name == name)


# ---- the real-size example configs -------------------------------------------------------------
def _decoder_params(vocab, hidden, mlp, layers, heads, kv_heads, qkv_bias=False, lm_head=True) -> int:
    """Parameters of a Llama/Qwen2 decoder (untied embeddings): embedding, per layer q/k/v/o (+ q/k/v biases),
    gate/up/down and two norms, the final norm, the LM head."""
    hd = hidden // heads
    layer = (hidden * heads * hd + 2 * hidden * kv_heads * hd + heads * hd * hidden + 3 * hidden * mlp + 2 * hidden
             + ((heads + 2 * kv_heads) * hd if qkv_bias else 0))
    return vocab * hidden + layers * layer + hidden + (vocab * hidden if lm_head else 0)


LLAMA3_8B = _decoder_params(128256, 4096, 14336, 32, 32, 8)
QWEN25_7B = _decoder_params(152064, 3584, 18944, 28, 28, 4, qkv_bias=True)


def test_parameter_formula_gives_the_published_counts():
    assert LLAMA3_8B == 8_030_261_248 and QWEN25_7B == 7_615_616_512  # their config.json / model cards


def _near(a, b, rel=0.01):
    return abs(a - b) <= rel * b


# The evaluation's programs are left to benchmarks/plan.py (none of them is a run's peak there): CI time.
NO_EVAL = ["eval.prompts=0", "data.eval=null"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_llama3_8b", "dpo_llama3_8b", "grpo_llama3_8b"])
def test_llama3_8b_configs_fit_8_devices_of_80_gb(name):
    """The shipped Llama-3-8B configs (weights and data not on this machine) on the 8 devices of one node, compiled
    at their full 32 layers (the 2/4-layer extrapolation called SFT at micro_batch 16 a fit; it needs 80.55 GiB): every phase of training fits 80 GB, and the resident f32 params +
    two f32 Adam moments are 12 bytes x 8.03e9 over 8 devices."""
    plan = plan_config(load_config(ROOT / f"configs/{name}.yaml", NO_EVAL), device_memory=80 * GiB, knobs=False)
    assert plan.devices == 8 and plan.layers == 32 and plan.planned_layers is None
    assert plan.fits is True and plan.peak <= 80 * GiB, format_plan(plan)
    resident = plan.persistent["params"]["device"] + plan.persistent["opt_state"]["device"]
    assert _near(resident, 12 * LLAMA3_8B / 8), resident / GiB
    names = [p.name for p in plan.programs]
    if name == "grpo_llama3_8b":  # the reference (policy-init) parked in host memory between uses
        assert names[:4] == ["rollout_prefill", "rollout", "score", "update"], names
        ref = plan.persistent["role:reference"]
        assert ref["device"] == 0 and _near(ref["host"], 4 * LLAMA3_8B / 8)
    elif name == "dpo_llama3_8b":
        assert names[:2] == ["reference_logps", "train_step"], names
    else:
        assert names[0] == "train_step"


@pytest.mark.slow
def test_qwen2_5_7b_ppo_fits_16_devices_of_80_gb(tmp_path):
    """configs/ppo_qwen2_5_7b.yaml on 16 simulated devices: actor, critic, reference and reward model; every
    phase fits 80 GB; actor and critic (no LM head, a 1-output score head) with their Adam moments resident,
    the reference and the reward model in host memory."""
    out = tmp_path / "plan.json"
    p = _cli("plan", "configs/ppo_qwen2_5_7b.yaml", *NO_EVAL, "--devices", "16", "--device-memory", "80",
             "--no-knobs", "--json", str(out), timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    plan = json.loads(out.read_text())
    assert plan["devices"] == 16 and plan["layers"] == 28 and plan["fits"] is True and plan["peak"] <= 80 * GiB
    names = [q["name"] for q in plan["programs"]]
    assert names[:4] == ["rollout_prefill", "rollout", "score", "update"], names
    per = plan["persistent"]
    critic = QWEN25_7B - 152064 * 3584 + 3584  # the LM head replaced by a 1-output score head
    assert _near(per["params"]["device"] + per["opt_state"]["device"], 12 * QWEN25_7B / 16)
    assert _near(per["critic"]["device"] + per["critic_opt_state"]["device"], 12 * critic / 16)
    for role, n in (("role:reference", QWEN25_7B), ("role:reward", critic)):
        assert per[role]["device"] == 0 and _near(per[role]["host"], 4 * n / 16), (role, per[role])
