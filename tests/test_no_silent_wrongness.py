"""Issue-12 cases that live in the loop and the algorithms: a run started from weights of another shape, a
vocabulary smaller than the tokenizer, a run that ends in a non-finite streak, a failed start that must not
overwrite a run's config, a full disk under `jalign train`, RL exports with the tokenizer, the truncation-penalty
warning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import cli
from jalign.checkpoint import Checkpointer, load_params
from jalign.config import ConfigError, load_config
from jalign.metrics import read_metrics
from jalign.trainer import TrainingDiverged, train

ROOT = Path(__file__).parent.parent
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1",
         "train.eval_every=0", "eval.prompts=0"]
WIDE = ["model.hidden=64", "model.mlp=96", "model.layers=1", "model.heads=4", "model.kv_heads=2"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An SFT run on a model whose shapes differ from every default (hidden 64, 1 layer)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*WIDE, *QUIET, f"train.out_dir={out}", "train.steps=2",
                                                        "train.global_batch=8", "data.seq_len=32"]))
    return out


def test_init_from_a_run_of_another_shape_takes_its_architecture_and_weights(sft_run, tmp_path):
    """Wave 1 re-initialised every tensor at random here (exit 0); now the architecture comes from the run and
    the weights are the run's, bit for bit."""
    out = tmp_path / "dpo"
    cfg = load_config(ROOT / "configs/dpo_tiny.yaml", [*QUIET, f"model.init_from={sft_run}", f"train.out_dir={out}",
                                                       "train.steps=1", "optim.lr=1e-30", "optim.warmup_steps=0",
                                                       "data.train=builtin:addition_pairs:train:8", "data.eval=null"])
    assert cfg.model.hidden == 128  # the defaults, before the source is read
    train(cfg)
    saved = load_config(out / "config.yaml").model
    assert (saved.hidden, saved.mlp, saved.layers) == (64, 96, 1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), jax.device_get(load_params(out)),
                 jax.device_get(load_params(sft_run)))


def test_init_from_with_a_contradicting_model_section_is_one_error(sft_run, tmp_path, capsys):
    rc = cli.main(["train", str(ROOT / "configs/dpo_tiny.yaml"), *QUIET, f"model.init_from={sft_run}",
                   "model.hidden=128", f"train.out_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "model.hidden=128 but the source has 64" in err and "Leave the architecture keys out" in err


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, capsys):
    rc = cli.main(["train", str(ROOT / "configs/sft_tiny.yaml"), *QUIET, "model.vocab_size=100",
                   f"train.out_dir={tmp_path / 'v'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.vocab_size: 100 is smaller than the tokenizer's id range (272 ids" in err
    assert not (tmp_path / "v" / "config.yaml").exists()  # nothing started, nothing written


def test_a_failed_start_leaves_the_run_directory_as_it_was(sft_run, capsys):
    before = (sft_run / "config.yaml").read_bytes()
    rc = cli.main(["train", str(ROOT / "configs/sft_tiny.yaml"), *WIDE, *QUIET, f"train.out_dir={sft_run}",
                   "data.train=/nonexistent/typo.jsonl", "train.steps=4"])
    assert rc == 2 and "typo.jsonl" in capsys.readouterr().err
    assert (sft_run / "config.yaml").read_bytes() == before
    # and a resume whose model changed is one message naming the key, before anything is restored
    rc = cli.main(["train", str(ROOT / "configs/sft_tiny.yaml"), *WIDE, *QUIET, "model.hidden=32",
                   f"train.out_dir={sft_run}", "train.steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.hidden" in err and "Traceback" not in err
    assert (sft_run / "config.yaml").read_bytes() == before


def test_a_run_that_ends_in_a_non_finite_streak_says_so(tmp_path):
    run = tmp_path / "nan"
    common = [*WIDE, *QUIET, f"train.out_dir={run}", "train.global_batch=8", "data.seq_len=32"]
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*common, "train.steps=2", "train.checkpoint_every=2"]))
    good = jax.device_get(load_params(run))
    with pytest.raises(TrainingDiverged, match=r"the run ended in 3 non-finite step\(s\).*last good checkpoint"):
        train(load_config(ROOT / "configs/sft_tiny.yaml", [*common, "train.steps=5", "train.max_nonfinite=10",
                                                           "optim.lr=1e30", "optim.warmup_steps=0",
                                                           "optim.schedule=constant"]))
    c = Checkpointer(run / "checkpoints", async_save=False)
    assert c.latest_step() == 2
    c.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_params(run)), good)


def test_full_disk_under_jalign_train_is_one_message_and_the_last_checkpoint_loads(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        run = mnt / "run"
        args = [sys.executable, "-m", "jalign", "train", str(ROOT / "configs/sft_tiny.yaml"), *QUIET, *WIDE,
                f"train.out_dir={run}", "train.steps=40", "train.checkpoint_every=1", "train.keep_checkpoints=100",
                "train.global_batch=8", "data.seq_len=32", "train.async_checkpointing=true"]
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                   JALIGN_COMPILATION_CACHE="off", PYTHONPATH=str(ROOT))
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 1, p.stderr[-2000:]
        errors = [line for line in p.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "out of space at" in errors[0] and "the last good checkpoint is step" in errors[0]
        last = int(errors[0].rsplit("step", 1)[1].strip().rstrip("."))
        good = load_params(run, step=last)  # still loadable
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(good)))
        steps = {r["step"] for r in read_metrics(run) if "loss" in r}
        assert max(steps) <= last + 2  # it stopped right after the failed save, not many steps later
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_truncation_penalty_above_the_reward_range_is_warned_once():
    from jalign.algorithms.grpo import GRPO

    messages = []
    algo = GRPO.__new__(GRPO)  # only the check itself: its rule against a crafted first rollout
    algo.a = load_config(None, ["algorithm.name=grpo", "algorithm.reward_fn=exact_match",
                                "algorithm.truncation_penalty=-1.0"]).algorithm
    algo.rt = type("RT", (), {"log": staticmethod(messages.append)})()
    algo._check_truncation_penalty({"reward_ended_min": np.float32(-2.8)})
    assert len(messages) == 1 and "truncation_penalty=-1.0 is above the lowest" in messages[0]
    messages.clear()
    algo._check_truncation_penalty({"reward_ended_min": np.float32(0.0)})
    assert messages == []
