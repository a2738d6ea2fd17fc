"""Batch fields declared like parameters: each data kind names its fields with logical axes, and batch
shardings derive from that (never from an array's rank).

Axes use the logical names of ``sharding.rules`` (``batch`` -> the data-parallel mesh axes, ``seq`` ->
"sequence"); ``None`` is an unsharded axis (e.g. the 2 of a chosen/rejected pair, or attributes).
"""
from __future__ import annotations

ROW = ("batch", "seq")  # [B, T]
PER_ROW = ("batch",)  # [B]

SFT_FIELDS = {k: ROW for k in ("tokens", "targets", "loss_mask", "positions", "segment_ids")}


PAIR_ROW = ("batch", None, "seq")  # [B, 2, T]: the two sides of a pair stay on one device
PER_PAIR_SIDE = ("batch", None)  # [B, 2]


def pair_fields(mode: str) -> dict:
    """Pairwise batches (``jalign.data.preference``): both sides stacked, side 0 chosen, 1 rejected."""
    seq = ("tokens", "positions", "segment_ids", "loss_mask") + (("targets",) if mode == "lm" else ())
    fields = {k: PAIR_ROW for k in seq}
    fields.update(index=PER_ROW, valid=PER_ROW, rewards=PER_PAIR_SIDE)
    return fields


def scored_fields() -> dict:
    """Regression batches: one sequence per row, its attribute values and mask [B, A]."""
    fields = {k: ROW for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    fields.update(index=PER_ROW, valid=PER_ROW, attributes=("batch", "attributes"),
                  attribute_mask=("batch", "attributes"))
    return fields


def with_columns(fields: dict, columns: dict) -> dict:
    """``fields`` plus precomputed columns ({name: logical axes})."""
    return {**fields, **columns}


def unpaired_fields() -> dict:
    """KTO batches (``jalign.data.unpaired``): side 0 the completion, side 1 its mismatched KL row (the prompt
    followed by another example's completion), [B, 2, T]; ``label`` 1 desirable / 0 undesirable and
    ``kl_valid`` (the KL row exists) [B]."""
    fields = {k: PAIR_ROW for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    fields.update(index=PER_ROW, valid=PER_ROW, label=PER_ROW, kl_valid=PER_ROW)
    return fields


TOPK = ("batch", "seq", None)  # [B, T, K]: a teacher's top-k ids / log-probs per position (k unsharded)


def distill_fields(with_teacher_columns: bool) -> dict:
    """Distillation batches: SFT rows, plus the teacher's top-k ``teacher_ids`` / ``teacher_logps`` [B, T, K]
    when they were precomputed (``jalign.data.distill``)."""
    extra = {"teacher_ids": TOPK, "teacher_logps": TOPK} if with_teacher_columns else {}
    return {**SFT_FIELDS, **extra}


def packed_pair_fields(mode: str, value_fields: dict) -> dict:
    """Packed pair batches (``jalign.data.packing.pack_pairs``): rows [B, T] of whole pairs (pair k = segments
    2k+1 / 2k+2) and per-pair tables [B, K, ...]; ``value_fields`` {name: logical axes after the pair axis}
    (e.g. ``{"index": (), "valid": (), "rewards": (None,)}``)."""
    seq = ("tokens", "positions", "segment_ids", "loss_mask") + (("targets",) if mode == "lm" else ())
    out = {k: ROW for k in seq}
    out.update({k: ("batch", None) + tuple(axes) for k, axes in value_fields.items()})
    return out


def packed_from_pair_fields(pair_fields_: dict) -> dict:
    """The packed twin of a kind's fields (``pair_fields``, ``unpaired_fields``, ``scored_fields`` plus any
    precomputed per-pair columns): every [B, 2, T] (or [B, T]) field becomes a row [B, T] (``ROW``), every
    per-pair field [B, ...] a table [B, K, ...] (``("batch", None, ...)``, K pairs per row)."""
    out = {}
    for k, axes in pair_fields_.items():
        if tuple(axes) in (PAIR_ROW, ROW):  # a one-sided kind's rows (scored_fields) pack like SFT rows
            out[k] = ROW
        elif axes and axes[0] == "batch":
            out[k] = ("batch", None) + tuple(axes[1:])
        else:
            raise ValueError(f"batch field {k!r} {axes}: not a per-pair field (no leading batch axis): cannot pack")
    return out
