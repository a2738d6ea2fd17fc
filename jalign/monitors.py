"""Reward-hacking and stability monitors (host side, NumPy): pure functions over evaluation batches and
series, and a small stateful tracker the training loop feeds once per evaluation.

Reward hacking shows as the *optimised* reward (a reward model's score, or a rule the policy can game)
rising while a *gold* signal (exact match, a held-out reward model, a stricter rule) falls: Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization" (gold reward peaks then falls as the proxy keeps rising).
The tracker correlates the two over evaluations and raises an alarm when, over the last ``window``
evaluations, the optimised reward's least-squares trend rises while the gold one falls. The stability
signals next to it: KL to the reference per token and per sequence, response-length drift, repetition of
n-grams, the fraction of truncated responses, and entropy collapse.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- series
def pearson(x, y) -> float:
    """Pearson correlation of two equal-length series; 0.0 when either is constant or shorter than 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson: expected two 1-D series of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / den) if den > 0 else 0.0


def _ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size)
    for v in np.unique(x):  # ties share their mean rank
        sel = x == v
        ranks[sel] = ranks[sel].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of the ranks, ties averaged); 0.0 when undefined."""
    return pearson(_ranks(x), _ranks(y))


def trend(series) -> float:
    """Least-squares slope of the series against its index (change per evaluation); 0.0 below 2 points."""
    y = np.asarray(series, np.float64)
    if y.size < 2:
        return 0.0
    t = np.arange(y.size, dtype=np.float64)
    t -= t.mean()
    return float((t * (y - y.mean())).sum() / (t * t).sum())


def hacking_alarm(reward, gold, *, window: int = 4, min_reward_rise: float = 0.0,
                  min_gold_drop: float = 0.0) -> bool:
    """True when, over the last ``window`` evaluations, the optimised reward rose and the gold signal fell.

        rise = trend(reward[-w:]) * (w - 1) > min_reward_rise   and   drop = -trend(gold[-w:]) * (w - 1) > min_gold_drop

    (trend * (w - 1) is the fitted change across the window, in the signal's own units.) False until
    ``window`` evaluations exist. Set the thresholds above the evaluation noise of each signal.
    """
    r, g = np.asarray(reward, np.float64), np.asarray(gold, np.float64)
    if window < 2:
        raise ValueError(f"hacking_alarm: window must be >= 2, got {window}")
    if r.size < window or g.size < window:
        return False
    rise = trend(r[-window:]) * (window - 1)
    drop = -trend(g[-window:]) * (window - 1)
    return bool(rise > min_reward_rise and drop > min_gold_drop)


def entropy_collapsed(entropy, *, baseline: Optional[float] = None, ratio: float = 0.2) -> bool:
    """True when the latest entropy is below ``ratio`` times the baseline (default: the first value)."""
    h = np.asarray(entropy, np.float64)
    if h.size == 0:
        return False
    base = h[0] if baseline is None else baseline
    return bool(base > 0 and h[-1] < ratio * base)


# ----------------------------------------------------------------------------- one evaluation batch
def kl_summary(kl, mask) -> dict:
    """KL to the reference of a batch of responses from per-token estimates ``kl`` [B, T] under ``mask``:
    ``kl_per_token`` (mean over valid tokens), ``kl_per_seq_mean`` / ``kl_per_seq_max`` (of per-sequence sums,
    over sequences with a valid token)."""
    kl, m = np.asarray(kl, np.float64), np.asarray(mask, np.float64) > 0
    per_seq = np.where(m, kl, 0.0).sum(-1)
    rows = m.any(-1)
    n = m.sum()
    return {
        "kl_per_token": float(np.where(m, kl, 0.0).sum() / n) if n else 0.0,
        "kl_per_seq_mean": float(per_seq[rows].mean()) if rows.any() else 0.0,
        "kl_per_seq_max": float(per_seq[rows].max()) if rows.any() else 0.0,
    }


def length_drift(lengths, baseline_mean: float) -> dict:
    """``length_mean``, ``length_drift`` (mean - baseline) and ``length_ratio`` (mean / baseline, 0 if the
    baseline is 0) of response lengths against the start of training."""
    L = np.asarray(lengths, np.float64)
    mean = float(L.mean()) if L.size else 0.0
    return {"length_mean": mean, "length_drift": mean - baseline_mean,
            "length_ratio": mean / baseline_mean if baseline_mean > 0 else 0.0}


def repetition_rate(sequences: Sequence[Sequence], n: int = 3) -> float:
    """Mean over responses of the fraction of n-grams that repeat an earlier n-gram of the same response.

    ``sequences``: token-id lists or strings (characters). A response with fewer than n + 1 tokens scores 0.
    A degenerate "the the the ..." loop tends to 1; ordinary text stays near 0.
    """
    if n < 1:
        raise ValueError(f"repetition_rate: n must be >= 1, got {n}")
    rates = []
    for seq in sequences:
        toks = list(seq)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        rates.append(1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0)
    return float(np.mean(rates)) if rates else 0.0


def truncated_fraction(ended) -> float:
    """Fraction of responses that did not end (hit the token budget): 1 - mean(ended)."""
    e = np.asarray(ended, bool)
    return float(1.0 - e.mean()) if e.size else 0.0


def batch_monitors(sequences: Sequence[Sequence], ended, *, kl=None, mask=None, entropy=None,
                   baseline_length: Optional[float] = None, ngram: int = 3) -> dict:
    """The per-evaluation stability summary: ``length_mean`` (+ drift and ratio with ``baseline_length``),
    ``repetition_rate``, ``truncated_fraction``, the :func:`kl_summary` keys with ``kl``/``mask``, and
    ``entropy`` (mean over ``mask``) with per-token entropies ``entropy`` [B, T]."""
    lengths = [len(s) for s in sequences]
    out = {"length_mean": float(np.mean(lengths)) if lengths else 0.0,
           "repetition_rate": repetition_rate(sequences, ngram), "truncated_fraction": truncated_fraction(ended)}
    if baseline_length is not None:
        out.update(length_drift(lengths, baseline_length))
    if kl is not None:
        out.update(kl_summary(kl, mask if mask is not None else np.ones(np.shape(kl))))
    if entropy is not None:
        m = np.asarray(mask if mask is not None else np.ones(np.shape(entropy)), np.float64) > 0
        out["entropy"] = float(np.asarray(entropy, np.float64)[m].mean()) if m.any() else 0.0
    return out


# ----------------------------------------------------------------------------- the tracker
@dataclasses.dataclass
class HackingMonitor:
    """Fed once per evaluation; returns the monitor metrics to log (prefix them, e.g. ``monitor/``).

        mon = HackingMonitor(window=4, min_reward_rise=0.05, min_gold_drop=0.05)
        metrics = mon.update(step, reward=rm_mean, gold=exact_match, entropy=h, length=len_mean, kl=kl_tok)

    Keys: ``reward_gold_corr`` (Pearson over all evaluations so far), ``reward_trend`` / ``gold_trend``
    (slopes over the last ``window``), ``hacking_alarm`` (0/1 now), ``first_alarm_step`` (-1 until one
    fires), ``entropy_ratio`` and ``entropy_collapse`` (against the first evaluation), ``length_ratio``
    (against the first), ``kl`` (echoed). Signals left as None are skipped. :meth:`state_dict` /
    :meth:`from_state_dict` hold plain lists (JSON) for checkpoints, so resume continues the series.
    """
    window: int = 4
    min_reward_rise: float = 0.0
    min_gold_drop: float = 0.0
    entropy_ratio: float = 0.2
    steps: list = dataclasses.field(default_factory=list)
    reward: list = dataclasses.field(default_factory=list)
    gold: list = dataclasses.field(default_factory=list)
    entropy: list = dataclasses.field(default_factory=list)
    length: list = dataclasses.field(default_factory=list)
    first_alarm_step: int = -1

    def update(self, step: int, *, reward: Optional[float] = None, gold: Optional[float] = None,
               entropy: Optional[float] = None, length: Optional[float] = None,
               kl: Optional[float] = None) -> dict:
        self.steps.append(int(step))
        out = {}
        if reward is not None and gold is not None:
            self.reward.append(float(reward))
            self.gold.append(float(gold))
            alarm = hacking_alarm(self.reward, self.gold, window=self.window, min_reward_rise=self.min_reward_rise,
                                  min_gold_drop=self.min_gold_drop)
            if alarm and self.first_alarm_step < 0:
                self.first_alarm_step = int(step)
            w = self.window
            out.update(reward_gold_corr=pearson(self.reward, self.gold), reward_trend=trend(self.reward[-w:]),
                       gold_trend=trend(self.gold[-w:]), hacking_alarm=float(alarm),
                       first_alarm_step=float(self.first_alarm_step))
        if entropy is not None:
            self.entropy.append(float(entropy))
            base = self.entropy[0]
            out.update(entropy_ratio=self.entropy[-1] / base if base > 0 else 0.0,
                       entropy_collapse=float(entropy_collapsed(self.entropy, ratio=self.entropy_ratio)))
        if length is not None:
            self.length.append(float(length))
            out["length_ratio"] = self.length[-1] / self.length[0] if self.length[0] > 0 else 0.0
        if kl is not None:
            out["kl"] = float(kl)
        return out

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "HackingMonitor":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(state) - fields
        if unknown:
            raise ValueError(f"HackingMonitor state: unknown keys {sorted(unknown)}")
        return cls(**state)
