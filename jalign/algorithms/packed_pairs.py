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


class PackedPairs:
    """What a two-sided supervised algorithm (pairwise reward model, the DPO family, KTO) needs to train on packed
    pair rows when ``data.pack_pairs`` is on; put it before :class:`SupervisedAlgorithm` in the bases. (The
    regression reward model's one-sided scored rows pack the same way, one segment per example.)

    Rows of ``2 * data.seq_len`` tokens (``jalign.config.packed_pair_len``) hold up to ``data.pack_max_pairs``
    whole pairs each (``jalign.data.packing.pack_pairs``), ``train.global_batch`` of them per step; the train
    iterator is grain's (checkpointable, shuffled and sharded like the unpacked one), the eval batches one ordered
    pass packed the same way. The losses read them through :func:`pair_view` and normalise by the valid pairs
    they see, so per-pair metrics keep their meaning. Precomputed per-pair columns (reference log-probs) are
    computed over unpacked rows once and joined per pair slot (:func:`jalign.algorithms.precompute.join_columns`).
    """

    packs_pairs = True

    @property
    def packed(self) -> bool:
        return bool(self.cfg.data.pack_pairs)

    def pack_fields(self, unpacked: dict) -> dict:
        """The batch fields as placed: ``unpacked`` itself, or its packed twin under ``data.pack_pairs``."""
        from jalign.data.fields import packed_from_pair_fields

        return packed_from_pair_fields(unpacked) if self.packed else unpacked

    def train_batches(self):
        if not self.packed:
            return super().train_batches()
        from jalign.config import packed_pair_len
        from jalign.data.pipeline import TRAIN_PREFETCH, make_packed_pair_iterator

        d, data = self.cfg.data, self.data
        self.rt.log(f"data: pairs packed into rows of {packed_pair_len(d)} tokens (2 * data.seq_len), at most "
                    f"{d.pack_max_pairs} per row (data.pack_max_pairs); train.global_batch={self.cfg.train.global_batch} "
                    "such rows per step")
        return make_packed_pair_iterator(
            data.train_records, data.make_row, seq_len=packed_pair_len(d), batch_rows_per_process=data.rows,
            max_pairs=d.pack_max_pairs, shuffle=d.shuffle, seed=d.seed, process_index=data.process_index,
            process_count=data.process_count, prefetch=TRAIN_PREFETCH)

    def eval_batches(self):
        if not self.packed:
            return super().eval_batches()
        if not getattr(self.data, "has_eval", False):
            return ()
        from jalign.config import packed_pair_len
        from jalign.data.pipeline import make_packed_pair_eval_iterator

        d, data = self.cfg.data, self.data
        cache = self.__dict__.setdefault("_packed_eval_batches", {})
        key = data._selected_eval
        if key not in cache:  # built once per eval set, like the unpacked eval batches
            cache[key] = list(make_packed_pair_eval_iterator(
                data.selected_eval_records(), data.make_row, seq_len=packed_pair_len(d),
                batch_rows_per_process=data.rows, max_pairs=d.pack_max_pairs, process_index=data.process_index,
                process_count=data.process_count))
        return iter(cache[key])

    def abstract_batch(self, accum: int, rows: int, fields=None):
        """``jalign plan``: the packed rows [accum, rows, 2 * seq_len] and per-pair tables [accum, rows, K, ...]
        (explicit ``fields``, e.g. the reference pass over unpacked pairs, are placed as given)."""
        if not self.packed or fields is not None:
            return super().abstract_batch(accum, rows, fields)
        from jalign.abstract import abstract_batch
        from jalign.config import packed_pair_len
        from jalign.data.fields import ROW

        d, per_side = self.cfg.data, self.batch_trailing_dims()
        trailing = {k: (d.pack_max_pairs,) + tuple(per_side.get(k, (2,) * (len(axes) - 2)))[:len(axes) - 2]
                    for k, axes in self.fields.items() if tuple(axes) != ROW}
        return abstract_batch(self.fields, self.rt.mesh, self.rt.rules, accum, rows, packed_pair_len(d), trailing)
