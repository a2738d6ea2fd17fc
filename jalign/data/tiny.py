"""The embedded tiny task: two-digit addition, generated from a seed (no files needed).

    prompt "37+48="   response "85"

Every (a, b) with 10 <= a, b <= 99 belongs to exactly one split, chosen by a hash of the pair: ``train``
(about 65%, SFT demonstrations), ``feedback`` (about 25%, preference pairs and RL prompts: the prompts a
policy is aligned on are not ones it saw in SFT, as in real pipelines) and ``eval`` (about 10%, held
out from every stage). The splits are disjoint whatever the seed; the seed only picks and orders examples.

``addition_sloppy`` is the SFT data of the alignment story: each prompt is answered by five
demonstrators, three of whom forget the carry out of the units digit (37+48 -> "75"). A model that
learns these demonstrations answers carry problems wrongly when greedy (the sloppy answer is the mode)
but still samples the right one some of the time (up to the demonstrators' 40%), which is exactly the
gap preference training and RL with a correctness reward are meant to close. ``addition`` holds the clean demonstrations.

Source names (``data.train`` / ``data.eval`` in a config), optionally with a size ``:N`` at the end:
``builtin:addition:train``, ``builtin:addition_sloppy:train``, ``builtin:addition_pairs:feedback``,
``builtin:addition_prompts:eval:256``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

import numpy as np

from jalign.data.formats import (DataError, PreferenceExample, PromptExample, SFTExample, read_jsonl)

SPLITS = ("train", "feedback", "eval")
EVAL_FRACTION_PER_MILLE = 100
FEEDBACK_FRACTION_PER_MILLE = 250
DEMONSTRATORS = 5          # demonstrations per prompt in addition_sloppy
SLOPPY_DEMONSTRATORS = 3   # of which forget the carry (when there is one)


def split_of(a: int, b: int) -> str:
    """The split of the pair, by a stable hash (not Python's salted ``hash``)."""
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "little") % 1000
    if h < EVAL_FRACTION_PER_MILLE:
        return "eval"
    return "feedback" if h < EVAL_FRACTION_PER_MILLE + FEEDBACK_FRACTION_PER_MILLE else "train"


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


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
    """SFT examples; ``n=None`` means the whole split (~5300 train, ~2000 feedback, ~800 eval)."""
    return [SFTExample(prompt=prompt_for(a, b), response=str(a + b), source=f"builtin:addition:{split}")
            for a, b in _pairs(split, n, seed)]


def addition_sloppy(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    """``DEMONSTRATORS`` demonstrations of each of ``n`` prompts, ``SLOPPY_DEMONSTRATORS`` of which drop
    the carry (when there is one to drop), in a seeded order."""
    examples = []
    for a, b in _pairs(split, n, seed):
        for d in range(DEMONSTRATORS):
            sloppy = d < SLOPPY_DEMONSTRATORS and has_carry(a, b)
            examples.append(SFTExample(prompt=prompt_for(a, b), response=_dropped_carry(a, b) if sloppy
                                       else str(a + b), source=f"builtin:addition_sloppy:{split}"))
    order = np.random.default_rng(seed + 2).permutation(len(examples))
    return [examples[i] for i in order]


def addition_prompts(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PromptExample]:
    """Prompts with their answers, for generation-based evaluation and rule-based rewards (PPO)."""
    return [PromptExample(prompt_for(a, b), str(a + b), source=f"builtin:addition_prompts:{split}")
            for a, b in _pairs(split, n, seed)]


# ---- plausible wrong answers ----------------------------------------------------------------------
def _dropped_carry(a: int, b: int) -> str:
    """Forget the carry out of the units: 37+48 -> "75" (only meaningful when ``has_carry``)."""
    return str(a + b - 10)


def _carry_error(a: int, b: int) -> str:
    """The wrong carry decision: dropped when there is one (37+48 -> "75"), invented when there is
    none (12+13 -> "35"). Both directions matter: a reward model that only ever saw dropped carries
    rewards a policy that adds a carry everywhere."""
    return _dropped_carry(a, b) if has_carry(a, b) else str(a + b + 10)


def _wrong_digit(a: int, b: int, which: int, salt: int) -> str:
    """The sum with one digit replaced by another (0 = last digit, 1 = the one before, ...); ``salt``
    picks the replacement, so every wrong value of that digit occurs across the data (an RM trained on
    +-1 errors only rates "85" -> "82" as fine, and PPO finds that hole)."""
    digits = list(str(a + b))
    i = len(digits) - 1 - (which % len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = choices[salt % len(choices)]
    return "".join(digits)


def _swapped_digits(a: int, b: int) -> str:
    s = str(a + b)
    return s[:-2] + s[-1] + s[-2]  # swap the last two digits: 85 -> "58"


WRONG_KINDS = ("carry error", "wrong units digit", "wrong tens digit", "swapped digits")


def wrong_answer(a: int, b: int, kind: int, salt: int = 0) -> str:
    """A deterministic wrong sum of kind ``WRONG_KINDS[kind]``; ``salt`` picks the replacement digit.

    If the chosen corruption happens to be correct (swapping equal digits) the next kind is tried,
    so the result always differs from the right answer and never starts with 0.
    """
    right = str(a + b)
    makers = [_carry_error, lambda a, b: _wrong_digit(a, b, 0, salt), lambda a, b: _wrong_digit(a, b, 1, salt),
              _swapped_digits]
    for k in range(kind, kind + len(makers)):
        wrong = makers[k % len(makers)](a, b)
        if wrong != right and not wrong.startswith("0"):
            return wrong
    raise AssertionError("unreachable: a wrong units digit always differs")


def preference_pairs(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PreferenceExample]:
    """Preference data: chosen = the right sum, rejected = a plausible wrong one (rewards 1 / 0).

    Each of the ``n`` prompts gives one pair per distinct wrong answer of the ``WRONG_KINDS`` (2-4
    pairs), in a seeded order; ``n=None``: the whole split."""
    rng = np.random.default_rng(seed + 1)
    examples = []
    for a, b in _pairs(split, n, seed):
        salts = rng.integers(0, 1 << 30, size=len(WRONG_KINDS))
        wrongs = dict.fromkeys(wrong_answer(a, b, k, int(s)) for k, s in enumerate(salts))
        examples += [PreferenceExample(prompt_for(a, b), str(a + b), w, 1.0, 0.0,
                                       source=f"builtin:addition_pairs:{split}") for w in wrongs]
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


BUILTIN = {  # name -> (generator, data kinds it can serve)
    "addition": (addition, ("sft",)),
    "addition_sloppy": (addition_sloppy, ("sft",)),
    "addition_pairs": (preference_pairs, ("preference",)),
    "addition_prompts": (addition_prompts, ("prompt",)),
    **__import__("jalign.data.tiny_math", fromlist=["BUILTIN"]).BUILTIN,  # math, math_sloppy, math_pairs, math_prompts
    **__import__("jalign.data.tiny_cai", fromlist=["BUILTIN"]).BUILTIN,  # cai_critic, cai_red_team
    **__import__("jalign.data.tiny_steer", fromlist=["BUILTIN"]).BUILTIN,  # addition_unpaired, addition_steer*
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
