"""``jalign pipeline --fast``: SFT -> RM -> PPO, DPO, GRPO end to end, then the before/after table."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_pipeline_fast_runs_end_to_end(tmp_path):
    env = dict(os.environ)
    # one CPU device (the test session simulates 8) and cheap compiles: this is a smoke run
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "pipe"
    proc = subprocess.run([sys.executable, "-m", "jalign", "pipeline", "--fast", "--out", str(out)], env=env,
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for row in ("| SFT |", "| PPO (RM reward) |", "| DPO |", "| GRPO (rule reward) |"):
        assert row in table, table
    assert (out / "curves.png").stat().st_size > 10_000
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (out / stage / "metrics.jsonl").is_file(), stage


def test_pipeline_without_configs_names_the_fix(tmp_path):
    from jalign.config import ConfigError
    from jalign.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=r"no sft_tiny.yaml here; pass --configs DIR"):
        run_pipeline(tmp_path / "out", fast=True, config_dir=tmp_path / "nowhere", log=lambda *_: None)
    assert not (tmp_path / "out" / "sft").exists()
