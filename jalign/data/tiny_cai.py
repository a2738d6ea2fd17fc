"""Constitutional AI on the tiny addition task: data to train a small critic / judge model, and red-team prompts.

A rule must not stand in for the AI in the CAI demonstration, so the critic and the judge are a model trained
on examples the project generates here, rendered with the default templates of
:mod:`jalign.data.constitution` and the ``builtin:tiny`` constitution:

* critique: ``"37+48=75\\nCarry right?"`` -> ``"the carry was dropped; 85"`` (what is wrong, then the right sum);
* revision: ``"37+48=75\\nCarry right?\\nthe carry was dropped; 85\\nFix it."`` -> ``"85"``;
* judging:  ``"37+48=\\nWhich is right?\\nA: 75\\nB: 85"`` -> ``"B"`` (both orders of every pair).

The answers critiqued are the right sum and the plausible wrong ones of :mod:`jalign.data.tiny` (a carry
error either way, a wrong units or tens digit, swapped digits) plus a random number. Sources:
``builtin:cai_critic:SPLIT[:N]`` (SFT examples; N prompts, each giving ~15 examples, shuffled) and
``builtin:cai_red_team:SPLIT[:N]`` (prompt examples with a carry: where the sloppy SFT policy fails).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from jalign.data.constitution import CRITIQUE_TEMPLATE, JUDGE_TEMPLATE, REVISION_TEMPLATE, TINY, render
from jalign.data.formats import PromptExample, SFTExample

CHOICES = ("A", "B")


def _operands(prompt: str) -> tuple[int, int]:
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    return int(a), int(b)


def _prompts(split: str, n: Optional[int], seed: int) -> list:
    from jalign.data.tiny import addition_prompts

    return addition_prompts(split, n, seed)


def critique_for(a: int, b: int, answer: str) -> str:
    """What the ideal critic says of ``answer`` to ``a+b=``: the kind of error, then the right sum."""
    from jalign.data.tiny import has_carry

    s = str(a + b)
    answer = answer.strip()
    if answer == s:
        return f"no error; {s}"
    if answer == str(a + b - 10) and has_carry(a, b):
        return f"the carry was dropped; {s}"
    if answer == str(a + b + 10) and not has_carry(a, b):
        return f"a carry was invented; {s}"
    if len(answer) == len(s) and answer.isdigit():
        diff = [i for i in range(len(s)) if answer[i] != s[i]]
        if diff == [len(s) - 1]:
            return f"the units digit is wrong; {s}"
        if diff == [len(s) - 2]:
            return f"the tens digit is wrong; {s}"
        if len(s) >= 2 and answer == s[:-2] + s[-1] + s[-2]:
            return f"the digits are swapped; {s}"
    return f"the sum is wrong; {s}"


def _answers(a: int, b: int, rng: np.random.Generator) -> list[str]:
    from jalign.data.tiny import WRONG_KINDS, wrong_answer

    out = [str(a + b)]
    for kind in range(len(WRONG_KINDS)):
        out.append(wrong_answer(a, b, kind, int(rng.integers(0, 1 << 30))))
    out.append(str(int(rng.integers(10, 200))))
    return list(dict.fromkeys(out))  # distinct, the right answer first


def critic_examples(split: str = "train", n: Optional[int] = None, seed: int = 0) -> list[SFTExample]:
    """Critique, revision and judging examples for ``n`` prompts of ``split`` (see the module docstring)."""
    rng = np.random.default_rng(seed + 11)
    source = f"builtin:cai_critic:{split}"
    out = []
    for ex in _prompts(split, n, seed):
        a, b = _operands(ex.prompt)
        right = str(a + b)
        answers = _answers(a, b, rng)
        for answer in answers:
            p = TINY[int(rng.integers(len(TINY)))]
            fields = dict(prompt=ex.prompt, response=answer, critique_request=p.critique_request, principle=p.name)
            critique = critique_for(a, b, answer)
            out.append(SFTExample(prompt=render(CRITIQUE_TEMPLATE, "critique_template", **fields),
                                  response=critique, source=source))
            out.append(SFTExample(prompt=render(REVISION_TEMPLATE, "revision_template", critique=critique,
                                                revision_request=p.revision_request, **fields),
                                  response=right, source=source))
        for wrong in answers[1:]:
            for right_first in (True, False):
                p = TINY[int(rng.integers(len(TINY)))]
                first, second = (right, wrong) if right_first else (wrong, right)
                out.append(SFTExample(
                    prompt=render(JUDGE_TEMPLATE, "judge_template", prompt=ex.prompt, response_a=first,
                                  response_b=second, judge_question=p.judge_question, principle=p.name),
                    response=CHOICES[0] if right_first else CHOICES[1], source=source))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def red_team_prompts(split: str = "feedback", n: Optional[int] = None, seed: int = 0) -> list[PromptExample]:
    """Addition prompts with a carry out of the units (the sloppy policy's weak spot), with their answers."""
    from jalign.data.tiny import has_carry

    pool = [ex for ex in _prompts(split, None, seed) if has_carry(*_operands(ex.prompt))]
    if n is not None and n > len(pool):
        raise ValueError(f"cai_red_team {split} split has only {len(pool)} prompts with a carry, asked for {n}")
    return [PromptExample(ex.prompt, ex.answer, source=f"builtin:cai_red_team:{split}") for ex in pool[:n]]


BUILTIN = {
    "cai_critic": (critic_examples, ("sft",)),
    "cai_red_team": (red_team_prompts, ("prompt",)),
}
