"""A tiny verifiable-math task: two-step arithmetic with a worked solution and a ``#### answer`` line.

    prompt "7+15-9="     response "7+15=22\\n22-9=13\\n#### 13"     answer "13"
    prompt "4*6+8="      response "4*6=24\\n24+8=32\\n#### 32"      answer "32"

Generated from a seed, no files. Every problem ``a op1 b op2 c`` (op1 in + - *, op2 in + -; operands 1-19, or
2-9 around ``*``; every intermediate and the answer between 0 and 99) belongs to exactly one split by a stable
hash of its text: ``train`` (~65%, SFT demonstrations), ``feedback`` (~25%, RL prompts and preference pairs)
and ``eval`` (~10%, held out). The seed only picks and orders examples. Evaluated left to right (a ``*`` only
ever comes first, so that is also the usual precedence). Short enough for the tiny byte model on CPU:
prompts <= 9 bytes, responses <= 25 bytes.

``math_sloppy`` is the SFT data with the same story as ``addition_sloppy``: five demonstrations per prompt,
three of which drop the carry (or the borrow) in the second step when it has one (22-9 -> "22-9=23"), so
greedy decoding of the SFT model is wrong exactly there, while samples are sometimes right: room for RL with
the ``math_verify`` reward (and for DPO/KTO on ``math_pairs``).

Source names: ``builtin:math:train``, ``builtin:math_sloppy:train``, ``builtin:math_pairs:feedback``,
``builtin:math_prompts:eval:256``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

import numpy as np

from jalign.data.formats import PreferenceExample, PromptExample, SFTExample

SPLITS = ("train", "feedback", "eval")
EVAL_FRACTION_PER_MILLE = 100
FEEDBACK_FRACTION_PER_MILLE = 250
DEMONSTRATORS = 5
SLOPPY_DEMONSTRATORS = 3
MAX_VALUE = 99

Problem = tuple  # (a, op1, b, op2, c)


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def split_of(problem: Problem) -> str:
    """The split of a problem, by a stable hash of its text (not Python's salted ``hash``)."""
    h = int.from_bytes(hashlib.sha256(prompt_for(problem).encode()).digest()[:4], "little") % 1000
    if h < EVAL_FRACTION_PER_MILLE:
        return "eval"
    return "feedback" if h < EVAL_FRACTION_PER_MILLE + FEEDBACK_FRACTION_PER_MILLE else "train"


def _all_problems() -> list[Problem]:
    out = []
    for op1 in "+-*":
        first = range(2, 10) if op1 == "*" else range(1, 20)
        for a in first:
            for b in first:
                r1 = _apply(a, op1, b)
                if not 0 <= r1 <= MAX_VALUE:
                    continue
                for op2 in "+-":
                    for c in range(1, 20):
                        r2 = _apply(r1, op2, c)
                        if 0 <= r2 <= MAX_VALUE:
                            out.append((a, op1, b, op2, c))
    return out


_POOL: dict[str, list[Problem]] = {}


def _pool(split: str) -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not _POOL:
        for p in _all_problems():
            _POOL.setdefault(split_of(p), []).append(p)
    return _POOL[split]


def _problems(split: str, n: Optional[int], seed: int) -> list[Problem]:
    pool = _pool(split)
    if n is not None and n > len(pool):
        raise ValueError(f"math {split} split has only {len(pool)} distinct problems, asked for {n}")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def prompt_for(problem: Problem) -> str:
    a, op1, b, op2, c = problem
    return f"{a}{op1}{b}{op2}{c}="


def answer_of(problem: Problem) -> int:
    a, op1, b, op2, c = problem
    return _apply(_apply(a, op1, b), op2, c)


def parse_prompt(prompt: str) -> Problem:
    """The problem of a prompt such as ``"7+15-9="`` (the last one in the text); no ``eval``."""
    found = re.findall(r"(\d+)\s*([-+*])\s*(\d+)\s*([-+])\s*(\d+)\s*=", prompt)
    if not found:
        raise ValueError(f"not a tiny math prompt: {prompt!r}")
    a, op1, b, op2, c = found[-1]
    return int(a), op1, int(b), op2, int(c)


def has_carry(problem: Problem) -> bool:
    """Whether the second step carries (r1 + c with units >= 10) or borrows (r1 - c with smaller units)."""
    a, op1, b, op2, c = problem
    r1 = _apply(a, op1, b)
    return (r1 % 10 + c % 10 >= 10) if op2 == "+" else (r1 % 10 < c % 10)


def _sloppy_second(problem: Problem) -> int:
    """The second step with the carry dropped (22+9 -> 21) or the borrow forgotten (22-9 -> 23)."""
    a, op1, b, op2, c = problem
    r1 = _apply(a, op1, b)
    return _apply(r1, op2, c) + (-10 if op2 == "+" else 10)


def worked(problem: Problem, second: Optional[int] = None) -> str:
    """The worked response; ``second`` overrides the result of the second step (a wrong demonstration)."""
    a, op1, b, op2, c = problem
    r1 = _apply(a, op1, b)
    r2 = _apply(r1, op2, c) if second is None else second
    return f"{a}{op1}{b}={r1}\n{r1}{op2}{c}={r2}\n#### {r2}"


def math_sft(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    """Correct worked demonstrations; ``n=None``: the whole split."""
    return [SFTExample(prompt=prompt_for(p), response=worked(p), source=f"builtin:math:{split}")
            for p in _problems(split, n, seed)]


def math_sloppy(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    """``DEMONSTRATORS`` demonstrations of each of ``n`` prompts, ``SLOPPY_DEMONSTRATORS`` of which drop the
    second step's carry/borrow when it has one (the error is carried into the answer line), seeded order.
    A sloppy result outside 0..99 is replaced by the correct one."""
    out = []
    for p in _problems(split, n, seed):
        for d in range(DEMONSTRATORS):
            wrong = _sloppy_second(p)
            sloppy = d < SLOPPY_DEMONSTRATORS and has_carry(p) and 0 <= wrong <= MAX_VALUE
            out.append(SFTExample(prompt=prompt_for(p), response=worked(p, wrong if sloppy else None),
                                  source=f"builtin:math_sloppy:{split}"))
    order = np.random.default_rng(seed + 2).permutation(len(out))
    return [out[i] for i in order]


def math_prompts(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PromptExample]:
    """Prompts with their reference answers (for ``math_verify`` / generation-based evaluation)."""
    return [PromptExample(prompt_for(p), str(answer_of(p)), source=f"builtin:math_prompts:{split}")
            for p in _problems(split, n, seed)]


def _wrong_answers(p: Problem, salt: int) -> list[int]:
    right = answer_of(p)
    cands = [_sloppy_second(p) if has_carry(p) else right + (10 if p[3] == "+" else -10),
             right + (1 if salt % 2 else -1), right + (2 if salt % 3 else -2)]
    return list(dict.fromkeys(w for w in cands if w != right and 0 <= w <= MAX_VALUE))


def math_pairs(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[PreferenceExample]:
    """Preference pairs: chosen = the correct worked solution, rejected = the same work with a wrong second
    step (a carry error, or off by 1 or 2), rewards 1 / 0; one pair per distinct wrong answer, seeded order."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for p in _problems(split, n, seed):
        salt = int(rng.integers(0, 1 << 30))
        out += [PreferenceExample(prompt_for(p), worked(p), worked(p, w), 1.0, 0.0,
                                  source=f"builtin:math_pairs:{split}") for w in _wrong_answers(p, salt)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


BUILTIN = {  # merged into jalign.data.tiny.BUILTIN: name -> (generator, data kinds it can serve)
    "math": (math_sft, ("sft",)),
    "math_sloppy": (math_sloppy, ("sft",)),
    "math_pairs": (math_pairs, ("preference",)),
    "math_prompts": (math_prompts, ("prompt",)),
}
