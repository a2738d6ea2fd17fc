"""The tiny verifiable-math task: disjoint stable splits, correct worked answers (checked independently),
the sloppy demonstrators, pairs and prompts through the builtin registry, and the math_verify reward on them."""
import re

import numpy as np
import pytest

from jalign.data import tiny_math as T
from jalign.data.formats import DataError
from jalign.data.tiny import load_builtin
from jalign.rewards import get_reward


def _solve(prompt):  # an independent left-to-right evaluator of "a op b op c="
    a, op1, b, op2, c = re.fullmatch(r"(\d+)([-+*])(\d+)([-+])(\d+)=", prompt).groups()
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    r1 = ops[op1](int(a), int(b))
    return r1, ops[op2](r1, int(c))


def test_splits_disjoint_stable_and_seed_independent():
    pools = {s: {T.prompt_for(p) for p in T._pool(s)} for s in T.SPLITS}
    assert not (pools["train"] & pools["feedback"]) and not (pools["train"] & pools["eval"])
    assert not (pools["feedback"] & pools["eval"])
    total = sum(len(v) for v in pools.values())
    assert abs(len(pools["eval"]) / total - 0.10) < 0.02 and abs(len(pools["feedback"]) / total - 0.25) < 0.02
    for seed in (0, 5):
        for s in T.SPLITS:
            assert {e.prompt for e in T.math_prompts(s, 200, seed)} <= pools[s]
    assert [e.prompt for e in T.math_sft("eval", 20, 1)] == [e.prompt for e in T.math_sft("eval", 20, 1)]
    assert [e.prompt for e in T.math_sft("eval", 20, 1)] != [e.prompt for e in T.math_sft("eval", 20, 2)]
    with pytest.raises(ValueError, match="only"):
        T.math_sft("eval", 10 ** 6)


def test_worked_answers_are_right_and_short():
    for e in T.math_sft("train"):
        r1, r2 = _solve(e.prompt)
        a, op1, b, op2, c = T.parse_prompt(e.prompt)
        assert e.response == f"{a}{op1}{b}={r1}\n{r1}{op2}{c}={r2}\n#### {r2}"
        assert 0 <= r1 <= 99 and 0 <= r2 <= 99 and len(e.prompt) <= 9 and len(e.response) <= 25
    for e in T.math_prompts("eval"):
        assert e.answer == str(_solve(e.prompt)[1])
    with pytest.raises(ValueError, match="not a tiny math prompt"):
        T.parse_prompt("hello")


def test_sloppy_demonstrators():
    ex = T.math_sloppy("train", 300, seed=3)
    assert len(ex) == 300 * T.DEMONSTRATORS
    by_prompt = {}
    for e in ex:
        by_prompt.setdefault(e.prompt, []).append(e.response)
    n_carry = 0
    for prompt, responses in by_prompt.items():
        r2 = _solve(prompt)[1]
        right = sum(r.endswith(f"#### {r2}") for r in responses)
        p = T.parse_prompt(prompt)
        wrong = T._sloppy_second(p)
        if T.has_carry(p) and 0 <= wrong <= 99:
            n_carry += 1
            assert right == T.DEMONSTRATORS - T.SLOPPY_DEMONSTRATORS
            assert sum(r.endswith(f"={wrong}\n#### {wrong}") for r in responses) == T.SLOPPY_DEMONSTRATORS
        else:
            assert right == T.DEMONSTRATORS
    assert 0.2 < n_carry / len(by_prompt) < 0.7


def test_builtin_registry_and_math_verify():
    sft = load_builtin("builtin:math:train:8", "sft")
    prompts = load_builtin("builtin:math_prompts:feedback:16", "prompt")
    pairs = load_builtin("builtin:math_pairs:feedback:16", "preference")
    assert len(sft) == 8 and len(prompts) == 16 and len(pairs) >= 16
    with pytest.raises(DataError, match="provides sft data, not prompt"):
        load_builtin("builtin:math:train", "prompt")
    verify, fmt = get_reward("math_verify"), get_reward("format")
    for e in load_builtin("builtin:math:eval:50", "sft"):
        assert verify(e.prompt, e.response, str(_solve(e.prompt)[1])) == 1.0 and fmt(e.prompt, e.response) == 1.0
    for p in pairs:
        ans = str(_solve(p.prompt)[1])
        assert verify(p.prompt, p.chosen, ans) == 1.0 and verify(p.prompt, p.rejected, ans) == 0.0
        assert p.chosen != p.rejected and p.chosen_reward == 1.0 and p.rejected_reward == 0.0
    # every preference prompt comes from the feedback split
    feedback = {T.prompt_for(q) for q in T._pool("feedback")}
    assert {p.prompt for p in pairs} <= feedback
    assert np.mean([T.has_carry(T.parse_prompt(p.prompt)) for p in prompts]) > 0
