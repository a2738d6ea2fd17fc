"""Weights & Biases logging for a run (``train.wandb: {project, name, mode}``); ``wandb`` is optional.

The metrics writer (:class:`jalign.metrics.MetricsWriter`) hands it every row it writes to metrics.jsonl and
TensorBoard (the same scalar keys, at the same steps) and the sample-completion tables. The W&B run lives in
``RUN_DIR/wandb`` (``mode: offline`` writes only there; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it
later); its id is kept in ``RUN_DIR/wandb/jalign-run-id`` so a resumed run continues the same W&B run. The
resolved config is the W&B run's config.
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path

from jalign.errors import ConfigError

ID_FILE = "jalign-run-id"


class WandbWriter:
    def __init__(self, wcfg, run_dir, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb: logging to Weights & Biases needs the wandb package "
                              "(pip install wandb, or 'jalign[wandb]'); or drop train.wandb") from None
        self.wandb = wandb
        run_dir = Path(run_dir)
        directory = run_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / ID_FILE
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:16])
        self.run = wandb.init(project=wcfg.project, name=wcfg.name or run_dir.name, mode=wcfg.mode,
                              entity=wcfg.entity, tags=list(wcfg.tags) or None, dir=str(run_dir), config=config,
                              id=id_file.read_text().strip(), resume="allow",
                              settings=wandb.Settings(console="off", silent=True))

    def write(self, step: int, row: dict) -> None:
        scalars = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if scalars:
            self.run.log(scalars, step=step)

    def table(self, tag: str, columns: list, rows: list, step: int) -> None:
        self.run.log({tag: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()
