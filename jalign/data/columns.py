"""Columns computed once per example by a frozen role and joined into the data ("precomputed columns").

DPO's reference log-probs, KTO's reference terms and a distillation teacher's top-k log-probs share this:

    cols = PrecomputedColumns(run_dir / "reference_logps", {"ref_logps": ((2,), "float32")}, fingerprint)
    if not cols.ready():
        cols.compute({"train": (n_train, batches_in_order), "eval": (...)}, fn)   # fn(batch) -> ({col: [B,..]}, index, valid)
    batch = cols.join(batch, "train")                                           # adds batch["ref_logps"] by batch["index"]

Stored with tensorstore (zarr), one array ``[N, *shape]`` per split and column under the directory, keyed by
the example's index in its tokenized split; ``done.json`` holds the fingerprint of what the values depend on
(data, model source, seq_len), so a rerun over the same data reuses them and a change recomputes. Process 0
writes; every process reads the rows of its own batches. No JAX here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np


CHUNK_BYTES = 4 << 20


def chunk_rows(n: int, shape, dtype: str) -> int:
    """Rows per stored chunk: up to 65536, fewer for wide rows (a teacher's [T, k] top-k) so that a chunk stays
    near ``CHUNK_BYTES``: batches are written one by one, and each write rewrites the chunks it touches."""
    row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, min(n, 1 << 16, CHUNK_BYTES // max(row_bytes, 1)))


class PrecomputedColumns:
    def __init__(self, directory: str | Path, columns: dict, fingerprint: dict):
        self.directory = Path(directory).absolute()
        self.columns = {name: (tuple(shape), str(dtype)) for name, (shape, dtype) in columns.items()}
        self.fingerprint = fingerprint
        self._stores: dict = {}

    def _spec(self, split: str, name: str) -> dict:
        return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.directory / split / name)}}

    def ready(self) -> bool:
        """True (and opened for reading) if the stored values were computed for this fingerprint."""
        done = self.directory / "done.json"
        if not done.is_file() or json.loads(done.read_text()) != json.loads(json.dumps(self.fingerprint)):
            return False
        import tensorstore as ts

        splits = [p.name for p in self.directory.iterdir() if p.is_dir()]
        self._stores = {(s, n): ts.open(self._spec(s, n), open=True).result() for s in splits for n in self.columns
                        if (self.directory / s / n).is_dir()}
        return True

    def compute(self, splits: dict, fn: Callable, *, writer: bool = True, sync: Callable = lambda name: None) -> None:
        """``splits``: {split: (number of examples, iterable of batches in order)}; ``fn(batch) -> (values
        {column: [B, ...]}, index [B], valid [B])`` (numpy). Writes every valid row once."""
        import tensorstore as ts

        done = self.directory / "done.json"
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            done.unlink(missing_ok=True)
            for split, (n, _) in splits.items():
                for name, (shape, dtype) in self.columns.items():
                    self._stores[(split, name)] = ts.open(
                        self._spec(split, name), create=True, delete_existing=True, dtype=getattr(ts, dtype),
                        shape=[n, *shape], chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_rows(n, shape, dtype), *shape])
                    ).result()
        sync("jalign_columns_open")
        if not writer:
            self._stores = {(s, name): ts.open(self._spec(s, name), open=True).result()
                            for s in splits for name in self.columns}
        for split, (_, batches) in splits.items():
            for batch in batches:
                values, index, valid = fn(batch)
                keep = np.asarray(valid) > 0
                if writer and keep.any():
                    rows = np.asarray(index)[keep]
                    for name in self.columns:
                        self._stores[(split, name)].oindex[rows].write(np.asarray(values[name])[keep]).result()
        if writer:
            done.write_text(json.dumps(self.fingerprint))
        sync("jalign_columns_done")

    def sizes(self) -> dict:
        return {s: st.shape[0] for (s, name), st in self._stores.items() if name == next(iter(self.columns))}

    def join(self, batch: dict, split: str) -> dict:
        """``batch`` plus each column read at ``batch["index"]`` (rows of padding read row 0, masked later)."""
        index = np.asarray(batch["index"])
        out = dict(batch)
        for name, (_, dtype) in self.columns.items():
            out[name] = self._stores[(split, name)].oindex[index].read().result().astype(dtype)
        return out
