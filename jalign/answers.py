"""Final-answer extraction and equivalence for verifiable math rewards (host side, standard library only).

Extraction (:func:`extract_answer`) tries, in a configurable order, ``boxed`` (the last ``\\boxed{...}`` /
``\\fbox{...}``, braces balanced), ``gsm8k`` (the text after the last ``####``, to the end of its line),
``answer_is`` (the last "answer is X" / "answer: X") and ``last_number`` (the last number in the text).

Equivalence (:func:`answers_equal`) parses both sides with a small recursive-descent parser of its own, never
``eval``: numbers (integers, decimals, thousands separators ``1,234``, a leading sign, ``%``), ``+ - * / ^``,
``\\frac{a}{b}``, ``\\cdot``, ``\\times``, ``\\div``, ``\\sqrt{}``, ``\\pi``, parentheses and implicit products
(``2x``, ``3(x+1)``), single-letter variables. Values are exact ``fractions.Fraction`` where possible (so
``0.5 == 1/2 == \\frac{1}{2} == 50%``), floats compared at 1e-9 relative where an irrational (sqrt, pi) or a
fractional power enters, and expressions with variables are compared at several random rational points
(polynomial identity testing: ``2(x+1)`` equals ``2x+2``). Units and trailing words are dropped
(``12 apples``), as are ``$``, ``\\text{...}`` and ``\\left``/``\\right``; ``x = 5`` compares ``5``. Anything else
(lists, intervals, words) is compared as normalised text. Input length, nesting depth, exponents and number
sizes are bounded, so adversarial model output cannot hang or exhaust the host.

Why not the ``math-verify`` package: its default extraction parses plain-text expressions with sympy's
``parse_expr``, which ``eval``s the (model-written) string, and its timeouts use ``signal.alarm``, which only
works in the main thread and replaces the process's SIGALRM handler.
"""
from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from typing import Optional, Sequence, Union

Value = Union[Fraction, float]
DEFAULT_EXTRACT = ("boxed", "gsm8k", "answer_is", "last_number")
MAX_LEN = 256          # characters of an answer string that are parsed at all
MAX_DEPTH = 32         # nesting of parentheses / braces
MAX_EXPONENT = 64      # |integer exponent|
MAX_BITS = 4096        # numerator / denominator size of any intermediate value
FLOAT_RTOL = 1e-9


class ParseError(ValueError):
    pass


# ----------------------------------------------------------------------------- extraction
def _brace_pairs(text: str) -> dict[int, int]:
    """Position of each '{' -> its matching '}', in one pass (linear even on adversarial input)."""
    stack, pairs = [], {}
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (``\\boxed 5`` also works)."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    if not starts:
        return None
    pairs = _brace_pairs(text) if "{" in text else {}
    for j in reversed(starts):
        if j < len(text) and text[j] == "{":
            if j in pairs:
                return text[j + 1:pairs[j]].strip()
            continue
        tail = re.match(r"[^\s$]+", text[j:j + MAX_LEN])
        if tail:
            return tail.group(0).strip()
    return None


def extract_gsm8k(text: str) -> Optional[str]:
    """The text after the last ``####`` (GSM8K's answer line), to the end of that line."""
    i = text.rfind("####")
    if i < 0:
        return None
    line = text[i + 4:].split("\n", 1)[0].strip()
    return line or None


def extract_answer_is(text: str) -> Optional[str]:
    """The last "(final) answer is X" or "answer: X", to the end of the line (a final period dropped)."""
    found = re.findall(r"(?i)\banswer\s*(?:is|:|=)\s*:?\s*([^\n]+)", text)
    if not found:
        return None
    return found[-1].strip().rstrip(".").strip() or None


_SIGN = r"(?:(?<![\w).])-)?"  # a minus is a sign only where it cannot be a subtraction (not in "12-3")
_NUMBER = re.compile(_SIGN + r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)%?")
# starts only at the beginning of a digit run and never backtracks into it: linear on long digit strings
_FRACTION_TEXT = re.compile(_SIGN + r"(?<!\d)\d++\s*/\s*\d+")


def extract_last_number(text: str) -> Optional[str]:
    """The last number in the text (``-3``, ``1,234.5``, ``40%``, ``.5``; ``3/4`` as a fraction)."""
    cands = [(m.start(), m.group(0)) for m in _FRACTION_TEXT.finditer(text)]
    cands += [(m.start(), m.group(0)) for m in _NUMBER.finditer(text)]
    if not cands:
        return None
    end = max(s + len(g) for s, g in cands)
    # of the candidates ending last, the longest (a fraction beats its denominator)
    best = max((c for c in cands if c[0] + len(c[1]) == end), key=lambda c: len(c[1]))
    return best[1].replace(" ", "")


EXTRACTORS = {"boxed": extract_boxed, "gsm8k": extract_gsm8k, "answer_is": extract_answer_is,
              "last_number": extract_last_number}


