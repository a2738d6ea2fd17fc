"""bf16 compute and fp8 matmuls learn like f32: the tiny SFT (``configs/sft_tiny.yaml``, shrunk to 2 layers x 64 and 60 steps for
CI; f32 master params and optimizer state) run with ``model.dtype: bfloat16`` reaches the f32 run's training
loss within a stated tolerance.

The forward and backward run in bf16 (matmul inputs rounded to 8 bits of mantissa, accumulation in f32 by
XLA); the loss, its reductions, the gradients' update and the params stay f32. Tolerance: the mean training
loss over the last logged rows may differ by at most 3% of the f32 run's (bf16's relative rounding is 2^-8 =
0.4% per product; over 60 steps the two trajectories drift apart by far less than the loss moves), and both
runs must have learnt (their loss well below the start).

fp8 (``model.matmul_fp8``, ``jalign.models.fp8``): the same check with 5%: e4m3 rounds each matmul input by up
to 2^-4 relative and e5m2 the gradients by 2^-3; the errors are unbiased and average out over the contraction.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from jalign.config import load_config
from jalign.trainer import train

ROOT = Path(__file__).parent.parent
STEPS = 60
SMALL = ["model.layers=2", "model.hidden=64", "model.mlp=192", "data.seq_len=32", "train.global_batch=16"]


def _losses(out: Path, extra: list) -> list:
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [
        f"train.out_dir={out}", f"train.steps={STEPS}", "train.log_every=10", f"train.checkpoint_every={STEPS}",
        "data.eval=null", "train.progress=false", "train.tensorboard=false", *SMALL, *extra])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def f32_losses(tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("f32"), ["model.dtype=float32"])


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,tol", [("bf16", ["model.dtype=bfloat16"], 0.03),
                                            ("fp8", ["model.dtype=float32", "model.matmul_fp8=true"], 0.05)])
def test_low_precision_sft_reaches_the_f32_loss(tmp_path, f32_losses, name, extra, tol):
    f32, low = f32_losses, _losses(tmp_path / name, extra)
    assert len(f32) == len(low) == STEPS // 10
    end32, end_low = np.mean(f32[-3:]), np.mean(low[-3:])
    assert end32 < 0.6 * f32[0] and end_low < 0.6 * low[0], (f32, low)  # both learnt
    assert abs(end_low - end32) <= tol * end32, (end32, end_low, f32, low)
    assert low != f32  # the setting took effect (its rounding changes every step's loss)
