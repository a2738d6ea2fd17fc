"""jalign plan against reality: the plan's per-device figures of a tiny run equal what the real run's compiled
train step reports and what its state really occupies on each device; a config that does not fit is refused
with knobs that, re-planned, do fit; a 70B config plans (reduced depth, abstract only) on 64 simulated devices;
``jalign train --dry-run`` writes nothing; an algorithm the plan does not cover is one message naming it."""
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
    """configs/dpo_llama3_70b.yaml (weights not on this machine): compiled at 2 and 4 layers, extrapolated to 80;
    every program fits 80 GB devices and the resident params + moments are those of 70B over the mesh."""
    out = tmp_path / "plan.json"
    p = _cli("plan", "configs/dpo_llama3_70b.yaml", "--devices", "64", "--device-memory", "80", "--no-knobs",
             "--json", str(out), timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    plan = json.loads(out.read_text())
    assert plan["devices"] == 64 and plan["layers"] == 80 and plan["planned_layers"] == [2, 4]
    assert plan["fits"] is True and plan["peak"] <= 80 * GiB
    names = [q["name"] for q in plan["programs"]]
    assert names[0] == "reference_logps" and "train_step" in names, names
    # 70.6e9 f32 params and two f32 Adam moments over 64 devices
    n = 70_553_706_496
    resident = plan["persistent"]["params"]["device"] + plan["persistent"]["opt_state"]["device"]
    assert abs(resident - 3 * 4 * n / 64) < 0.01 * resident, resident / GiB
    assert "not here" in " ".join(plan["notes"])  # planned from the config's architecture, no weights read


@pytest.mark.parametrize("name", ["rs", "online_dpo", "spin", "cai_sl", "cai_rlaif", "opd"])
def test_an_algorithm_the_plan_does_not_cover_is_one_message_naming_it(name):
    arch = ["model.vocab_size=384", "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4",
            "model.kv_heads=2", "model.tokenizer=byte"]
    cfg = load_config(ROOT / f"configs/{name}_tiny.yaml", arch)
    with pytest.raises(ConfigError, match=rf"{name}_tiny.yaml: algorithm.name={name}: .*jalign plan cannot size"):
        plan_config(cfg, knobs=False)


@pytest.mark.parametrize("config,extra", [
    ("kto_tiny", ["algorithm.reference=precomputed"]),
    ("steerlm_tiny", []),
    ("dpo_tiny", ["model.lora.rank=4", "algorithm.reference=precomputed"]),
    ("dpo_tiny", ["algorithm.loss=simpo"]),
    ("sft_tiny", ["model.lora.rank=4"]),
    ("grpo_tiny", []),
    ("ppo_tiny", []),
])
def test_algorithms_of_main_give_their_programs(config, extra):
    arch = ["model.vocab_size=384", "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4",
            "model.kv_heads=2", "model.tokenizer=byte", "eval.prompts=0", "data.seq_len=16"]
    plan = plan_config(load_config(ROOT / f"configs/{config}.yaml", arch + extra), knobs=False)
    names = [p.name for p in plan.programs]
    if config in ("grpo_tiny", "ppo_tiny"):  # rollout, then scoring with the frozen roles, then the update
        assert names[:3] == ["rollout", "score", "update"], names
        assert "role:reference" in plan.persistent and ("role:reward" in plan.persistent) == (config == "ppo_tiny")
        return
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