def extract_answer(text: str, methods: Sequence[str] = DEFAULT_EXTRACT) -> Optional[str]:
    """The final answer by the first of ``methods`` that finds one (see the module docstring), or None."""
    for name in methods:
        if name not in EXTRACTORS:
            raise ValueError(f"unknown answer extraction {name!r}; known: {sorted(EXTRACTORS)}")
        got = EXTRACTORS[name](text)
        if got:
            return got
    return None


# ----------------------------------------------------------------------------- normalisation
_UNITS = re.compile(r"(?:\s+[A-Za-z]{2,}\.?)+\s*$")


def normalize(s: str) -> str:
    """Strip what does not change a value: ``$``, ``\\text{..}``, spacing commands, ``\\left``/``\\right``,
    degrees, a final period, trailing words (units), and an ``lhs =`` prefix."""
    s = s.strip()
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}", " ", s)
    s = re.sub(r"\\[,;:! ]|\\quad|\\qquad|\\displaystyle|\\left|\\right|\\\$|\$", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "%").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = s.strip().rstrip(".").strip()
    s = _UNITS.sub("", s) if re.search(r"\d", s) else s
    return s.strip()


# ----------------------------------------------------------------------------- safe parser
_TOKEN = re.compile(r"\s*(?:(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d*|\.\d+|\d+)"
                    r"|(?P<cmd>\\[A-Za-z]+)|(?P<op>\*\*|[-+*/^()\[\]{}%×÷·])|(?P<var>[A-Za-z]))")
_CMD_OPS = {"\\cdot": "*", "\\times": "*", "\\div": "/"}


def _tokenize(s: str) -> list:
    out, i = [], 0
    s = s.rstrip()
    while i < len(s):
        m = _TOKEN.match(s, i)
        if not m or m.end() == i:
            raise ParseError(f"unexpected character {s[i:i + 1]!r}")
        i = m.end()
        kind = m.lastgroup
        tok = m.group(kind)
        if kind == "num":
            out.append(("num", Fraction(tok.replace(",", ""))))
        elif kind == "cmd":
            if tok in _CMD_OPS:
                out.append(("op", _CMD_OPS[tok]))
            elif tok in ("\\frac", "\\sqrt", "\\pi"):
                out.append(("cmd", tok))
            else:
                raise ParseError(f"unsupported command {tok}")
        elif kind == "op":
            out.append(("op", {"**": "^", "×": "*", "÷": "/", "·": "*"}.get(tok, tok)))
        else:
            out.append(("var", tok))
    return out


def _check(v: Value) -> Value:
    if isinstance(v, Fraction):
        if v.numerator.bit_length() > MAX_BITS or v.denominator.bit_length() > MAX_BITS:
            raise ParseError("number too large")
        return v
    if not math.isfinite(v):
        raise ParseError("not finite")
    return v


def _sqrt(v: Value) -> Value:
    if v < 0:
        raise ParseError("square root of a negative number")
    if isinstance(v, Fraction):
        rn, rd = math.isqrt(v.numerator), math.isqrt(v.denominator)
        if rn * rn == v.numerator and rd * rd == v.denominator:
            return Fraction(rn, rd)
    return math.sqrt(float(v))


def _pow(a: Value, b: Value) -> Value:
    if isinstance(b, Fraction) and b.denominator == 1:
        if abs(b.numerator) > MAX_EXPONENT:
            raise ParseError("exponent too large")
        if a == 0 and b < 0:
            raise ParseError("division by zero")
        if isinstance(a, Fraction) and max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(
                b.numerator) > MAX_BITS:
            raise ParseError("number too large")
        return _check(a ** int(b))
    if a <= 0 or abs(float(b)) > MAX_EXPONENT:
        raise ParseError("unsupported power")
    return _check(math.pow(float(a), float(b)))


