"""Rule-based (verifiable) rewards for RL configs: built-ins by name, user functions by import path, and a
weighted combiner over named reward columns. No JAX here: rewards run on the host.

A reward function takes the prompt text (before the chat template), the decoded response (without the end
token) and the reference answer when the data has one, and returns a float::

    def my_rule(prompt: str, response: str, reference: Optional[str]) -> float: ...

It may also take

* keyword *options*, bound from the config (``{fn: my_rule, options: {target: 3}}``): keyword parameters
  with or without defaults (a keyword-only one without a default must be given);
* ``fields``: a keyword parameter that receives the prompt example's other JSONL fields as a dict (e.g.
  ``{"difficulty": 3, "unit": "cm"}``; empty when the data has none). Functions without it are called
  with the three arguments, so existing three-argument functions keep working.

Names (``algorithm.reward_fn`` / ``algorithm.rewards[i].fn``): a built-in (``exact_match``, ``contains``,
``math_verify``, ``format``, ``length``), a function registered with :func:`register_reward`, or an import
path ``package.module:function`` / ``path/to/file.py:function``.

Built in: ``exact_match`` (response == reference after stripping; the tiny addition task computes the
reference from the prompt when the data carries none), ``contains`` (reference in response),
``math_verify`` (final answer extracted and compared by value, :mod:`jalign.answers`), ``format`` (a regex the
response must match; default a final ``#### answer`` line), ``length`` (1 inside a character budget, falling
off linearly outside).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jalign import answers

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}
_POSITIONAL = ("prompt", "response", "reference")


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


class RewardError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Reward:
    """A resolved reward: ``reward(prompt, response, reference, fields=None) -> float``."""
    name: str
    fn: RewardFn
    wants_fields: bool = False

    def __call__(self, prompt: str, response: str, reference: Optional[str] = None,
                 fields: Optional[Mapping[str, Any]] = None) -> float:
        if self.wants_fields:
            return float(self.fn(prompt, response, reference, fields=dict(fields or {})))
        return float(self.fn(prompt, response, reference))


def _load_path(name: str, key: str) -> RewardFn:
    target, _, attr = name.rpartition(":")
    if not target or not attr.isidentifier():
        raise RewardError(f"{key}: {name!r} is not an import path of the form package.module:function or "
                          f"path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"{key}: reward file {str(path)!r} (from {name!r}) does not exist")
        mod_name = f"jalign_user_reward_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # the user's file failed to import: say which and why
            sys.modules.pop(mod_name, None)
            raise RewardError(f"{key}: importing reward file {str(path)!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardError(f"{key}: importing module {target!r} (from {name!r}) failed: "
                              f"{type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"{key}: {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"{key}: {name!r} is not callable (it is a {type(fn).__name__})")
    return fn


def _bind(fn: RewardFn, name: str, options: Mapping[str, Any], key: str) -> tuple[RewardFn, bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (functools.partial(fn, **options) if options else fn), False
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        raise RewardError(f"{key}: reward {name!r} must take (prompt, response, reference), "
                          f"its signature is {name}{sig}")
    settable = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    settable -= set(_POSITIONAL) | {p.name for p in positional[:3]} | {"fields"}
    for opt in options:
        if opt == "fields" or (opt not in settable and not var_kw):
            close = difflib.get_close_matches(opt, sorted(settable), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RewardError(f"{key}: reward {name!r} has no option {opt!r}{hint} "
                              f"(options: {', '.join(sorted(settable)) or 'none'})")
    missing = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
               and n != "fields" and n not in options]
    if missing:
        raise RewardError(f"{key}: reward {name!r} needs option(s) {', '.join(missing)} "
                          f"(e.g. options: {{{missing[0]}: ...}})")
    wants_fields = "fields" in params or var_kw
    return (functools.partial(fn, **options) if options else fn), wants_fields


def get_reward(name: str, options: Optional[Mapping[str, Any]] = None, *, key: str = "algorithm.reward_fn") -> Reward:
    """Resolve a reward by built-in/registered name or import path, with config ``options`` bound.

    Errors (:class:`RewardError`, a ValueError) name ``key`` (the config key being resolved) and what failed:
    an unknown name (with a suggestion), a missing file or module, an import that raised, a missing
    attribute, a function with the wrong signature, an unknown or missing option.
    """
    options = dict(options or {})
    if name in REWARDS:
        fn = REWARDS[name]
    elif ":" in name:
        fn = _load_path(name, key)
    else:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RewardError(f"{key}: unknown reward {name!r}{hint} (known: {', '.join(sorted(REWARDS))}; or an "
                          f"import path package.module:function or path/to/file.py:function)")
    bound, wants_fields = _bind(fn, name, options, key)
    return Reward(name, bound, wants_fields)


# ----------------------------------------------------------------------------- built-in rewards
@register_reward("exact_match")
def exact_match(prompt: str, response: str, reference: Optional[str]) -> float:
    """1.0 if the stripped response equals the stripped reference, else 0.0."""
    if reference is None:
        from jalign.data.tiny import answer_for

        reference = answer_for(prompt)
    return float(response.strip() == str(reference).strip())


@register_reward("contains")
def contains(prompt: str, response: str, reference: Optional[str]) -> float:
    """1.0 if the reference occurs in the response."""
    return float(reference is not None and str(reference).strip() in response)


@register_reward("math_verify")
def math_verify(prompt: str, response: str, reference: Optional[str], *,
                extract: Sequence[str] = answers.DEFAULT_EXTRACT, rel_tol: float = 0.0) -> float:
    """1.0 if the response's final answer equals the reference answer by value, else 0.0.

    The answer is extracted with ``extract`` (methods tried in order: ``boxed``, ``gsm8k``, ``answer_is``,
    ``last_number``; :func:`jalign.answers.extract_answer`); a reference holding a ``####`` line or a
    ``\\boxed{}`` is extracted the same way, otherwise used whole. Equivalence: :func:`jalign.answers.answers_equal`
    (exact rationals, percentages, simple expressions, random-point identity for variables; ``rel_tol`` for
    approximate decimals). No reference: 0.0.
    """
    if reference is None:
        return 0.0
    ref = str(reference)
    if "####" in ref or "\\boxed" in ref or "\\fbox" in ref:
        ref = answers.extract_answer(ref, ("boxed", "gsm8k")) or ref
    pred = answers.extract_answer(response, tuple(extract))
    return float(answers.answers_equal(pred, ref, rel_tol=rel_tol))


DEFAULT_FORMAT = r"(?:^|\n)[ \t]*####[ \t]*\S[^\n]*\s*\Z"


@register_reward("format")
def format_reward(prompt: str, response: str, reference: Optional[str], *, pattern: str = DEFAULT_FORMAT,
                  fullmatch: bool = False) -> float:
    """1.0 if the response matches the regular expression ``pattern`` (``re.search``, or ``re.fullmatch`` with
    ``fullmatch``; DOTALL), else 0.0. The default requires the response to end with a ``#### answer`` line;
    e.g. ``pattern: "<think>.+?</think>\\s*<answer>.+?</answer>"`` with ``fullmatch: true`` for tags."""
    rx = _compiled(pattern)
    return float((rx.fullmatch(response) if fullmatch else rx.search(response)) is not None)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str):
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise RewardError(f"format reward: invalid regular expression {pattern!r}: {e}") from None


@register_reward("length")
def length_reward(prompt: str, response: str, reference: Optional[str], *, max_chars: int, min_chars: int = 0,
                  slack: Optional[int] = None) -> float:
    """1.0 when ``min_chars <= len(response.strip()) <= max_chars``; below, len / min_chars; above, falling
    linearly to 0 at ``max_chars + slack`` (default slack = max_chars)."""
    n = len(response.strip())
    if n < min_chars:
        return n / min_chars
    if n <= max_chars:
        return 1.0
    s = max_chars if slack is None else slack
    return max(0.0, 1.0 - (n - max_chars) / max(s, 1))


# ----------------------------------------------------------------------------- several rewards, weighted
@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One entry of ``algorithm.rewards``: a rule (``fn``, with ``options``) or a reward model (``model``, a
    run directory the algorithm scores with), its ``weight`` and the ``name`` it is logged under."""
    name: str
    weight: float
    fn: Optional[str] = None
    model: Optional[str] = None
    options: dict = dataclasses.field(default_factory=dict)


