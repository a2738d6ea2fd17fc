"""JSONL datasets, validated line by line into small dataclasses.

One JSON object per line; blank lines are ignored; unknown keys are kept out of the way (ignored).

============  =========================================================================================
kind          fields
============  =========================================================================================
``sft``       ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``
``preference`` ``{"prompt", "chosen", "rejected"}``, each a string or a message list; optional numeric
              ``chosen_reward`` / ``rejected_reward``
``reward``    ``{"prompt", "response", "attributes": {name: number or null}}`` (null = not labelled)
``prompt``    ``{"prompt"}`` with an optional ``"answer"`` string (for rule-based rewards)
============  =========================================================================================

A bad line raises :class:`DataError` with ``path:line: reason``; with ``skip_bad=True`` it is skipped and
its message returned, so the caller can count and log them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

Message = dict
Text = Union[str, list]  # a string or a list of {"role", "content"} messages


class DataError(ValueError):
    """A data file problem; the message starts with ``path:line:`` (or ``path:`` for whole-file issues)."""


class _Bad(Exception):
    """Raised by the field validators; becomes a DataError with the file and line prepended."""


@dataclass
class SFTExample:
    prompt: Optional[Text] = None
    response: Optional[str] = None
    messages: Optional[list] = None  # set instead of prompt/response for conversations
    source: str = ""  # "path:line" or "builtin:..."; for error messages and debugging


@dataclass
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    chosen_reward: Optional[float] = None
    rejected_reward: Optional[float] = None
    source: str = ""


@dataclass
class RewardExample:
    prompt: Text
    response: Text
    attributes: dict = field(default_factory=dict)  # name -> float or None (masked)
    source: str = ""


@dataclass
class PromptExample:
    prompt: Text
    answer: Optional[str] = None
    source: str = ""


# ---- field validators ---------------------------------------------------------------------------
def _type_name(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _require(obj: dict, key: str, hint: str = "") -> Any:
    if key not in obj:
        raise _Bad(f'missing field "{key}"' + (f" ({hint})" if hint else ""))
    return obj[key]


def _messages(value: Any, key: str) -> list:
    if not value:
        raise _Bad(f'field "{key}" is an empty message list')
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f'field "{key}"[{i}] must be an object with "role" and "content", got {_type_name(m)}')
        for k in ("role", "content"):
            if k not in m:
                raise _Bad(f'field "{key}"[{i}] is missing "{k}"')
            if not isinstance(m[k], str):
                raise _Bad(f'field "{key}"[{i}].{k} must be a string, got {_type_name(m[k])}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(obj: dict, key: str, hint: str = "") -> Text:
    value = _require(obj, key, hint)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise _Bad(f'field "{key}" must be a string or a list of messages, got {_type_name(value)}')


def _string(obj: dict, key: str, hint: str = "") -> str:
    value = _require(obj, key, hint)
    if not isinstance(value, str):
        raise _Bad(f'field "{key}" must be a string, got {_type_name(value)}')
    return value


def _number(value: Any, key: str, nullable: bool = True) -> Optional[float]:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f'field "{key}" must be a finite number{" or null" if nullable else ""}, '
                   f"got {_type_name(value)} {json.dumps(value)[:40]}")
    return float(value)


# ---- per-kind parsers: dict -> example ----------------------------------------------------------
def parse_sft(obj: dict) -> SFTExample:
    if "messages" in obj:
        value = obj["messages"]
        if not isinstance(value, list):
            raise _Bad(f'field "messages" must be a list of messages, got {_type_name(value)}')
        msgs = _messages(value, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise _Bad('field "messages" has no "assistant" message, so nothing to train on')
        return SFTExample(messages=msgs)
    hint = 'SFT needs "prompt" and "response", or "messages"'
    return SFTExample(prompt=_text(obj, "prompt", hint), response=_string(obj, "response", hint))


def parse_preference(obj: dict) -> PreferenceExample:
    hint = 'preference data needs "prompt", "chosen" and "rejected"'
    return PreferenceExample(
        prompt=_text(obj, "prompt", hint), chosen=_text(obj, "chosen", hint),
        rejected=_text(obj, "rejected", hint),
        chosen_reward=_number(obj.get("chosen_reward"), "chosen_reward"),
        rejected_reward=_number(obj.get("rejected_reward"), "rejected_reward"))


def parse_reward(obj: dict) -> RewardExample:
    hint = 'reward data needs "prompt", "response" and "attributes"'
    prompt, response = _text(obj, "prompt", hint), _text(obj, "response", hint)
    attrs = _require(obj, "attributes", hint)
    if not isinstance(attrs, dict) or not attrs:
        raise _Bad(f'field "attributes" must be a non-empty object {{name: number or null}}, got '
                   f"{_type_name(attrs) if attrs != {} else 'an empty object'}")
    return RewardExample(prompt, response, {k: _number(v, f"attributes.{k}") for k, v in attrs.items()})


def parse_prompt(obj: dict) -> PromptExample:
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int))):
        raise _Bad(f'field "answer" must be a string, got {_type_name(answer)}')
    return PromptExample(_text(obj, "prompt"), None if answer is None else str(answer))


PARSERS: dict[str, Callable[[dict], Any]] = {
    "sft": parse_sft, "preference": parse_preference, "reward": parse_reward, "prompt": parse_prompt,
}


def read_jsonl(path: Union[str, Path], kind: str, *, skip_bad: bool = False,
               max_examples: Optional[int] = None) -> tuple[list, list[str]]:
    """Parse a JSONL file of ``kind`` (see the module docstring).

    Returns ``(examples, skipped)`` where ``skipped`` holds the ``path:line: reason`` message of every
    skipped line (always empty unless ``skip_bad``). Raises :class:`DataError` on the first bad line,
    on a missing or empty file, and when ``skip_bad`` left no valid example.
    """
    if kind not in PARSERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(PARSERS)}")
    parse, path = PARSERS[kind], Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples, skipped, seen = [], [], 0
    with path.open("rb") as f:  # bytes, so a bad UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            seen += 1
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(f"malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise _Bad(f"expected a JSON object, got {_type_name(obj)}")
                ex = parse(obj)
            except _Bad as e:
                msg = f"{path}:{lineno}: {e}"
                if not skip_bad:
                    raise DataError(msg) from None
                skipped.append(msg)
                continue
            ex.source = f"{path}:{lineno}"
            examples.append(ex)
            if max_examples is not None and len(examples) >= max_examples:
                break
    if seen == 0:
        raise DataError(f"{path}: file is empty")
    if not examples:
        raise DataError(f"{path}: no valid {kind} examples ({len(skipped)} bad lines skipped; first: "
                        f"{skipped[0] if skipped else '-'})")
    return examples, skipped
