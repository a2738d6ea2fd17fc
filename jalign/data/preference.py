"""Paired and scored data for reward models and the DPO family: flat fixed-shape batches.

Two row *modes*:

* ``"lm"`` (DPO family): next-token rows as in SFT, ``tokens = ids[:-1]``, ``targets = ids[1:]``,
  ``loss_mask`` 1 where the target is a response token; an example fits when ``len(ids) - 1 <= seq_len``.
* ``"score"`` (reward models): the whole sequence ``tokens = ids`` (the final EOS included, so the
  score is read after the model has seen it); fits when ``len(ids) <= seq_len``.

A pairwise batch stacks the two sides of a pair (fields declared in ``jalign.data.fields.pair_fields``,
so the batch is sharded over pairs and a pair never straddles devices):

    tokens, positions, segment_ids, loss_mask (+ targets in "lm")   [B, 2, seq_len]  side 0 chosen, 1 rejected
    rewards          float32[B, 2]  the data's chosen / rejected rewards (1 / 0 when not given)
    index            int32[B]       example index in the tokenized split (keys precomputed columns)
    valid            float32[B]     1 for real pairs, 0 for the padding rows of the last eval batch

A regression batch (``{"prompt","response","attributes"}`` data) has ``tokens, positions, segment_ids,
loss_mask`` [B, seq_len], ``attributes`` and ``attribute_mask`` [B, A] (``jalign.data.fields.scored_fields``),
``index`` and ``valid``.

Over-long examples (``data.overlong``): ``"truncate"`` cuts the prompt from the left first (keeping at
least its last token, shared by both sides of a pair), then the responses from the right; ``"drop"``
leaves the example out. Both are counted and logged.

Degenerate examples are never trained on: an empty response, chosen or rejected (rejected when the
data are read, :mod:`jalign.data.formats`), and a pair whose two sides are the same tokens (literally
identical lines are rejected when read; a pair the chat template renders identically, e.g. differing
only in whitespace a template trims, is found here). They are an error naming ``file:line``, or with
``data.skip_bad_lines`` dropped, logged and counted (``degenerate``, ``degenerate_<reason>``). A pair
that becomes identical only through truncation at ``seq_len`` is dropped and counted as ``dropped``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np

from jalign.errors import ConfigError
from jalign.data.chat import encode_pair
from jalign.data.formats import identical_pair, skipped_counts
from jalign.data import fields
from jalign.data.pipeline import TRAIN_PREFETCH, ConfigData, batch_stream, epoch_stream, read_options

MODES = ("lm", "score")
SIDES = ("chosen", "rejected")


def _budget(seq_len: int, mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return seq_len + 1 if mode == "lm" else seq_len


def fit_responses(prompt: Sequence[int], responses: Sequence[Sequence[int]], max_ids: int,
                  overlong: str) -> tuple[Optional[list[tuple[list[int], list[int]]]], str]:
    """Fit ``prompt + response`` (for every response, same prompt cut) into ``max_ids`` ids.

    Returns ``([(ids, response_mask), ...] or None, "ok" | "truncated" | "dropped")``: the prompt loses
    tokens from the left first (at least one is kept), then each response is cut from the right.
    """
    prompt = list(prompt)
    longest = max(len(r) for r in responses)
    status = "ok"
    if not all(len(r) for r in responses):
        return None, "dropped"
    if len(prompt) + longest > max_ids:
        if overlong == "drop":
            return None, "dropped"
        status = "truncated"
        cut = min(len(prompt) + longest - max_ids, len(prompt) - 1)
        prompt = prompt[cut:]
    room = max_ids - len(prompt)
    if room < 1:
        return None, "dropped"
    out = []
    for r in responses:
        r = list(r)[:room]
        out.append((prompt + r, [0] * len(prompt) + [1] * len(r)))
    return out, status


def tokenize_pairs(examples, tokenizer, template, *, seq_len: int, mode: str = "lm",
                   overlong: str = "truncate", skip_bad: bool = False,
                   skipped: Optional[list] = None) -> tuple[list[dict], dict[str, int]]:
    """Compact pair records ``{"chosen": (ids, mask), "rejected": ..., "index", rewards}`` + counts.

    ``index`` is the record's position in the returned list (after drops), the key of precomputed
    reference log-probs. Counts: ``{"examples", "truncated", "dropped", "degenerate"}``. A pair whose
    sides are the same tokens raises :class:`DataError` (``file:line``), or with ``skip_bad`` is left
    out, counted as degenerate and its message appended to ``skipped`` (if given).
    """
    max_ids = _budget(seq_len, mode)
    skipped = [] if skipped is None else skipped
    records, counts = [], {"examples": 0, "truncated": 0, "dropped": 0, "degenerate": 0}
    for ex in examples:
        p_c, r_c = encode_pair(ex.prompt, ex.chosen, template, tokenizer)
        p_r, r_r = encode_pair(ex.prompt, ex.rejected, template, tokenizer)
        if p_c + r_c == p_r + r_r:
            counts["degenerate"] += identical_pair(ex, skip_bad, skipped)
            continue
        if p_c != p_r:  # a conversation whose earlier turns differ: fit each side on its own
            (c, s1), (r, s2) = (fit_responses(p_c, [r_c], max_ids, overlong),
                                fit_responses(p_r, [r_r], max_ids, overlong))
            fitted = None if c is None or r is None else [c[0], r[0]]
            status = "dropped" if fitted is None else ("truncated" if "truncated" in (s1, s2) else "ok")
        else:
            fitted, status = fit_responses(p_c, [r_c, r_r], max_ids, overlong)
        if fitted is not None and np.array_equal(fitted[0][0], fitted[1][0]):
            fitted, status = None, "dropped"  # the two sides differed only past seq_len
        if status != "ok":
            counts[status] += 1
        if fitted is None:
            continue
        rc = 1.0 if ex.chosen_reward is None else float(ex.chosen_reward)
        rr = 0.0 if ex.rejected_reward is None else float(ex.rejected_reward)
        records.append({"chosen": _compact(*fitted[0]), "rejected": _compact(*fitted[1]), "index": len(records),
                        "chosen_reward": rc, "rejected_reward": rr})
        counts["examples"] += 1
    return records, counts


def tokenize_scored(examples, tokenizer, template, attribute_names: Sequence[str], *, seq_len: int,
                    overlong: str = "truncate") -> tuple[list[dict], dict[str, int]]:
    """Regression records ``{"seq": (ids, mask), "values" [A], "value_mask" [A], "index"}`` + counts.

    An attribute that is missing or null in an example is masked out (``value_mask`` 0).
    """
    records, counts = [], {"examples": 0, "truncated": 0, "dropped": 0}
    for ex in examples:
        p, r = encode_pair(ex.prompt, ex.response, template, tokenizer)
        fitted, status = fit_responses(p, [r], _budget(seq_len, "score"), overlong)
        if status != "ok":
            counts[status] += 1
        if fitted is None:
            continue
        vals = [ex.attributes.get(n) for n in attribute_names]
        records.append({"seq": _compact(*fitted[0]), "index": len(records),
                        "values": np.asarray([0.0 if v is None else v for v in vals], np.float32),
                        "value_mask": np.asarray([v is not None for v in vals], np.float32)})
        counts["examples"] += 1
    return records, counts


def _compact(ids, mask):
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


# ---- rows ---------------------------------------------------------------------------------------
def sequence_row(ids: np.ndarray, mask: np.ndarray, seq_len: int, mode: str) -> dict:
    """One sequence padded to ``seq_len``: tokens, positions, segment_ids, loss_mask (+ targets in "lm")."""
    if mode == "lm":
        tokens, targets, loss_mask = ids[:-1], ids[1:], mask[1:]
    else:
        tokens, targets, loss_mask = ids, None, mask
    n = len(tokens)
    out = {"tokens": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32)}
    out["tokens"][:n] = tokens
    out["positions"][:n] = np.arange(n)
    out["segment_ids"][:n] = 1
    out["loss_mask"][:n] = loss_mask
    if mode == "lm":
        out["targets"] = np.zeros(seq_len, np.int32)
        out["targets"][:n] = targets
    return out


def pair_row(rec: dict, seq_len: int, mode: str) -> dict:
    """Both sides stacked on a pair axis: every sequence field [2, seq_len] (0 = chosen, 1 = rejected)."""
    sides = [sequence_row(*rec[side], seq_len, mode) for side in SIDES]
    row = {k: np.stack([sides[0][k], sides[1][k]]) for k in sides[0]}
    row.update(index=np.int32(rec["index"]), valid=np.float32(1.0),
               rewards=np.asarray([rec["chosen_reward"], rec["rejected_reward"]], np.float32))
    return row


def scored_row(rec: dict, seq_len: int) -> dict:
    row = sequence_row(*rec["seq"], seq_len, "score")
    row.update(index=np.int32(rec["index"]), valid=np.float32(1.0),
               attributes=np.asarray(rec["values"], np.float32),
               attribute_mask=np.asarray(rec["value_mask"], np.float32))
    return row


def _empty(row: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in row.items()}


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def ordered_batches(records: Sequence[dict], make_row, *, batch_rows_per_process: int, process_index: int = 0,
                    process_count: int = 1):
    """One pass in order: this process's slice ``[process_index::process_count]``, every process
    yielding the same number of batches; the last ones are filled with empty rows (``valid`` 0)."""
    if not records:
        raise ValueError("no examples")
    mine = list(records)[process_index::process_count]
    num_batches = math.ceil(math.ceil(len(records) / process_count) / batch_rows_per_process)
    template = _empty(make_row(records[0]))
    for b in range(num_batches):
        rows = [make_row(r) for r in mine[b * batch_rows_per_process:(b + 1) * batch_rows_per_process]]
        yield _stack(rows + [template] * (batch_rows_per_process - len(rows)))


def records_fingerprint(records: Sequence[dict]) -> str:
    """A hash of the tokenized pairs in order (what precomputed reference log-probs depend on)."""
    h = hashlib.sha1()
    for r in records:
        for side in SIDES:
            ids, mask = r[side]
            h.update(ids.tobytes())
            h.update(mask.tobytes())
    return h.hexdigest()


# ---- config-driven data -------------------------------------------------------------------------
class _RowData(ConfigData):
    """Shared by the two classes below: grain train iterator and ordered eval batches of flat rows."""

    mode = "lm"

    def make_row(self, rec):
        raise NotImplementedError

    def train_iterator(self):
        d = self.cfg.data
        if not self.train_records:
            raise ConfigError(f"data.train={d.train}: no examples left after tokenization (all dropped at "
                              f"data.seq_len={d.seq_len})")
        ds = epoch_stream(self.train_records, shuffle=d.shuffle, seed=d.seed, process_index=self.process_index,
                     process_count=self.process_count, repeat=True)
        rows = ds.map(self.make_row).to_iter_dataset(read_options())
        return batch_stream(rows, self.rows, TRAIN_PREFETCH)

    def ordered(self, split: str):
        """One ordered pass over a split (``valid`` marks real rows): for eval and precomputation."""
        records = self.train_records if split == "train" else self.eval_records
        return ordered_batches(records, self.make_row, batch_rows_per_process=self.rows,
                               process_index=self.process_index, process_count=self.process_count)

    def eval_iterator(self):
        """Ordered batches of the selected eval set (``select_eval``), built once per set."""
        key = self._selected_eval
        if key not in self._eval_batches:
            self._eval_batches[key] = list(ordered_batches(
                self.selected_eval_records(), self.make_row, batch_rows_per_process=self.rows,
                process_index=self.process_index, process_count=self.process_count))
        return iter(self._eval_batches[key])

    def _load(self, load_source, spec, max_examples, fields=None):
        def recording(*args, **kw):  # keep the skipped lines' reasons for the counts
            examples, skipped = load_source(*args, **kw)
            self._skipped[spec] = list(skipped)
            return examples, skipped

        self._skipped = getattr(self, "_skipped", {})
        return super()._load(recording, spec, max_examples, fields)

    def _log_counts(self, spec, counts, token_skipped=()):
        """Counts of a split: the tokenizer's, plus the degenerate lines skipped when reading (per reason)."""
        for msg in list(token_skipped)[:5]:
            self.log(f"data: skipped {msg}")
        counts = {**counts, **skipped_counts([*self._skipped.get(spec, []), *token_skipped])}
        self.counts[spec] = counts
        super()._log_counts(spec, counts)
        if counts["degenerate"]:
            self.log(f"data: {spec}: {counts['degenerate']} degenerate examples skipped ("
                     + ", ".join(f"{k[len('degenerate_'):]}: {v}" for k, v in counts.items()
                                 if k.startswith("degenerate_")) + ")")


