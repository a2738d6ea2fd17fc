"""A generate-then-train run whose filter keeps nothing stops with one message naming the filter's key (exit 2)
instead of running to the end on a zero loss and exiting 0 (what CAI RLAIF did with an undecided judge)."""
from pathlib import Path

import pytest

from jalign import cli
from jalign.metrics import read_metrics

from test_gentrain_runs import COMMON, RULE
from test_seam import TINY_MODEL

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("config,rounds,filter_", [
    ("rs_tiny.yaml", "algorithm.rs_iterations=1", "algorithm.threshold=5.0"),  # char_score is in [0, 1)
    ("online_dpo_tiny.yaml", "algorithm.iterations=1", "algorithm.min_margin=5.0"),  # no two differ by 5
])
def test_a_run_that_trains_on_nothing_stops_naming_the_filter(tmp_path, capsys, config, rounds, filter_):
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / config), *COMMON, *TINY_MODEL, RULE, "roles.reward=null",
            "train.steps=2", "algorithm.num_rollouts_per_prompt=2", "algorithm.truncated_response=keep", rounds, filter_,
            f"train.out_dir={out}", "--no-compile-cache"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on nothing" in err[0] and filter_ in err[0], err
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]  # the first step's record is kept
