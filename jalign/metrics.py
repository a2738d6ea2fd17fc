"""Host-side metrics: JSONL file, TensorBoard, and a progress bar; written by process 0 only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np


def to_host(metrics: dict) -> dict:
    """jax arrays -> Python floats (size 1) or lists. Call on every process with the same keys.

    Replicated arrays are read from a local shard; an array sharded over several processes is
    gathered (``process_allgather``, a collective, hence "on every process").
    """
    out = {}
    for k, v in metrics.items():
        if isinstance(v, jax.Array):
            if v.is_fully_addressable:
                v = np.asarray(v)
            elif v.is_fully_replicated:
                v = np.asarray(v.addressable_data(0))
            else:
                from jax.experimental import multihost_utils

                v = np.asarray(multihost_utils.process_allgather(v, tiled=True))
        out[k] = float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) == 0 or np.size(v) == 1 else np.asarray(v).tolist()
    return out


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int, tensorboard: bool = True, progress: bool = True,
                 start_step: int = 0, wandb=None, config: dict | None = None):
        self.is_main = jax.process_index() == 0
        self.total = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        # further writers of every row (W&B: jalign.wandb_writer), each with write(step, row), table(...), close()
        self.extra_writers: list = []
        self.jsonl = None
        self.tb = None
        self.bar = None
        self._shown: dict = {}
        if not self.is_main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if wandb is not None:  # train.wandb
            from jalign.wandb_writer import WandbWriter

            self.extra_writers.append(WandbWriter(wandb, run_dir, config or {}))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # optional
                self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.is_main:
            return
        row = {f"{prefix}{k}": v for k, v in metrics.items()}
        row["step"] = step
        row["time"] = round(time.time() - self.start_time, 3)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        for w in self.extra_writers:
            w.write(step, row)

    def table(self, tag: str, rows: list[dict], step: int) -> None:
        """Rows of a table (e.g. sample completions) to TensorBoard (markdown text) and the extra writers."""
        if not self.is_main or not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_cell(r.get(c)) for c in columns] for r in rows]
        if self.tb is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"
                      for row in cells]
            self.tb.add_text(tag, "\n".join(lines), step)
        for w in self.extra_writers:
            w.table(tag, columns, cells, step)

    def show(self, metrics: dict) -> None:
        """Figures beyond the default ones on the progress bar: tokens/s of loss tokens, MFU, epoch."""
        if self.bar is None:
            return
        for key, label, fmt in SHOWN_EXTRA:
            if isinstance(metrics.get(key), (int, float)):
                self._shown[label] = fmt(metrics[key])

    def progress(self, step: int, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        for key in ("loss", "accuracy", "reward_mean", "kl", "lr", "tokens_per_s"):
            if key in metrics:  # keep the last value of metrics that are only computed at log steps
                v = metrics[key]
                self._shown[key] = f"{v:.3g}" if isinstance(v, float) else v
        self.bar.set_postfix(self._shown, refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for w in self.extra_writers:
            w.close()
        self.extra_writers = []
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


SHOWN_EXTRA = (("loss_tokens_per_s", "loss_tokens/s", lambda v: f"{v:.3g}"), ("mfu", "mfu", lambda v: f"{100 * v:.1f}%"),
               ("epoch", "epoch", lambda v: f"{v:.2f}"))


def _cell(v):
    return round(v, 4) if isinstance(v, float) else ("" if v is None else v)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
