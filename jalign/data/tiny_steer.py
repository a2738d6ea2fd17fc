"""More data of the tiny addition task: unpaired labels (KTO) and two attributes with a ground truth (SteerLM).

Registered in ``jalign.data.tiny.BUILTIN`` (same splits and prompts as the rest of the task):

``addition_unpaired`` (unpaired)  the preference pairs of a split turned into unpaired labels as TRL's
    ``unpair_preference_dataset`` does: each pair gives its chosen answer labelled desirable and its
    rejected one labelled undesirable (so the right answer of a prompt appears once per pair).
``addition_steer_rm`` (reward)  labelled data for the attribute regression model. Two attributes with a
    ground truth: ``correctness`` (4 the right sum, 0 a wrong one) and ``verbosity`` (0 the answer alone,
    4 the answer with its working). Per prompt: the right answer and a carry error (dropped or invented),
    each said tersely and with its working, and one wrong digit said tersely::

        37+48=  "85"                                   correctness 4, verbosity 0
                "7+8=15, carry 1, 3+4+1=8 -> 85"       correctness 4, verbosity 4
                "75" / "7+8=15, 3+4=7 -> 75"           correctness 0 (the carry forgotten)
                "82"                                   correctness 0 (a wrong digit)

    A worked answer is always its own working carried out (a wrong one has the carry error in its steps).
    A wrong final digit after correct working is left out on purpose: the tiny regression model learns what
    it can see in the text (a "=15," without "carry 1") within a few hundred steps but not to check a sum,
    so such items made every correctly worked answer ambiguous (it scored them all ~2 of 4). Terse answers
    can only be judged by doing the sum, which it learns only a little (see benchmarks/demos.py).

``addition_steer_sloppy`` (sft)  SteerLM's SFT data before annotation: ``addition_sloppy``'s five
    demonstrators per prompt (three forget the carry), each demonstration said tersely or with its working
    (a seeded coin), and no labels: the regression model annotates them (``jalign annotate``).
``addition_steer`` (steer)  held-out prompts with the right, terse answer, labelled correctness 4 and
    verbosity 0 (SteerLM's eval data).

:func:`true_attributes` gives the ground truth of any response (to check an annotation), :func:`answer_correct`
scores a response of either form by its final answer (a rule reward: ``jalign.data.tiny_steer:answer_correct``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from jalign.data.formats import RewardExample, SFTExample, UnpairedExample

CORRECT, WRONG = 4.0, 0.0
TERSE, VERBOSE = 0.0, 4.0
_ARROW = " -> "


def working(a: int, b: int, carry: Optional[bool] = None) -> str:
    """The answer with its working; ``carry`` overrides the carry decision (False on a carry problem forgets
    it, True on one without invents it), and the result follows the working."""
    ua, ub, ta, tb = a % 10, b % 10, a // 10, b // 10
    units = ua + ub
    c = units >= 10 if carry is None else carry
    tens = ta + tb + int(c)
    total = tens * 10 + units % 10
    if c:
        return f"{ua}+{ub}={units}, carry 1, {ta}+{tb}+1={tens}{_ARROW}{total}"
    return f"{ua}+{ub}={units}, {ta}+{tb}={tens}{_ARROW}{total}"


def final_answer(response: str) -> str:
    """The number a response ends with: after the last ``->`` of a worked answer, else the whole text."""
    return response.rsplit("->", 1)[-1].strip()


def answer_correct(prompt: str, response: str, reference: Optional[str] = None) -> float:
    """1.0 if the response's final answer is the right sum (terse or worked), else 0.0."""
    from jalign.data.tiny import answer_for

    right = final_answer(reference) if reference is not None else answer_for(prompt)
    return float(final_answer(response) == right)


def true_attributes(prompt: str, response: str) -> dict:
    """The ground truth of a response: ``{"correctness": 4 | 0, "verbosity": 4 | 0}``."""
    from jalign.data.tiny import answer_for

    return {"correctness": CORRECT if final_answer(response) == answer_for(prompt) else WRONG,
            "verbosity": VERBOSE if "->" in response else TERSE}


def _both_forms(text_terse: str, text_worked: str, correct: bool):
    c = CORRECT if correct else WRONG
    return [(text_terse, {"correctness": c, "verbosity": TERSE}),
            (text_worked, {"correctness": c, "verbosity": VERBOSE})]


def addition_unpaired(split: str = "feedback", n: Optional[int] = None, seed: int = 0) -> list[UnpairedExample]:
    from jalign.data.tiny import preference_pairs

    out = []
    for p in preference_pairs(split, n, seed):
        out += [UnpairedExample(p.prompt, p.chosen, True, source=f"builtin:addition_unpaired:{split}"),
                UnpairedExample(p.prompt, p.rejected, False, source=f"builtin:addition_unpaired:{split}")]
    return out


def addition_steer_rm(split: str = "feedback", n: Optional[int] = None, seed: int = 0) -> list[RewardExample]:
    from jalign.data.tiny import _carry_error, _pairs, has_carry, prompt_for, wrong_answer

    rng = np.random.default_rng(seed + 3)
    out = []
    for a, b in _pairs(split, n, seed):
        right = str(a + b)
        items = _both_forms(right, working(a, b), True)
        items += _both_forms(_carry_error(a, b), working(a, b, carry=not has_carry(a, b)), False)
        wrong = wrong_answer(a, b, int(rng.integers(1, 4)), int(rng.integers(0, 1 << 30)))
        items.append((wrong, {"correctness": WRONG, "verbosity": TERSE}))
        out += [RewardExample(prompt_for(a, b), text, dict(attrs), source=f"builtin:addition_steer_rm:{split}")
                for text, attrs in items]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def addition_steer_sloppy(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    from jalign.data.tiny import DEMONSTRATORS, SLOPPY_DEMONSTRATORS, _dropped_carry, _pairs, has_carry, prompt_for

    rng = np.random.default_rng(seed + 4)
    out = []
    for a, b in _pairs(split, n, seed):
        for d in range(DEMONSTRATORS):
            sloppy = d < SLOPPY_DEMONSTRATORS and has_carry(a, b)
            worked = bool(rng.integers(0, 2))
            if worked:
                text = working(a, b, carry=False) if sloppy else working(a, b)
            else:
                text = _dropped_carry(a, b) if sloppy else str(a + b)
            out.append(SFTExample(prompt=prompt_for(a, b), response=text, source=f"builtin:addition_steer_sloppy:{split}"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def addition_steer(split: str = "eval", n: Optional[int] = None, seed: int = 0) -> list[RewardExample]:
    from jalign.data.tiny import _pairs, prompt_for

    return [RewardExample(prompt_for(a, b), str(a + b), {"correctness": CORRECT, "verbosity": TERSE},
                          source=f"builtin:addition_steer:{split}") for a, b in _pairs(split, n, seed)]


BUILTIN = {  # name -> (generator, data kinds it can serve)
    "addition_unpaired": (addition_unpaired, ("unpaired",)),
    "addition_steer_rm": (addition_steer_rm, ("reward", "steer")),
    "addition_steer_sloppy": (addition_steer_sloppy, ("sft",)),
    "addition_steer": (addition_steer, ("steer", "reward")),
}

