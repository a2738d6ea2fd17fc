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


def test_plot_runs_draws_each_run_in_its_panels_except_skipped(tmp_path, monkeypatch):
    import json
    import math

    import matplotlib.axes

    from jalign.plot import plot_runs, read_series

    for name, n in (("long", 5), ("short", 3)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": 1.0 / (s + 1), "eval/x": float(s), "skipped": True} for s in range(n)]
        rows.append({"step": n, "loss": math.nan})  # non-finite values are dropped, not plotted
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_series(tmp_path / "long")["loss"] == ([0, 1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert "skipped" not in read_series(tmp_path / "long")  # booleans are not curves
    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, xs, ys, **kw: drawn.append((kw["label"], list(xs))) or real_plot(self, xs, ys, **kw))
    png = plot_runs({"long": tmp_path / "long", "short": tmp_path / "short"}, tmp_path / "c.png",
                    keys=["loss", "eval/x"], skip={"long": ["eval/x"]})
    assert drawn == [("long", [0, 1, 2, 3, 4]), ("short", [0, 1, 2]), ("short", [0, 1, 2])]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
