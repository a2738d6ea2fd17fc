"""The embedded tiny task: two-digit addition, generated from a seed (no files needed).

    prompt "37+48="   response "85"

Every (a, b) with 10 <= a, b <= 99 belongs to exactly one split, chosen by a hash of the pair (about
10% eval), so train and eval are disjoint whatever the seed; the seed only picks and orders examples.

Source names (``data.train`` / ``data.eval`` in a config), optionally with a size ``:N`` at the end:
``builtin:addition:train``, ``builtin:addition_pairs:eval``, ``builtin:addition_prompts:train:256``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

import numpy as np

from jalign.data.formats import (DataError, PreferenceExample, PromptExample, SFTExample, read_jsonl)

SPLITS = ("train", "eval")
EVAL_FRACTION_PER_MILLE = 100


def split_of(a: int, b: int) -> str:
    """The split of the pair, by a stable hash (not Python's salted ``hash``)."""
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "little")
    return "eval" if h % 1000 < EVAL_FRACTION_PER_MILLE else "train"


def _pairs(split: str, n: Optional[int], seed: int) -> list[tuple[int, int]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if split_of(a, b) == split]
    order = np.random.default_rng(seed).permutation(len(pool))
    if n is not None and n > len(pool):
        raise ValueError(f"addition {split} split has only {len(pool)} distinct examples, asked for {n}")
    return [pool[i] for i in order[:n]]


def prompt_for(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_for(prompt: str) -> str:
    """The correct sum for an addition prompt such as ``"37+48="`` (the last ``a+b=`` in the text)."""
    found = re.findall(r"(\d+)\s*\+\s*(\d+)\s*=", prompt)
    if not found:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    a, b = found[-1]
    return str(int(a) + int(b))


def exact_match_reward(prompt: str, response: str) -> float:
    """1.0 if the response is exactly the right sum (surrounding whitespace allowed), else 0.0."""
    m = re.fullmatch(r"\s*(\d+)\s*", response)
    return float(m is not None and str(int(m.group(1))) == answer_for(prompt))


def addition(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    """SFT examples; ``n=None`` means the whole split (~7300 train, ~800 eval)."""
    return [SFTExample(prompt=prompt_for(a, b), response=str(a + b), source=f"builtin:addition:{split}")
            for a, b in _pairs(split, n, seed)]


def addition_prompts(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PromptExample]:
    """Prompts with their answers, for generation-based evaluation and rule-based rewards (PPO)."""
    return [PromptExample(prompt_for(a, b), str(a + b), source=f"builtin:addition_prompts:{split}")
            for a, b in _pairs(split, n, seed)]


# ---- plausible wrong answers ----------------------------------------------------------------------
def _dropped_carry(a: int, b: int) -> str:
    # Add digit by digit and forget every carry: 37+48 -> "75".
    return str(((a // 10 + b // 10) % 10) * 10 + (a % 10 + b % 10) % 10)


def _off_by_one_digit(a: int, b: int, which: int) -> str:
    digits = list(str(a + b))
    i = len(digits) - 1 - (which % len(digits))  # 0 = last digit, 1 = the one before, ...
    d = int(digits[i])
    digits[i] = str(d + 1 if d < 9 else d - 1)  # sums are >= 20, so a leading digit never hits 0
    return "".join(digits)


def _swapped_digits(a: int, b: int) -> str:
    s = str(a + b)
    return s[:-2] + s[-1] + s[-2]  # swap the last two digits: 85 -> "58"


def wrong_answer(a: int, b: int, kind: int) -> str:
    """A deterministic wrong sum: kind 0 dropped carry, 1/2 off-by-one in a digit, 3 swapped digits.

    If the chosen corruption happens to be correct (no carry; equal digits) the next kind is tried,
    so the result always differs from the right answer.
    """
    right = str(a + b)
    makers = [_dropped_carry, lambda a, b: _off_by_one_digit(a, b, 0),
              lambda a, b: _off_by_one_digit(a, b, 1), _swapped_digits]
    for k in range(kind, kind + len(makers)):
        wrong = makers[k % len(makers)](a, b)
        if wrong != right and not wrong.startswith("0"):
            return wrong
    raise AssertionError("unreachable: off-by-one always differs")


def preference_pairs(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PreferenceExample]:
    """Preference data: chosen = the right sum, rejected = a plausible wrong one (rewards 1 / 0)."""
    pairs = _pairs(split, n, seed)
    kinds = np.random.default_rng(seed + 1).integers(0, 4, size=len(pairs))
    return [PreferenceExample(prompt_for(a, b), str(a + b), wrong_answer(a, b, int(k)), 1.0, 0.0,
                              source=f"builtin:addition_pairs:{split}")
            for (a, b), k in zip(pairs, kinds)]


BUILTIN = {  # name -> (generator, data kinds it can serve)
    "addition": (addition, ("sft",)),
    "addition_pairs": (preference_pairs, ("preference",)),
    "addition_prompts": (addition_prompts, ("prompt",)),
}


def load_builtin(spec: str, kind: str, seed: int = 0) -> list:
    """``builtin:NAME:SPLIT[:N]`` -> examples; errors name the spec and the valid choices."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] != "builtin":
        raise DataError(f"{spec}: expected builtin:NAME:SPLIT[:N], e.g. builtin:addition:train")
    _, name, split, *rest = parts
    if name not in BUILTIN:
        raise DataError(f"{spec}: unknown builtin dataset {name!r}; available: {sorted(BUILTIN)}")
    make, kinds = BUILTIN[name]
    if kind not in kinds:
        fit = [k for k, (_, ks) in BUILTIN.items() if kind in ks]
        raise DataError(f"{spec}: builtin {name!r} provides {kinds[0]} data, not {kind}; use {fit}")
    if split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}; expected one of {SPLITS}")
    try:
        n = int(rest[0]) if rest else None
        return make(split, n, seed)
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None


def load_source(spec: str, kind: str, skip_bad: bool = False, *, seed: int = 0,
                max_examples: Optional[int] = None) -> tuple[list, list[str]]:
    """Examples of ``kind`` (sft / preference / reward / prompt) from a builtin name or a JSONL path.

    Returns ``(examples, skipped_messages)``, like :func:`jalign.data.formats.read_jsonl`.
    """
    if spec.startswith("builtin:"):
        examples = load_builtin(spec, kind, seed)
        return (examples if max_examples is None else examples[:max_examples]), []
    return read_jsonl(spec, kind, skip_bad=skip_bad, max_examples=max_examples)
