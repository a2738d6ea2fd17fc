"""SFT data for knowledge distillation, with a teacher's per-token top-k joined in by example and position.

Rows are SFT rows (``jalign.data.pipeline``; packing included) plus ``example_index`` [B, T], the index of the
example each token comes from. Records carry that index as ``index`` (their position in the split), which
``jalign.data.mixture.concatenate`` renumbers across the sources of a training mixture and across named eval
sets, so it is unique in its split. A teacher's top-k ids and log-probs are computed once per example over one
unpacked pass (``ordered(split)``) and stored as ``[N, L, k]`` precomputed columns (``jalign.data.columns``,
``L`` the longest example); :func:`join_token_columns` then reads, for every token of a (packed or padded) row,
the stored values at (``example_index``, ``positions``): positions restart at 0 for each example of a packed
row and records are cut only at their end, so a token's position is its offset in its example. Padding tokens
read example 0 at position 0 and are masked by ``loss_mask``. No JAX here.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from jalign.data import fields
from jalign.data.packing import ROW_FIELDS, pad_row
from jalign.data.pipeline import TRAIN_PREFETCH, SFTData, batch_stream, epoch_stream, read_options
from jalign.data.preference import ordered_batches

INDEX = "example_index"


def with_index(records: Sequence[dict]) -> list[dict]:
    """SFT records plus ``index``, the record's position in its list."""
    return [{**r, "index": i} for i, r in enumerate(records)]


def token_index(rec: dict) -> dict:
    """The fields packing carries: the SFT ones and ``example_index`` (the record's ``index`` on every token)."""
    out = {k: rec[k] for k in ("tokens", "targets", "loss_mask")}
    out[INDEX] = np.full(len(rec["tokens"]), rec["index"], np.int32)
    return out


def indexed_row(rec: dict, seq_len: int) -> dict:
    """One example per row, padded (``jalign.data.packing.pad_row``) with its ``example_index`` row; plus the
    per-row ``index`` and ``valid`` the precompute pass stores by."""
    row = pad_row(rec, seq_len)
    row[INDEX] = np.zeros(seq_len, np.int32)
    row[INDEX][:len(rec["tokens"])] = rec["index"]
    row["index"], row["valid"] = np.int32(rec["index"]), np.float32(1.0)
    return row


def pack_indexed(ds, seq_len: int, num_bins: int):
    """``jalign.data.packing.pack`` carrying ``example_index`` along (grain first fit, no bin shuffling)."""
    import grain

    lengths = {k: seq_len for k in ("tokens", "targets", "loss_mask", INDEX)}
    packed = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=num_bins,
                                                        shuffle_bins=False)
    return packed.map(lambda r: {"tokens": r["tokens"], "targets": r["targets"], "loss_mask": r["loss_mask"],
                                 "positions": r["tokens_positions"], "segment_ids": r["tokens_segment_ids"],
                                 INDEX: r[INDEX]})


def join_token_columns(columns, batch: dict, split: str) -> dict:
    """``batch`` with each per-token column read at (``example_index``, ``positions``) of every token: [B, T, ...]
    from stored [N, L, ...]; ``example_index`` is consumed (the devices do not need it)."""
    out = {k: v for k, v in batch.items() if k != INDEX}
    idx, pos = np.asarray(batch[INDEX]), np.asarray(batch["positions"])
    rows, inverse = np.unique(idx, return_inverse=True)
    stored = columns.join({"index": rows}, split)
    for name in columns.columns:
        values = stored[name]  # [U, L, ...]
        out[name] = values[inverse.reshape(idx.shape), np.minimum(pos, values.shape[1] - 1)]
    return out


def records_fingerprint(records: Sequence[dict]) -> str:
    h = hashlib.sha1()
    for r in records:
        for k in ("tokens", "targets", "loss_mask"):
            h.update(np.ascontiguousarray(r[k]).tobytes())
    return h.hexdigest()


class DistillData(SFTData):
    """SFT data from ``cfg.data`` whose rows carry ``example_index`` (see the module docstring). Eval batches
    are unpacked (one example per row) in order, the same on every process."""

    kind = "sft"

    def _tokenize(self, spec, examples):
        return with_index(super()._tokenize(spec, examples))

    @property
    def fields(self) -> dict:
        return fields.SFT_FIELDS

    @property
    def longest(self) -> int:
        """The longest example (tokens) of either split: the stored width of per-token columns."""
        return max(len(r["tokens"]) for r in [*self.train_records, *self.eval_records])

    def train_iterator(self):
        d = self.cfg.data
        ds = epoch_stream(self.train_records, shuffle=d.shuffle, seed=d.seed, process_index=self.process_index,
                          process_count=self.process_count, repeat=True)
        if d.packing:
            rows = pack_indexed(ds.map(token_index).to_iter_dataset(read_options()), d.seq_len, self.rows)
        else:
            keep = set(ROW_FIELDS) | {INDEX}
            rows = ds.map(lambda r: {k: v for k, v in indexed_row(r, d.seq_len).items() if k in keep}
                          ).to_iter_dataset(read_options())
        return batch_stream(rows, self.rows, TRAIN_PREFETCH)

    def ordered(self, split: str):
        """One unpacked pass in order with per-row ``index`` / ``valid`` (eval, and the teacher's precompute)."""
        records = self.train_records if split == "train" else self.eval_records
        return ordered_batches(records, lambda r: indexed_row(r, self.cfg.data.seq_len),
                               batch_rows_per_process=self.rows, process_index=self.process_index,
                               process_count=self.process_count)

    def eval_iterator(self):
        """The selected eval set (``select_eval``), unpacked, in order; its ``index`` values are those of the
        whole eval split, which the stored columns are keyed by."""
        key = self._selected_eval
        if key not in self._eval_batches:
            batches = ordered_batches(self.selected_eval_records(), lambda r: indexed_row(r, self.cfg.data.seq_len),
                                      batch_rows_per_process=self.rows, process_index=self.process_index,
                                      process_count=self.process_count)
            self._eval_batches[key] = [{k: v for k, v in b.items() if k not in ("index", "valid")} for b in batches]
        return iter(self._eval_batches[key])

