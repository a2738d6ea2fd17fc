"""Tokenized records and fixed-length rows.

A *record* is one tokenized example, already shifted for next-token prediction (variable length L):

    tokens    int32[L]   = ids[:-1]
    targets   int32[L]   = ids[1:]
    loss_mask float32[L] = 1 where the *target* is a response token (incl. the final EOS)

A *row* has length ``seq_len`` and adds ``positions`` (restarting at 0 for each example in the row) and
``segment_ids`` (1, 2, 3, ... per example, 0 = padding), which the model uses so packed examples never
attend to each other. Padding has token 0, target 0 and loss_mask 0.

Records are built eagerly (fine for fine-tuning-sized data, and the counts of truncated / dropped
examples are known before training starts). Packing uses grain's ``FirstFitPackIterDataset``.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

from jalign.data.chat import encode_conversation, encode_pair
from jalign.data.formats import SFTExample

ROW_FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
OVERLONG = ("truncate", "drop")


def sft_ids(example: SFTExample, template, tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, response_mask)`` of one SFT example (prompt/response or a conversation)."""
    if example.messages is not None:
        return encode_conversation(example.messages, template, tokenizer)
    prompt_ids, response_ids = encode_pair(example.prompt, example.response, template, tokenizer)
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def to_record(ids: Sequence[int], response_mask: Sequence[int]) -> dict[str, np.ndarray]:
    """Shift by one: predict ``ids[t+1]`` from ``ids[:t+1]``; loss where that target is response."""
    ids = np.asarray(ids, np.int32)
    return {"tokens": ids[:-1], "targets": ids[1:],
            "loss_mask": np.asarray(response_mask[1:], np.float32)}


def _fit(rec: dict, seq_len: int, overlong: str) -> tuple[Optional[dict], str]:
    """Apply the over-length policy; returns (record or None, "ok" | "truncated" | "dropped")."""
    n = len(rec["tokens"])
    status = "ok"
    if n > seq_len:
        if overlong == "drop":
            return None, "dropped"
        rec = {k: v[:seq_len] for k, v in rec.items()}  # cut the end (keep the prompt)
        status = "truncated"
    if not rec["loss_mask"].any():  # e.g. a prompt longer than seq_len: nothing left to learn from
        return None, "dropped"
    return rec, status


def tokenize_sft(examples: Iterable[SFTExample], tokenizer, template, *, seq_len: int,
                 overlong: str = "truncate") -> tuple[list[dict], dict[str, int]]:
    """Records for SFT, plus counts ``{"examples", "truncated", "dropped"}``.

    An example longer than ``seq_len`` tokens is cut at the end (``"truncate"``) or left out
    (``"drop"``). Examples with no response token left are always dropped (and counted).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    records, counts = [], {"examples": 0, "truncated": 0, "dropped": 0}
    for ex in examples:
        rec, status = _fit(to_record(*sft_ids(ex, template, tokenizer)), seq_len, overlong)
        if status != "ok":
            counts[status] += 1
        if rec is not None:
            records.append(rec)
            counts["examples"] += 1
    return records, counts


def pad_row(rec: dict, seq_len: int) -> dict[str, np.ndarray]:
    """One example per row: pad to ``seq_len``; nested dicts (e.g. chosen/rejected) are padded leafwise."""
    if "tokens" not in rec:
        return {k: pad_row(v, seq_len) for k, v in rec.items()}
    n = len(rec["tokens"])
    if n > seq_len:
        raise ValueError(f"record of length {n} does not fit seq_len={seq_len}; tokenize with that seq_len")
    row = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in ROW_FIELDS}
    for k in ("tokens", "targets", "loss_mask"):
        row[k][:n] = rec[k]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    return row


def empty_like(row: Any) -> Any:
    """An all-padding row (or nested rows) of the same structure: zero tokens and zero loss_mask."""
    if isinstance(row, dict):
        return {k: empty_like(v) for k, v in row.items()}
    return np.zeros_like(row)


def _rename_packed(row: dict) -> dict[str, np.ndarray]:
    # grain names its packing metadata per feature ("tokens_segment_ids", ...); all features share it.
    return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "positions": row["tokens_positions"], "segment_ids": row["tokens_segment_ids"]}


def pack(ds, seq_len: int, num_bins: int):
    """Pack a grain ``IterDataset`` of records into rows of ``seq_len`` (first fit over ``num_bins``).

    Deterministic: records go, in order, to the first of ``num_bins`` open rows with room; when one
    fits nowhere, all open rows are emitted in order (no bin shuffling: the data is already shuffled).
    The iterator state records where the current group of rows started, so it checkpoints exactly.
    """
    import grain

    lengths = {"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False)
    return packed.map(_rename_packed)
