"""Rule rewards: the math answer verifier on a table of answer/reference cases, extraction, the format and
length rewards, resolution by name and import path (with its errors), extra JSONL fields, and the weighted
combiner."""
import sys
import time

import numpy as np
import pytest

from jalign import answers
from jalign.rewards import (REWARDS, Reward, RewardError, combine_rewards, get_reward, parse_reward_specs,
                            register_reward, score_rules)

# (response, reference, expected verdict)
VERIFIER_CASES = [
    # integers, signs, formatting
    ("#### 72", "72", True),
    ("The answer is 72.", "72", True),
    ("#### 72", "73", False),
    ("#### -5", "-5", True),
    ("#### -5", "5", False),
    ("It drops to −5? no: #### - 5", "-5", True),
    ("#### 007", "7", True),
    ("#### +7", "7", True),
    # thousands separators, decimals
    ("#### 1,234", "1234", True),
    ("#### 1,234,567", "1234567", True),
    ("#### 1,23", "123", False),          # not a thousands separator: malformed
    ("#### 3.50", "3.5", True),
    ("#### 3.0", "3", True),
    ("#### .5", "0.5", True),
    ("#### 0.333", "1/3", False),         # exact by default
    ("#### 2.5", "2.6", False),
    # fractions and simple expressions
    ("#### 1/2", "0.5", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{\\frac12}", "1/2", True),
    ("#### 6/8", "3/4", True),
    ("#### -\\frac{2}{4}", "-0.5", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{3 \\times 4}", "12", True),
    ("\\boxed{\\sqrt{16}}", "4", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("#### 1/0", "0", False),             # division by zero: malformed
    # percentages, units, currency
    ("#### 50%", "50", True),
    ("#### 50%", "0.5", True),
    ("#### 50\\%", "50", True),
    ("#### 40%", "50", False),
    ("#### $1,200", "1200", True),
    ("#### 12 apples", "12", True),
    ("\\boxed{12\\text{ cm}}", "12", True),
    ("#### 90^\\circ", "90", True),
    # boxed and trailing text, last number, equations
    ("so we get \\boxed{5} in the end", "5", True),
    ("\\boxed{3} wait, actually \\boxed{4}", "4", True),
    ("I think it is 8, no, 9", "9", True),
    ("x = 5", "5", True),
    ("The final answer: 15.", "15", True),
    ("first 12-3=9", "9", True),          # a subtraction is not a negative number
    ("#### 42\nand some trailing chatter", "42", True),
    # symbolic equivalence
    ("\\boxed{2(x+1)}", "2x+2", True),
    ("\\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    ("\\boxed{x^2 + 1}", "(x+1)^2", False),
    ("\\boxed{\\frac{1}{x}}", "x^{-1}", True),
    # malformed / missing
    ("no number here", "5", False),
    ("", "5", False),
    ("#### ", "5", False),
    ("\\boxed{", "5", False),
    ("#### 5", "", False),
    ("#### 2^999999999", "1", False),      # bounded: refused, not computed
    ("#### " + "(" * 60 + "1" + ")" * 60, "1", False),  # nested too deeply
    ("#### __import__('os')", "0", False),  # text, never evaluated
    ("#### " + "9" * 5000, "9", False),     # an absurdly long answer is refused
    # GSM8K-style reference
    ("#### 18", "Janet sells 16 - 3 - 4 = 9 eggs... 9 * 2 = 18\n#### 18", True),
]


@pytest.mark.parametrize("response,reference,expected", VERIFIER_CASES)
def test_math_verify_table(response, reference, expected):
    assert REWARDS["math_verify"]("prompt", response, reference) == float(expected)


def test_table_is_large_and_balanced():
    assert len(VERIFIER_CASES) >= 40
    assert sum(e for *_, e in VERIFIER_CASES) >= 20 and sum(not e for *_, e in VERIFIER_CASES) >= 10


def test_extraction_methods():
    t = "step 3 gives 7\n#### 8 \\boxed{9}"
    assert answers.extract_answer(t) == "9"
    assert answers.extract_answer(t, ("gsm8k",)) == "8 \\boxed{9}"
    assert answers.extract_answer(t, ("last_number",)) == "9"
    assert answers.extract_answer("answer is 4. Then 5", ("answer_is",)) == "4. Then 5"
    assert answers.extract_answer("nothing", ("boxed", "gsm8k")) is None
    assert answers.extract_last_number("ratio 3/4") == "3/4"
    assert answers.extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="unknown answer extraction"):
        answers.extract_answer("x", ("nope",))
    # configurable: only the #### line counts
    fn = get_reward("math_verify", {"extract": ["gsm8k"]})
    assert fn("p", "the answer is 5", "5") == 0.0 and fn("p", "#### 5", "5") == 1.0
    tol = get_reward("math_verify", {"rel_tol": 1e-3})
    assert tol("p", "#### 0.3333", "1/3") == 1.0 and tol("p", "#### 0.34", "1/3") == 0.0


def test_verifier_is_fast_and_never_evals(monkeypatch):
    import builtins

    def no_eval(*a, **k):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    fn = REWARDS["math_verify"]
    t0 = time.perf_counter()
    for response, reference, _ in VERIFIER_CASES * 5:
        fn("p", response, reference)
    per_call = (time.perf_counter() - t0) / (5 * len(VERIFIER_CASES))
    assert per_call < 0.05, per_call  # generous bound on a shared machine: catches pathological blow-ups only
    t0 = time.perf_counter()
    long = ("so 3 apples and 4 more words, maybe 12-3 = 9 or \\frac{1}{2}\n" * 4000) + "The answer is 5."
    assert fn("p", long, "5") == 1.0  # ~250 KB of chatter
    fn("p", "answer is " + "x " * 100_000, "5")  # one huge line: whatever the verdict, it is quick
    assert fn("p", "9" * 200_000, "9") == 0.0
    assert fn("p", "\\boxed{" * 20_000, "5") == 0.0  # unbalanced braces: one linear pass, not quadratic
    assert fn("p", "\\boxed{5} then \\boxed{", "5") == 1.0  # a truncated last box falls back to the previous
    assert time.perf_counter() - t0 < 5.0


def test_rewards_import_no_symbolic_package():
    import subprocess

    code = ("import jalign.rewards, sys; "
            "bad = [m for m in ('sympy', 'math_verify', 'jax') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_format_and_length_rewards():
    fmt = REWARDS["format"]
    assert fmt("p", "3+4=7\n#### 7", None) == 1.0
    assert fmt("p", "3+4=7\n#### 7\n", None) == 1.0
    assert fmt("p", "#### 7 then more\nchatter", None) == 0.0
    assert fmt("p", "7", None) == 0.0
    tags = get_reward("format", {"pattern": r"<think>.+?</think>\s*<answer>.+?</answer>", "fullmatch": True})
    assert tags("p", "<think>a</think> <answer>5</answer>") == 1.0
    assert tags("p", "<answer>5</answer>") == 0.0
    with pytest.raises(RewardError, match="invalid regular expression"):
        get_reward("format", {"pattern": "("})("p", "x", None)
    ln = get_reward("length", {"max_chars": 10, "min_chars": 2, "slack": 10})
    assert ln("p", "12345", None) == 1.0
    assert ln("p", "1", None) == 0.5
    assert ln("p", "x" * 15, None) == 0.5 and ln("p", "x" * 30, None) == 0.0
    with pytest.raises(RewardError, match="needs option.*max_chars"):
        get_reward("length")


def test_get_reward_by_name_and_path(tmp_path, monkeypatch):
    assert isinstance(get_reward("exact_match"), Reward)
    assert get_reward("exact_match")("2+2=", " 4 ", "4") == 1.0
    f = tmp_path / "my_rewards.py"
    f.write_text("def starts(prompt, response, reference, *, prefix='#'):\n"
                 "    return float(response.startswith(prefix))\n"
                 "def by_unit(prompt, response, reference, *, fields):\n"
                 "    return float(fields.get('unit', '?') in response)\n"
                 "def two_args(prompt, response):\n    return 1.0\n"
                 "NOT_FN = 3\n")
    r = get_reward(f"{f}:starts", {"prefix": "ok"})
    assert r("p", "ok go", None) == 1.0 and r("p", "go", None) == 0.0
    # the example's other JSONL fields reach a function that asks for them
    u = get_reward(f"{f}:by_unit")
    assert u.wants_fields and u("p", "12 cm", "12", {"unit": "cm"}) == 1.0 and u("p", "12", "12") == 0.0
    # module:function
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:starts")("p", "#x", None) == 1.0
    errors = [
        (("exact_mach",), "algorithm.reward_fn: unknown reward 'exact_mach'; did you mean 'exact_match'"),
        ((f"{tmp_path}/missing.py:fn",), "does not exist"),
        (("no_such_module_xyz:fn",), "importing module 'no_such_module_xyz'.*ModuleNotFoundError"),
        ((f"{f}:nope",), "has no attribute 'nope'"),
        ((f"{f}:NOT_FN",), "is not callable"),
        ((f"{f}:two_args",), r"must take \(prompt, response, reference\)"),
        ((f"{f}:starts", {"prefx": "a"}), "has no option 'prefx'; did you mean 'prefix'"),
        (("exact_match", {"fields": 1}), "has no option 'fields'"),
    ]
    for args, msg in errors:
        with pytest.raises(RewardError, match=msg):
            get_reward(*args)
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match="importing reward file.*RuntimeError: boom"):
        get_reward(f"{bad}:fn", key="algorithm.rewards[1].fn")
    with pytest.raises(RewardError, match=r"^algorithm.rewards\[1\].fn"):
        get_reward(f"{bad}:fn", key="algorithm.rewards[1].fn")


def test_registered_three_argument_functions_still_work():
    @register_reward("_test_first_digit")
    def first_digit(prompt, response, reference):
        return float(response[:1].isdigit())

    try:
        r = get_reward("_test_first_digit")
        assert not r.wants_fields
        assert r("p", "7a", None) == 1.0 and r("p", "a7", None, {"x": 1}) == 0.0
    finally:
        REWARDS.pop("_test_first_digit")


def test_reward_specs_and_combiner():
    specs = parse_reward_specs([{"fn": "math_verify", "weight": 1.0}, {"fn": "format", "weight": 0.2},
                                {"model": "runs/rm", "weight": 0.5}])
    assert [(s.name, s.weight, s.fn, s.model) for s in specs] == [
        ("math_verify", 1.0, "math_verify", None), ("format", 0.2, "format", None), ("rm", 0.5, None, "runs/rm")]
    two = parse_reward_specs([{"model": "runs/a"}, {"model": "runs/b", "name": "gold"}])
    assert [s.name for s in two] == ["rm_a", "gold"] and two[0].weight == 1.0
    bad = [
        ([], "non-empty list"),
        ([{"fn": "math_verify", "model": "x"}], r"rewards\[0\]: give exactly one"),
        ([{"weight": 1}], "exactly one"),
        ([{"fn": "math_verify", "wieght": 1}], "unknown field 'wieght'; did you mean 'weight'"),
        ([{"fn": "math_verify", "weight": "big"}], r"rewards\[0\].weight: expected a finite number"),
        ([{"fn": "math_verify"}, {"fn": "math_verfy"}], r"rewards\[1\].fn: unknown reward 'math_verfy'"),
        ([{"fn": "format"}, {"fn": "format"}], "used twice"),
        ([{"model": "runs/rm", "options": {"a": 1}}], "only rule rewards"),
        ([{"fn": "length"}], r"rewards\[0\].fn: reward 'length' needs option"),
    ]
    for entries, msg in bad:
        with pytest.raises(RewardError, match=msg):
            parse_reward_specs(entries)

    rules = {s.name: get_reward(s.fn, s.options) for s in specs if s.fn}
    responses = ["3+4=7\n#### 7", "the answer is 7", "#### 8"]
    cols = score_rules(rules, ["q"] * 3, responses, ["7", "7", "7"])
    assert cols["math_verify"].tolist() == [1.0, 1.0, 0.0] and cols["format"].tolist() == [1.0, 0.0, 1.0]
    cols["rm"] = np.array([0.5, -1.0, 2.0], np.float32)
    total, comps = combine_rewards(cols, {s.name: s.weight for s in specs})
    np.testing.assert_allclose(total, [1.0 + 0.2 + 0.25, 1.0 - 0.5, 0.2 + 1.0], rtol=1e-6)
    assert set(comps) == {"math_verify", "format", "rm"} and comps["rm"].tolist() == [0.5, -1.0, 2.0]
    with pytest.raises(RewardError, match="missing \\['rm'\\]"):
        combine_rewards({"math_verify": cols["math_verify"]}, {"math_verify": 1.0, "rm": 1.0})
    with pytest.raises(RewardError, match="column 'rm' is not finite at index 1"):
        combine_rewards({"rm": np.array([0.0, np.nan])}, {"rm": 1.0})
    with pytest.raises(RewardError, match="column 'b' has shape"):
        combine_rewards({"a": np.zeros(3), "b": np.zeros(2)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(RewardError, match="reward 'boom' failed on example 0: ZeroDivisionError"):
        score_rules({"boom": Reward("boom", lambda p, r, a: 1 / 0)}, ["q"], ["r"], [None])
