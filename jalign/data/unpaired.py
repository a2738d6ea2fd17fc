"""Unpaired, labelled completions for KTO: ``{"prompt", "completion", "label": true | false}``.

Each example becomes one record with two rows on a side axis, like a preference pair ([B, 2, T], fields in
``jalign.data.fields.unpaired_fields``):

    side 0  the prompt followed by its own completion (the trained sequence, "lm" rows as in DPO)
    side 1  the same prompt followed by the completion of *another* example with a different prompt: the
            mismatched pair (x, y') KTO estimates its reference point KL(pi || ref) on
            (Ethayarajh et al. 2024, Sec. 4.1)
    label    1 desirable, 0 undesirable; kl_valid 1 where the KL row exists; index, valid as for pairs

The mismatched completion of each example is fixed when the data is tokenized: the examples are put in a
seeded cycle (``data.seed``) and each takes the completion of the next one in the cycle whose prompt differs.
TRL's KTO trainer also pairs once per dataset (its ``KL_completion`` column); a fixed pairing is what lets the
reference log-probs of the KL rows be precomputed like the completions'. Any unrelated y' estimates the same
KL, so nothing is lost against re-pairing every batch.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from jalign.data import fields
from jalign.data.chat import encode_pair
from jalign.data.preference import _budget, _compact, _RowData, fit_responses, sequence_row

SIDES = ("completion", "kl")


def mismatched_partners(prompt_keys: Sequence, seed: int) -> np.ndarray:
    """For each item, the index of another item with a different prompt key (-1 when every prompt is the same).

    The items are put in a seeded random cycle; item i takes the first item after it in the cycle whose key
    differs from its own, so identical neighbours (e.g. the two halves of a preference pair) never pair up.
    """
    n = len(prompt_keys)
    out = np.full(n, -1, np.int64)
    if n < 2:
        return out
    order = np.random.default_rng(seed).permutation(n)
    keys = [prompt_keys[i] for i in order]
    # the next position with a different key, scanning the cycle backwards once (amortised O(n))
    nxt = [-1] * n
    for _ in range(2):
        for p in range(n - 1, -1, -1):
            q = (p + 1) % n
            nxt[p] = q if keys[q] != keys[p] else nxt[q]
    for p in range(n):
        if nxt[p] >= 0 and keys[nxt[p]] != keys[p]:
            out[order[p]] = order[nxt[p]]
    return out


def tokenize_unpaired(examples, tokenizer, template, *, seq_len: int, overlong: str = "truncate",
                      seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """KTO records ``{"completion": (ids, mask), "kl": (ids, mask), "label", "kl_valid", "index"}`` + counts.

    Counts: ``examples``, ``truncated``, ``dropped`` (the completion did not fit, ``data.overlong``),
    ``desirable``, ``undesirable``, ``kl_missing`` (no mismatched row: one distinct prompt only, or the
    row did not fit), ``degenerate`` (always 0 here; empty completions are refused when read).
    """
    max_ids = _budget(seq_len, "lm")
    counts = {"examples": 0, "truncated": 0, "dropped": 0, "degenerate": 0, "desirable": 0, "undesirable": 0,
              "kl_missing": 0}
    kept = []  # (example, prompt ids, completion ids, fitted (ids, mask))
    for ex in examples:
        p, c = encode_pair(ex.prompt, ex.completion, template, tokenizer)
        fitted, status = fit_responses(p, [c], max_ids, overlong)
        if status != "ok":
            counts[status] += 1
        if fitted is not None:
            kept.append((ex, p, fitted[0]))
    partners = mismatched_partners([tuple(p) for _, p, _ in kept], seed)
    records = []
    for i, (ex, p, own) in enumerate(kept):
        kl = None
        if partners[i] >= 0:
            # the partner's completion rendered after this prompt (the template decides the boundary)
            p_i, c_j = encode_pair(ex.prompt, kept[partners[i]][0].completion, template, tokenizer)
            fitted, _ = fit_responses(p_i, [c_j], max_ids, "truncate")
            kl = None if fitted is None else fitted[0]
        counts["kl_missing"] += kl is None
        label = bool(ex.label)
        counts["desirable" if label else "undesirable"] += 1
        records.append({"completion": _compact(*own), "kl": _compact(*(kl if kl is not None else own)),
                        "label": float(label), "kl_valid": float(kl is not None), "index": len(records)})
        counts["examples"] += 1
    return records, counts


def unpaired_row(rec: dict, seq_len: int) -> dict:
    """The completion and KL rows stacked on a side axis [2, seq_len], plus label, kl_valid, index, valid."""
    sides = [sequence_row(*rec[side], seq_len, "lm") for side in SIDES]
    row = {k: np.stack([sides[0][k], sides[1][k]]) for k in sides[0]}
    row.update(index=np.int32(rec["index"]), valid=np.float32(1.0), label=np.float32(rec["label"]),
               kl_valid=np.float32(rec["kl_valid"]))
    return row


def unpaired_fingerprint(records: Sequence[dict]) -> str:
    """A hash of the tokenized records in order (what precomputed reference log-probs depend on)."""
    h = hashlib.sha1()
    for r in records:
        for side in SIDES:
            ids, mask = r[side]
            h.update(ids.tobytes())
            h.update(mask.tobytes())
    return h.hexdigest()


class UnpairedData(_RowData):
    """Unpaired labelled completions from ``cfg.data`` as KTO batches (see the module docstring)."""

    kind = "unpaired"
    mode = "lm"

    def __init__(self, cfg, tokenizer, **kw):
        self.counts = {}
        super().__init__(cfg, tokenizer, **kw)

    def _tokenize(self, spec, examples):
        d = self.cfg.data
        records, counts = tokenize_unpaired(examples, self.tokenizer, d.chat_template, seq_len=d.seq_len,
                                            overlong=d.overlong, seed=d.seed)
        self._log_counts(spec, counts)
        self.log(f"data: {spec}: {counts['desirable']} desirable, {counts['undesirable']} undesirable"
                 + (f", {counts['kl_missing']} without a mismatched KL row" if counts["kl_missing"] else ""))
        return records

    @staticmethod
    def _prompt_reference(ex):
        return ex.prompt, (ex.completion if ex.label else None)

    def eval_examples(self, with_texts: bool = False) -> list:
        """Held-out prompts with a desirable completion as the reference, each (prompt, reference) once."""
        out, seen = [], set()
        for row in super().eval_examples(with_texts):
            if (tuple(row[0]), row[1]) not in seen:
                seen.add((tuple(row[0]), row[1]))
                out.append(row)
        return out

    def make_row(self, rec):
        return unpaired_row(rec, self.cfg.data.seq_len)

    @property
    def fields(self) -> dict:
        return fields.unpaired_fields()


def label_fraction(records: Sequence[dict]) -> Optional[float]:
    """Fraction of desirable records (None for no records)."""
    return float(np.mean([r["label"] for r in records])) if records else None
