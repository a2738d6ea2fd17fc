"""bf16 compute learns like f32: the tiny SFT (``configs/sft_tiny.yaml``, shrunk to 2 layers x 64 and 60 steps for
CI; f32 master params and optimizer state) run with ``model.dtype: bfloat16`` reaches the f32 run's training
loss within a stated tolerance.

The forward and backward run in bf16 (matmul inputs rounded to 8 bits of mantissa, accumulation in f32 by
XLA); the loss, its reductions, the gradients' update and the params stay f32. Tolerance: the mean training
loss over the last logged rows may differ by at most 3% of the f32 run's (bf16's relative rounding is 2^-8 =
0.4% per product; over 60 steps the two trajectories drift apart by far less than the loss moves), and both
runs must have learnt (their loss well below the start).
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
REL_TOL = 0.03


def _losses(out: Path, dtype: str) -> list:
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", [
        f"train.out_dir={out}", f"train.steps={STEPS}", "train.log_every=10", f"train.checkpoint_every={STEPS}",
        "data.eval=null", f"model.dtype={dtype}", "train.progress=false", "train.tensorboard=false", *SMALL])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_bf16_sft_reaches_the_f32_loss(tmp_path):
    f32 = _losses(tmp_path / "f32", "float32")
    bf16 = _losses(tmp_path / "bf16", "bfloat16")
    assert len(f32) == len(bf16) == STEPS // 10
    end32, end16 = np.mean(f32[-3:]), np.mean(bf16[-3:])
    assert end32 < 0.6 * f32[0] and end16 < 0.6 * bf16[0], (f32, bf16)  # both learnt
    assert abs(end16 - end32) <= REL_TOL * end32, (end32, end16, f32, bf16)
    assert bf16 != f32  # the dtype took effect (bf16 rounding changes every step's loss)
