"""Batch fields declared like parameters: each data kind names its fields with logical axes, and batch
shardings derive from that (never from an array's rank).

Axes use the logical names of ``sharding.rules`` (``batch`` -> the data-parallel mesh axes, ``seq`` ->
"sequence"); ``None`` is an unsharded axis (e.g. the 2 of a chosen/rejected pair, or attributes).
"""
from __future__ import annotations

ROW = ("batch", "seq")  # [B, T]
PER_ROW = ("batch",)  # [B]

SFT_FIELDS = {k: ROW for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}


def pair_fields(mode: str) -> dict:
    """Flat pairwise batches (``jalign.data.preference``): ``chosen_*`` / ``rejected_*`` rows, per-pair scalars."""
    seq = ("tokens", "positions", "segment_ids", "loss_mask") + (("targets",) if mode == "lm" else ())
    fields = {f"{side}_{k}": ROW for side in ("chosen", "rejected") for k in seq}
    fields.update(index=PER_ROW, valid=PER_ROW, chosen_reward=PER_ROW, rejected_reward=PER_ROW)
    return fields


def scored_fields(num_attributes: int) -> dict:
    fields = {k: ROW for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    fields.update(index=PER_ROW, valid=PER_ROW)
    for a in range(num_attributes):
        fields[f"attr_value_{a}"] = PER_ROW
        fields[f"attr_mask_{a}"] = PER_ROW
    return fields


def with_columns(fields: dict, columns: dict) -> dict:
    """``fields`` plus precomputed columns ({name: logical axes})."""
    return {**fields, **columns}
