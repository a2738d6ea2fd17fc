"""The loop end to end on the tiny task: resume == uninterrupted, SIGTERM leaves a loadable checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign.config import load_config
from jalign.metrics import read_metrics
from jalign.trainer import TrainingDiverged, train
from conftest import PATIENT_COLLECTIVES

ROOT = Path(__file__).parent.parent
TINY = [
    "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
    "data.seq_len=32", "train.global_batch=16", "train.micro_batch=8", "train.log_every=1",
    "train.eval_every=0", "train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false",
    "mesh.data=4", "mesh.fsdp=2", "eval.prompts=0",
]


def cfg_for(out_dir, *extra):
    return load_config(ROOT / "configs/sft_tiny.yaml", TINY + [f"train.out_dir={out_dir}", *extra])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def final_params(run_dir):
    from jalign.checkpoint import load_params

    return jax.device_get(load_params(run_dir))


def test_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    train(cfg_for(straight, "train.steps=6", "train.checkpoint_every=3"))
    sliced = tmp_path / "sliced"
    first = train(cfg_for(sliced, "train.steps=6", "train.checkpoint_every=3", "train.stop_after_steps=3"))
    assert first["step"] == 3
    second = train(cfg_for(sliced, "train.steps=6", "train.checkpoint_every=3"))
    assert second["step"] == 6
    a, b = losses(straight), losses(sliced)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bitwise on CPU
    assert a[6] < a[1]
    jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(sliced))
    assert (sliced / "config.yaml").exists()
    # `jalign generate --model RUN_DIR` samples from the run's own trained weights
    from jalign.generate import _load_model

    params, cfg, _, template = _load_model(str(sliced), seed=0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), final_params(sliced))
    assert cfg.layers == 1 and template == "tiny"


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    train(cfg_for(run, "train.steps=2", "train.checkpoint_every=2"))
    good = final_params(run)
    # An absurd learning rate makes the loss non-finite after resuming; updates are skipped.
    with pytest.raises(TrainingDiverged, match=r"2 non-finite steps in a row \(train.max_nonfinite=2\)"):
        train(cfg_for(run, "train.steps=8", "train.checkpoint_every=1", "train.max_nonfinite=2",
                      "optim.lr=1e30", "optim.warmup_steps=0", "optim.schedule=constant"))
    rows = read_metrics(run)
    assert any(r.get("skipped") == 1 for r in rows)
    from jalign.checkpoint import Checkpointer

    c = Checkpointer(run / "checkpoints", async_save=False)
    assert c.latest_step() >= 2
    c.close()
    # every update of the streak was skipped, so the newest checkpoint still holds the good params
    jax.tree.map(np.testing.assert_array_equal, final_params(run), good)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "term"
    args = [sys.executable, "-m", "jalign", "train", str(ROOT / "configs/sft_tiny.yaml"), *TINY,
            f"train.out_dir={run}", "train.steps=100000", "train.checkpoint_every=1000000"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + PATIENT_COLLECTIVES,
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read().decode())
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out
    assert "checkpoint at step" in out
    from jalign.checkpoint import Checkpointer

    c = Checkpointer(run / "checkpoints", async_save=False)
    stopped = c.latest_step()
    c.close()
    assert stopped >= 3
    resumed = train(cfg_for(run, f"train.steps={stopped + 2}"))
    assert resumed["step"] == stopped + 2