class _Parser:
    """expr := term (('+'|'-') term)*;  term := unary (('*'|'/'|implicit) unary)*;
    unary := ('-'|'+') unary | power;  power := postfix ('^' unary)?;  postfix := atom '%'?"""

    def __init__(self, tokens, env):
        self.t, self.i, self.env, self.depth = tokens, 0, env, 0
        self.percent = False

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self, kind=None, val=None):
        k, v = self.peek()
        if k is None or (kind and k != kind) or (val is not None and v != val):
            raise ParseError(f"expected {val or kind}, got {v!r}")
        self.i += 1
        return v

    def parse(self) -> Value:
        v = self.expr()
        if self.i != len(self.t):
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return v

    def expr(self):
        v = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()
            w = self.term()
            v = _check(v + w if op == "+" else v - w)
        return v

    def _starts_atom(self):
        k, v = self.peek()
        return k in ("num", "var", "cmd") or (k == "op" and v in ("(", "[", "{"))

    def term(self):
        v = self.unary()
        while True:
            k, op = self.peek()
            if k == "op" and op in ("*", "/"):
                self.take()
                w = self.unary()
                if op == "/":
                    if w == 0:
                        raise ParseError("division by zero")
                    v = _check(v / w)
                else:
                    v = _check(v * w)
            elif self._starts_atom():  # implicit product: 2x, 3(x+1), 2\pi
                v = _check(v * self.power())
            else:
                return v

    def unary(self):
        if self.peek() == ("op", "-"):
            self.take()
            return -self.unary()
        if self.peek() == ("op", "+"):
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            return _pow(base, self.unary())
        return base

    def postfix(self):
        v = self.atom()
        if self.peek() == ("op", "%"):
            self.take()
            self.percent = True
            v = v / 100 if isinstance(v, Fraction) else v / 100.0
        return v

    def group(self, close):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")
        v = self.expr()
        self.take("op", close)
        self.depth -= 1
        return v

    def braced(self):
        if self.peek() == ("op", "{"):
            self.take()
            return self.group("}")
        k, v = self.peek()  # \frac12 : single-token arguments
        if k in ("num", "var"):
            self.take()
            if k == "num" and v.denominator == 1 and v >= 10:  # \frac12 -> 1 then 2
                digits = str(v.numerator)
                self.t.insert(self.i, ("num", Fraction(digits[1:])))
                return Fraction(digits[0])
            return v if k == "num" else self.env_value(v)
        raise ParseError("expected {")

    def env_value(self, name):
        if name not in self.env:
            raise ParseError(f"free variable {name}")
        return self.env[name]

    def atom(self):
        k, v = self.peek()
        if k == "num":
            self.take()
            return v
        if k == "var":
            self.take()
            return self.env_value(v)
        if k == "cmd":
            self.take()
            if v == "\\pi":
                return math.pi
            if v == "\\sqrt":
                return _sqrt(self.braced())
            num = self.braced()
            den = self.braced()
            if den == 0:
                raise ParseError("division by zero")
            return _check(num / den)
        if k == "op" and v in ("(", "[", "{"):
            self.take()
            return self.group({"(": ")", "[": "]", "{": "}"}[v])
        raise ParseError(f"unexpected {v!r}")


def parse_value(s: str, env: Optional[dict] = None) -> tuple[Value, bool]:
    """(value, had_percent) of an already-normalised answer string; raises ParseError (never evals)."""
    if len(s) > MAX_LEN:
        raise ParseError("answer too long")
    tokens = _tokenize(s)
    if not tokens:
        raise ParseError("empty")
    p = _Parser(tokens, env or {})
    return p.parse(), p.percent


def _variables(s: str) -> list[str]:
    return sorted({v for k, v in _tokenize(s) if k == "var"})


def _same(a: Value, b: Value, rel_tol: float) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and rel_tol == 0.0:
        return a == b
    return math.isclose(float(a), float(b), rel_tol=max(rel_tol, FLOAT_RTOL), abs_tol=1e-12)


def answers_equal(pred: Optional[str], ref: Optional[str], *, rel_tol: float = 0.0, points: int = 4,
                  seed: int = 0) -> bool:
    """Whether the predicted and the reference answer strings are mathematically the same (module docstring).

    ``rel_tol`` > 0 also accepts numbers within that relative tolerance (e.g. 0.333 for 1/3 with 1e-3). A
    percentage matches either its value or its number (``50%`` matches ``0.5`` and ``50``). With variables
    the two sides are compared at ``points`` random rational points (seeded: the verdict is deterministic).
    """
    if pred is None or ref is None or len(pred) > 4 * MAX_LEN or len(ref) > 4 * MAX_LEN:
        return False
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return False
    try:
        names = sorted(set(_variables(p)) | set(_variables(r)))
        if not names:
            (vp, pct_p), (vr, pct_r) = parse_value(p), parse_value(r)
            cands_p = [vp, vp * 100] if pct_p else [vp]
            cands_r = [vr, vr * 100] if pct_r else [vr]
            return any(_same(a, b, rel_tol) for a in cands_p for b in cands_r)
        rng = random.Random(seed)
        tried = 0
        for _ in range(points * 4):
            env = {n: Fraction(rng.randint(-97, 97), rng.randint(1, 13)) for n in names}
            try:
                a, b = parse_value(p, env)[0], parse_value(r, env)[0]
            except ParseError as e:
                if "division by zero" in str(e) or "negative" in str(e) or "power" in str(e):
                    continue  # a pole or a domain edge at this point: try another
                raise
            if not _same(a, b, rel_tol):
                return False
            tried += 1
            if tried == points:
                return True
        return False
    except (ParseError, ZeroDivisionError, OverflowError, ValueError):
        return re.sub(r"\s+", "", p).lower() == re.sub(r"\s+", "", r).lower()
