"""The algorithm seam: an algorithm outside the package runs through `jalign train`, and resume ==
uninterrupted (bitwise on CPU) for DPO (live and precomputed reference), PPO and GRPO."""
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import cli
from jalign.checkpoint import load_params
from jalign.config import ConfigError, load_config
from jalign.metrics import read_metrics
from jalign.throughput import WALL_CLOCK_METRICS
from jalign.trainer import train

ROOT = Path(__file__).parent.parent
TINY_MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4",
              "model.kv_heads=2", "model.init_from=null"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1"]


def test_an_algorithm_outside_the_package_runs_by_import_path(tmp_path, capsys):
    cfg = tmp_path / "ext.yaml"
    cfg.write_text("algorithm:\n  name: ext_algorithm:ChosenNLL\n  weight: 2.0\n"
                   "data:\n  train: builtin:addition_pairs:train:8\n  eval: builtin:addition_pairs:eval:8\n"
                   "  seq_len: 16\n")
    out = tmp_path / "run"
    rc = cli.main(["train", str(cfg), *TINY_MODEL, *QUIET, f"train.out_dir={out}", "train.steps=8",
                   "train.global_batch=8", "train.eval_every=8", "optim.lr=1e-2", "optim.warmup_steps=0",
                   "eval.prompts=4", "eval.max_new_tokens=3"])
    assert rc == 0, capsys.readouterr().err
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5  # 2 x the NLL of the chosen answers falls
    evals = [r for r in read_metrics(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 8] and "eval/exact_match" in evals[-1]  # the loop's shared evals
    saved = load_config(out / "config.yaml")
    assert saved.algorithm.name == "ext_algorithm:ChosenNLL" and saved.algorithm.weight == 2.0
    # its own keys are typed and checked like a built-in's
    cfg.write_text("algorithm:\n  name: ext_algorithm:ChosenNLL\n  wieght: 2.0\n")
    with pytest.raises(ConfigError, match=r"ext.yaml:3: algorithm.wieght: unknown key; did you mean 'algorithm.weight'"):
        load_config(cfg)
    cfg.write_text("algorithm:\n  name: ext_algorithm:NoSuchClass\n")
    with pytest.raises(ConfigError, match=r"ext.yaml:2: algorithm.name: module 'ext_algorithm' has no attribute"):
        load_config(cfg)
    cfg.write_text("algorithm:\n  name: no_such_module:X\n")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_module'"):
        load_config(cfg)


def _resume_pair(tmp_path, config, extra, steps=4, at=2):
    """(straight run dir, run stopped at `at` then resumed): same config, same seed."""
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    common = [*TINY_MODEL, *QUIET, f"train.steps={steps}", f"train.checkpoint_every={at}", *extra]
    train(load_config(ROOT / config, [*common, f"train.out_dir={straight}"]))
    first = train(load_config(ROOT / config, [*common, f"train.out_dir={sliced}", f"train.stop_after_steps={at}"]))
    assert first["step"] == at
    assert train(load_config(ROOT / config, [*common, f"train.out_dir={sliced}"]))["step"] == steps
    return straight, sliced


def _train_rows(run):
    """Per step, every scalar training metric except wall-clock ones."""
    rows = {}
    for r in read_metrics(run):
        if "loss" in r or "actor_loss" in r:
            rows[r["step"]] = {k: v for k, v in r.items() if not k.startswith("time") and k not in WALL_CLOCK_METRICS
                               and isinstance(v, float)}
    return rows


def _assert_bitwise(straight, sliced, steps):
    a, b = _train_rows(straight), _train_rows(sliced)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert a[s] == b[s], (s, {k: (a[s][k], b[s].get(k)) for k in a[s] if a[s][k] != b[s].get(k)})
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_params(straight)),
                 jax.device_get(load_params(sliced)))


PAIRS = ["data.train=builtin:addition_pairs:train:8", "data.eval=null", "data.seq_len=16", "train.global_batch=8",
         "train.eval_every=0", "optim.lr=1e-2", "optim.warmup_steps=0", "algorithm.sft_weight=0.5"]


@pytest.mark.parametrize("reference", ["live", "precomputed"])
def test_dpo_resume_equals_uninterrupted(tmp_path, reference):
    straight, sliced = _resume_pair(tmp_path, "configs/dpo_tiny.yaml", [*PAIRS, f"algorithm.reference={reference}"])
    _assert_bitwise(straight, sliced, 4)


RL = ["data.train=builtin:addition_prompts:train", "data.eval=null", "train.global_batch=4",
      "algorithm.max_new_tokens=4", "algorithm.minibatch_size=8", "optim.lr=1e-2", "optim.warmup_steps=0",
      "algorithm.reward_fn=exact_match", "roles.reward=null"]


@pytest.mark.parametrize("config,extra", [
    ("configs/ppo_tiny.yaml", ["algorithm.num_rollouts_per_prompt=2", "algorithm.kl_target=1.0"]),  # adaptive KL
    ("configs/grpo_tiny.yaml", ["algorithm.num_rollouts_per_prompt=4", "algorithm.minibatch_size=8"]),
])
def test_rl_resume_equals_uninterrupted(tmp_path, config, extra):
    straight, sliced = _resume_pair(tmp_path, config, [*RL, *extra])
    _assert_bitwise(straight, sliced, 4)