class PairData(_RowData):
    """Preference pairs from ``cfg.data`` as flat pairwise batches (see the module docstring)."""

    kind = "preference"

    def __init__(self, cfg, tokenizer, *, mode: str = "lm", **kw):
        self.mode, self.counts = mode, {}
        _budget(cfg.data.seq_len, mode)
        super().__init__(cfg, tokenizer, **kw)

    def _tokenize(self, spec, examples):
        d = self.cfg.data
        skipped = []
        records, counts = tokenize_pairs(examples, self.tokenizer, d.chat_template, seq_len=d.seq_len,
                                         mode=self.mode, overlong=d.overlong, skip_bad=d.skip_bad_lines,
                                         skipped=skipped)
        self._log_counts(spec, counts, skipped)
        return records

    @staticmethod
    def _prompt_reference(ex):
        return ex.prompt, ex.chosen

    def make_row(self, rec):
        return pair_row(rec, self.cfg.data.seq_len, self.mode)

    @property
    def fields(self) -> dict:
        return fields.pair_fields(self.mode)


class ScoredData(_RowData):
    """``{"prompt", "response", "attributes"}`` examples for a regression reward model.

    The attribute columns are the sorted attribute names of the training set; their number must equal
    ``num_attributes``.
    """

    kind = "reward"
    mode = "score"

    def __init__(self, cfg, tokenizer, *, num_attributes: int, **kw):
        self.num_attributes, self.attribute_names, self.counts = num_attributes, None, {}
        super().__init__(cfg, tokenizer, **kw)

    def _tokenize(self, spec, examples):
        if self.attribute_names is None:  # the training split comes first
            names = sorted({k for ex in examples for k in ex.attributes})
            if len(names) != self.num_attributes:
                raise ConfigError(f"data.train={spec}: the data has {len(names)} attributes {names} but "
                                  f"algorithm.num_attributes={self.num_attributes}")
            self.attribute_names = names
        d = self.cfg.data
        records, counts = tokenize_scored(examples, self.tokenizer, d.chat_template, self.attribute_names,
                                          seq_len=d.seq_len, overlong=d.overlong)
        self._log_counts(spec, counts)
        return records

    @staticmethod
    def _prompt_reference(ex):
        return ex.prompt, None

    def make_row(self, rec):
        return scored_row(rec, self.cfg.data.seq_len)

    @property
    def fields(self) -> dict:
        return fields.scored_fields()
