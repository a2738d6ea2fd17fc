"""Packed two-sided batches (preference pairs, KTO rows) seen as per-pair batches.

A packed batch (``jalign.data.packing.pack_pairs``) holds rows [..., R, T] of whole pairs, pair k of a row in
segments 2k+1 (side 0) and 2k+2 (side 1), and per-pair tables [..., R, K, ...]. :func:`pair_view` turns it
into what the unpacked losses read: per-pair fields [..., R*K, ...] and, in place of the [b, 2, T] loss mask,
each sequence's token count as a length-1 "sequence" [..., R*K, 2, 1] (so ``pair_valid``, lengths and token
counts are computed the same way); the rows ride along under ``"rows"`` for the forward pass. The
per-sequence log-prob sums are read per segment (:func:`jalign.models.heads.segment_sums`), which equals the
unpacked sum because attention never crosses segments and positions restart per side.
"""
from __future__ import annotations

import jax.numpy as jnp

from jalign.models.heads import packed_segment_scores, segment_sums

SEQ_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def is_packed(mb: dict) -> bool:
    """Packed rows: ``valid`` is [..., R, K] beside tokens [..., R, T] (unpacked: [..., b] beside [..., b, 2, T])."""
    return "rows" in mb or mb["valid"].ndim == mb["tokens"].ndim


def pair_view(mb: dict) -> dict:
    """The per-pair view of a packed batch (an unpacked batch is returned as it is)."""
    if "rows" in mb or not is_packed(mb):
        return mb
    *lead, R, K = mb["valid"].shape

    def per_pair(v):
        return v.reshape(tuple(lead) + (R * K,) + v.shape[len(lead) + 2:])

    view = {k: per_pair(v) for k, v in mb.items() if k not in SEQ_FIELDS}
    counts = segment_sums(mb["loss_mask"].astype(jnp.float32), mb["segment_ids"], 2 * K)  # [..., R, 2K]
    view["loss_mask"] = counts.reshape(tuple(lead) + (R * K, 2, 1))
    view["rows"] = {k: mb[k] for k in SEQ_FIELDS if k in mb}
    return view


def pairs_per_row(view: dict) -> int:
    return view["valid"].shape[-1] // view["rows"]["tokens"].shape[-2]


def packed_pair_logps(token_logps, view: dict):
    """(sums [b, 2], per-sequence mean log-prob [2b, 1], token counts [2b, 1]) from token log-probs [R, T] of
    the packed rows: ``sum(lp * mask)`` and ``sum(mask)`` of the last two equal the unpacked token-level ones,
    so token-level terms (the DPO + NLL term, ORPO/CPO's NLL) keep their values."""
    rows = view["rows"]
    K = pairs_per_row(view)
    mask = rows["loss_mask"]
    lp = jnp.where(mask > 0, token_logps, 0.0) * mask
    sums = segment_sums(lp, rows["segment_ids"], 2 * K).reshape(-1, 2)
    counts = view["loss_mask"].reshape(-1, 1)
    mean = jnp.where(counts > 0, sums.reshape(-1, 1) / jnp.maximum(counts, 1.0), 0.0)
    return sums, mean, counts


def packed_pair_scores(params, view: dict, cfg) -> jnp.ndarray:
    """[b, 2] reward-model scores of both sides of every pair of a packed view."""
    rows = view["rows"]
    K = pairs_per_row(view)
    r = packed_segment_scores(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg, 2 * K)
    return r[..., 0].reshape(-1, 2)