def parse_reward_specs(entries, key: str = "algorithm.rewards") -> list[RewardSpec]:
    """Validate ``[{fn: NAME, weight: W, options: {...}, name: N}, {model: DIR, weight: W}, ...]``.

    Each entry has exactly one of ``fn`` / ``model``, a finite number ``weight`` (default 1.0), an optional
    ``name`` (default: the function's name, or ``rm`` / ``rm_<dir name>`` for models) and, for ``fn``, optional
    ``options``. Rule names are resolved now (:func:`get_reward`), so a bad name fails before any device
    work. Errors name ``key[i]`` and the field.
    """
    if not isinstance(entries, (list, tuple)) or not entries:
        raise RewardError(f"{key}: expected a non-empty list of {{fn: ..., weight: ...}} / {{model: ..., "
                          f"weight: ...}} entries, got {entries!r}")
    specs, n_models = [], sum(1 for e in entries if isinstance(e, Mapping) and "model" in e)
    for i, e in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(e, Mapping):
            raise RewardError(f"{where}: expected a mapping, got {e!r}")
        unknown = set(e) - {"fn", "model", "weight", "name", "options"}
        if unknown:
            bad = sorted(unknown)[0]
            close = difflib.get_close_matches(bad, ["fn", "model", "weight", "name", "options"], n=1)
            raise RewardError(f"{where}: unknown field {bad!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        if ("fn" in e) == ("model" in e):
            raise RewardError(f"{where}: give exactly one of 'fn' (a rule reward) or 'model' (a reward-model run)")
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
            raise RewardError(f"{where}.weight: expected a finite number, got {w!r}")
        opts = e.get("options") or {}
        if not isinstance(opts, Mapping):
            raise RewardError(f"{where}.options: expected a mapping, got {opts!r}")
        if "fn" in e:
            fn = e["fn"]
            if not isinstance(fn, str):
                raise RewardError(f"{where}.fn: expected a reward name or import path, got {fn!r}")
            get_reward(fn, opts, key=f"{where}.fn")
            name = e.get("name") or fn.rpartition(":")[2]
            specs.append(RewardSpec(str(name), float(w), fn=fn, options=dict(opts)))
        else:
            if opts:
                raise RewardError(f"{where}.options: only rule rewards ('fn') take options")
            model = e["model"]
            if not isinstance(model, str):
                raise RewardError(f"{where}.model: expected a run directory, got {model!r}")
            name = e.get("name") or ("rm" if n_models == 1 else f"rm_{Path(model).name}")
            specs.append(RewardSpec(str(name), float(w), model=model))
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RewardError(f"{key}: reward name {dup[0]!r} is used twice; give the entries distinct 'name's")
    return specs


def score_rules(rewards: Mapping[str, Reward], prompts: Sequence[str], responses: Sequence[str],
                references: Sequence[Optional[str]], fields: Optional[Sequence[Mapping[str, Any]]] = None
                ) -> dict[str, np.ndarray]:
    """Each rule reward over a batch: ``{name: float32 [B]}``. An exception in a reward function is re-raised
    naming the reward and the example index."""
    B = len(responses)
    if not (len(prompts) == len(references) == B) or (fields is not None and len(fields) != B):
        raise RewardError(f"score_rules: {len(prompts)} prompts, {B} responses, {len(references)} references"
                          + ("" if fields is None else f", {len(fields)} field dicts") + ": lengths must agree")
    out = {}
    for name, fn in rewards.items():
        col = np.empty(B, np.float32)
        for i in range(B):
            try:
                col[i] = fn(prompts[i], responses[i], references[i], None if fields is None else fields[i])
            except Exception as e:
                raise RewardError(f"reward {name!r} failed on example {i}: {type(e).__name__}: {e}") from e
        out[name] = col
    return out


def combine_rewards(columns: Mapping[str, Any], weights: Mapping[str, float]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted sum of named reward columns: ``(total [B], {name: column [B]})`` (float32).

        total_b = sum_name weight_name * column_name,b

    Pure NumPy. ``columns`` and ``weights`` must have the same names; columns must be 1-D, of equal length
    and finite (standardise a reward model's scores before, as the RL algorithms do). The returned components
    are the unweighted columns, for logging each reward separately.
    """
    if set(columns) != set(weights):
        missing, extra = sorted(set(weights) - set(columns)), sorted(set(columns) - set(weights))
        raise RewardError(f"combine_rewards: reward columns {sorted(columns)} do not match the weights "
                          f"{sorted(weights)}" + (f"; missing {missing}" if missing else "")
                          + (f"; unweighted {extra}" if extra else ""))
    if not columns:
        raise RewardError("combine_rewards: no reward columns")
    comps, total, size = {}, None, None
    for name in weights:
        col = np.asarray(columns[name], np.float32)
        if col.ndim != 1 or (size is not None and col.shape[0] != size):
            raise RewardError(f"combine_rewards: column {name!r} has shape {col.shape}, expected [{size or 'B'}]")
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            raise RewardError(f"combine_rewards: column {name!r} is not finite at index {int(bad[0])} "
                              f"({col[bad[0]]})")
        size = col.shape[0]
        comps[name] = col
        term = np.float32(weights[name]) * col
        total = term if total is None else total + term
    return total.astype(np.float32), comps
