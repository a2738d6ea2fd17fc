"""``jalign pipeline --fast``: SFT -> RM -> PPO, DPO, GRPO end to end, then the before/after table."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jalign.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pipeline_fast_runs_end_to_end(tmp_path):
    env = dict(os.environ)
    # one CPU device (the test session simulates 8) and cheap compiles: this is a smoke run
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "pipe"
    proc = subprocess.run([sys.executable, "-m", "jalign", "pipeline", "--fast", "--seed", "3", "--out", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for row in ("| SFT |", "| PPO (RM reward) |", "| DPO |", "| GRPO (rule reward) |"):
        assert row in table, table
    assert (out / "curves.png").stat().st_size > 10_000
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (out / stage / "metrics.jsonl").is_file(), stage
        resolved = load_config(out / stage / "config.yaml")  # --seed reached every stage
        assert (resolved.train.seed, resolved.data.seed) == (3, 3), stage
    # progress lines between evaluations although train.progress=false, and no carriage returns
    assert "step 20/30  loss" in proc.stdout and "\r" not in proc.stdout + proc.stderr


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


def test_seed_overrides_every_stage_and_extra_overrides_win(tmp_path):
    from jalign.pipeline import CONFIG_FILES, STAGES, default_config_dir, stage_overrides

    for stage in STAGES:
        o = stage_overrides(stage, tmp_path, fast=False, extra={stage: ["data.seed=9"]}, seed=5)
        cfg = load_config(default_config_dir() / CONFIG_FILES[stage], o)
        assert (cfg.train.seed, cfg.data.seed) == (5, 9), stage
    assert not [x for x in stage_overrides("sft", tmp_path, fast=False) if x.split("=")[0].endswith(".seed")]


def _seed_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_seeds", REPO / "benchmarks" / "pipeline_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_table_spreads_and_worst_seed_margins():
    drv = _seed_driver()

    def run(sft, dpo, wall):
        row = lambda em: {"exact_match": em, "sampled_exact_match": em / 2, "reward": 0.1, "greedy_reward": 0.2,  # noqa: E731
                          "kl": 0.0}
        return {"results": {"SFT": row(sft), "DPO": row(dpo), "_reward_source": "reward model"},
                "timings": {"sft": wall, "dpo": 1.0, "final_eval": 2.0, "total": wall + 3.0}, "subprocess_wall": wall + 9}

    by_devices = {1: {0: run(0.5, 0.9, 100.0), 1: run(0.6, 0.7, 110.0)}, 8: {0: run(0.4, 0.8, 120.0)}}
    assert drv.margins(list(by_devices[1].values())) == {"DPO": [pytest.approx(0.4), pytest.approx(0.1)]}
    md = drv.table(by_devices)
    assert "| SFT | 0.550 [0.500, 0.600] | 0.275 [0.250, 0.300] |" in md
    assert "| DPO | +0.100 | +0.250 | 0: +0.400, 1: +0.100 |" in md  # worst seed, mean, per seed
    assert "| DPO | 0.800 | 0.400 |" in md  # one seed: the value alone
    assert "| seed 1 | 110 | 1 | 2 | 113 | 119 |" in md
    assert md.index("### 1 device,") < md.index("### 8 devices,")


def test_a_stage_stopped_early_stops_the_pipeline(tmp_path, monkeypatch):
    """A stage whose run ended before its last step (SIGTERM: checkpoint and return) must not hand a
    half-trained model to the next stages: the pipeline stops with one message and trains nothing more."""
    import jalign.trainer
    from jalign import pipeline

    trained = []

    def fake_train(cfg):
        trained.append(cfg.train.out_dir)
        return {"step": 27}  # of sft_tiny's 400

    monkeypatch.setattr(jalign.trainer, "train", fake_train)
    with pytest.raises(pipeline.PipelineStopped, match=r"stage sft stopped at step 27 of 400 .*run the same command"):
        pipeline.run_pipeline(tmp_path, log=lambda *_: None)
    assert len(trained) == 1 and str(trained[0]).endswith("sft")
