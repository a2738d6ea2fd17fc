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


# ---- packing two-sided rows (preference pairs, KTO's completion + KL row) -------------------------
# A packed pair row holds whole pairs: pair k of the row (0-based) is segments 2k+1 (side 0, chosen) and 2k+2
# (side 1, rejected), each side with its own positions from 0, so the two sides of a pair never see each
# other (attention masks by segment) and a pair is never split between rows. Per-pair fields (``index``,
# ``valid``, ``rewards``, ...) become tables [max_pairs, ...] per row, zero (``valid`` 0) where a row has
# fewer pairs. The losses read per-sequence sums / last-token scores per segment
# (``jalign.models.heads.segment_sums``). One-sided rows (sequence fields [T], e.g. a regression reward model's
# scored rows) pack the same way with one segment per example: example k of a row is segment k+1.
PAIR_SEQ_FIELDS = ("tokens", "targets", "loss_mask")


def num_sides(row: dict) -> int:
    """2 for a two-sided row (sequence fields [2, T]), 1 for a one-sided one ([T])."""
    return 2 if np.ndim(row["segment_ids"]) == 2 else 1


def pair_to_flat(row: dict) -> dict[str, np.ndarray]:
    """A two-sided row (sequence fields [2, T], per-pair fields) as one flat record: each side cut to its
    length, side 0 then side 1, a ``side`` marker per token and the per-pair fields repeated per token (so
    they travel through grain's packer with the tokens). A one-sided row ([T]) is cut to its length, side 0."""
    sides = num_sides(row)
    seq = {k: row[k] if sides == 2 else row[k][None] for k in PAIR_SEQ_FIELDS + ("segment_ids",) if k in row}
    n = [int(np.sum(seq["segment_ids"][s] > 0)) for s in range(sides)]
    flat = {k: np.concatenate([seq[k][s, :n[s]] for s in range(sides)]) for k in PAIR_SEQ_FIELDS if k in row}
    total = sum(n)
    flat["side"] = np.repeat(np.arange(sides, dtype=np.int32), n)
    for k in pair_value_fields(row):
        v = np.asarray(row[k])
        flat["pair." + k] = np.broadcast_to(v, (total,) + v.shape).copy()
    return flat


def pair_value_fields(row: dict) -> list[str]:
    """The per-pair (not per-token) fields of a two-sided row."""
    return [k for k in row if k not in PAIR_SEQ_FIELDS + ("positions", "segment_ids") and not k.startswith("pair.")]


def split_packed_pairs(row: dict, max_pairs: int, value_fields: Sequence[str], sides: int = 2) -> dict[str, np.ndarray]:
    """grain's packed flat records -> a packed pair row: segment ids 2k+1 / 2k+2 (one-sided: k+1), positions
    restarting per side, per-pair tables [max_pairs, ...]."""
    seg, side, pos = row["tokens_segment_ids"], row["side"], row["tokens_positions"]
    out = {k: row[k] for k in PAIR_SEQ_FIELDS if k in row}
    out["segment_ids"] = np.where(seg > 0, sides * (seg - 1) + 1 + side, 0).astype(np.int32)
    side0_len = np.bincount(seg[(seg > 0) & (side == 0)], minlength=max_pairs + 1)
    out["positions"] = (pos - side * side0_len[seg]).astype(np.int32)
    first = {s: int(np.flatnonzero(seg == s)[0]) for s in np.unique(seg[seg > 0])}
    for k in value_fields:
        v = row["pair." + k]
        table = np.zeros((max_pairs,) + v.shape[1:], v.dtype)
        for s, t in first.items():
            table[s - 1] = v[t]
        out[k] = table
    return out


def pack_pairs(ds, seq_len: int, num_bins: int, max_pairs: int, example_row: dict):
    """Pack a grain ``IterDataset`` of two-sided rows (as ``jalign.data.preference.pair_row`` makes them) into
    packed pair rows of ``seq_len`` tokens holding at most ``max_pairs`` whole pairs (first fit over
    ``num_bins`` open rows, deterministic and checkpointable like :func:`pack`). Rows with ``valid`` 0 (filler)
    are left out. ``example_row`` names the fields (one-sided rows [T] pack one segment per example). A pair
    longer than ``seq_len`` is an error naming it."""
    import grain

    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    value_fields = pair_value_fields(example_row)
    sides = num_sides(example_row)

    def flat(row):
        f = pair_to_flat(row)
        if len(f["tokens"]) > seq_len:
            raise ValueError(f"pair (index {int(row.get('index', -1))}) has {len(f['tokens'])} tokens on its two "
                             f"sides together: it does not fit a packed row of {seq_len} (raise the packed length)")
        return f

    flats = ds.filter(lambda r: float(np.asarray(r.get("valid", 1.0))) > 0).map(flat)
    lengths = {k: seq_len for k in PAIR_SEQ_FIELDS + ("side",) if k in example_row or k == "side"}
    lengths.update({"pair." + k: seq_len for k in value_fields})
    packed = grain.experimental.FirstFitPackIterDataset(flats, length_struct=lengths, num_packing_bins=num_bins,
                                                        shuffle_bins=False, max_sequences_per_bin=max_pairs)
    return packed.map(lambda r: split_packed_pairs(r, max_pairs, value_fields, sides))


def padding_fraction(segment_ids: np.ndarray) -> float:
    """Share of positions that are padding (segment id 0)."""
    s = np.asarray(segment_ids)
    return float(np.mean(s == 0)) if s.size else 0.0
