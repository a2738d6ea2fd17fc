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
``steer``     SFT data (``{"prompt", "response"}`` or ``{"messages"}``) with ``"attributes": {name: value}``
              (SteerLM; what ``jalign annotate`` writes); a conversation's attributes belong to its last
              assistant turn, which is the response
``unpaired``  ``{"prompt", "completion", "label": true | false}`` (KTO; TRL's unpaired preference format;
              ``"response"`` is accepted for ``"completion"``), prompt and completion strings or message lists
============  =========================================================================================

TRL's names are accepted too, producing the same examples as the jalign lines they correspond to: SFT
``{"prompt", "completion"}`` (= ``response``; a conversational completion is one assistant message) and
``{"text"}`` (plain language modelling = ``{"prompt": "", "response": text}``: use ``data.chat_template: none``);
preference lines without ``"prompt"`` whose ``chosen`` / ``rejected`` carry it as a shared prefix (TRL's
implicit prompt: the longest common prefix of the two conversations, or of the two strings with a space
before the difference kept in the responses). ``fields`` (``data.fields``) renames columns first:
``{"prompt": "question"}`` reads the prompt from a column "question".

A bad line raises :class:`DataError` with ``path:line: reason``; with ``skip_bad=True`` it is skipped and
its message returned, so the caller can count and log them.

Besides malformed lines, *degenerate* examples are bad lines too (they train on nothing, or on a
constant): an empty response, chosen or rejected (only the end-of-sequence token would carry loss),
``chosen == rejected`` (DPO/Bradley-Terry loss stuck at log 2, accuracy 0) and a message whose role
is not one of :data:`ROLES` (a chat template renders it literally, e.g. ``<|usr|>``). Each skipped
line's message is a :class:`SkippedLine` whose ``reason`` says which kind it was.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from jalign.errors import JalignError

Message = dict
Text = Union[str, list]  # a string or a list of {"role", "content"} messages


class DataError(JalignError, ValueError):
    """A data file problem; the message starts with ``path:line:`` (or ``path:`` for whole-file issues)."""


ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                 "ai": "assistant", "function": "tool"}
REASONS = ("malformed", "empty", "identical", "role")  # SkippedLine.reason values; all but the first are degenerate


class _Bad(Exception):
    """Raised by the field validators; becomes a DataError with the file and line prepended."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


class SkippedLine(str):
    """The ``path:line: message`` of a skipped line (a ``str``), with its ``reason`` (one of :data:`REASONS`)."""

    reason: str

    def __new__(cls, message: str, reason: str = "malformed"):
        out = super().__new__(cls, message)
        out.reason = reason
        return out


def skipped_counts(skipped) -> dict[str, int]:
    """``{"degenerate": n, "degenerate_<reason>": n_reason, ...}`` of the degenerate lines among ``skipped``
    (per-reason keys only where > 0), for the data counts the algorithms log."""
    reasons = [getattr(m, "reason", "malformed") for m in skipped]
    out = {"degenerate": sum(r != "malformed" for r in reasons)}
    for r in REASONS[1:]:
        if reasons.count(r):
            out[f"degenerate_{r}"] = reasons.count(r)
    return out


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
class UnpairedExample:
    """One completion with a binary label: desirable (``label`` True) or undesirable (KTO's data)."""

    prompt: Text
    completion: Text
    label: bool
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


def _check_role(role: str, where: str) -> None:
    if role in ROLES:
        return
    close = _ROLE_ALIASES.get(role.lower()) or next(iter(difflib.get_close_matches(role.lower(), ROLES, n=1)), None)
    hint = f'; did you mean "{close}"?' if close else ""
    raise _Bad(f'{where}: unknown role "{role}"{hint} (known: {", ".join(ROLES)}; a chat template would render '
               "it literally)", "role")


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
        _check_role(m["role"], f'field "{key}"[{i}].role')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _nonempty_response(value: Text, key: str, every_turn: bool = False) -> Text:
    """A trained response must say something: a non-blank string, or (message list) a non-blank last
    assistant turn (``every_turn``: every assistant turn, as all of them carry loss in SFT)."""
    empty = " is empty (only the end-of-sequence token would be trained on)"
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(f'field "{key}"{empty}', "empty")
        return value
    turns = [i for i, m in enumerate(value) if m["role"] == "assistant"]
    if not turns:
        raise _Bad(f'field "{key}" has no "assistant" message, so nothing to train on')
    for i in (turns if every_turn else turns[-1:]):
        if not value[i]["content"].strip():
            raise _Bad(f'field "{key}"[{i}] (an assistant message){empty}', "empty")
    return value


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


def identical_pair(example, skip_bad: bool, skipped: list) -> bool:
    """For a pair found to tokenize identically (the chat template erased the difference): a DataError
    naming ``example.source``, or with ``skip_bad`` True and its message appended to ``skipped``."""
    msg = SkippedLine(f"{example.source or '<example>'}: chosen and rejected are identical after the chat "
                      "template (a pair with no preference: its loss is a constant log 2)", "identical")
    if not skip_bad:
        raise DataError(msg)
    skipped.append(msg)
    return True


# ---- per-kind parsers: dict -> example ----------------------------------------------------------
def parse_sft(obj: dict) -> SFTExample:
    if "text" in obj and not {"prompt", "response", "completion", "messages"} & set(obj):  # TRL language modelling
        return SFTExample(prompt="", response=_nonempty_response(_string(obj, "text"), "text"))
    if "messages" in obj:
        value = obj["messages"]
        if not isinstance(value, list):
            raise _Bad(f'field "messages" must be a list of messages, got {_type_name(value)}')
        msgs = _messages(value, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise _Bad('field "messages" has no "assistant" message, so nothing to train on')
        return SFTExample(messages=_nonempty_response(msgs, "messages", every_turn=True))
    hint = 'SFT needs "prompt" and "response" (or "completion"), "messages", or "text"'
    prompt = _text(obj, "prompt", hint)
    key = "completion" if "completion" in obj and "response" not in obj else "response"
    value = _require(obj, key, hint)
    if isinstance(value, list):  # TRL's conversational prompt-completion: one assistant message
        msgs = _messages(value, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _Bad(f'field "{key}" as a message list must be one "assistant" message (for several turns '
                       'use "messages")')
        value = msgs[0]["content"]
    elif not isinstance(value, str):
        raise _Bad(f'field "{key}" must be a string, got {_type_name(value)}')
    return SFTExample(prompt=prompt, response=_nonempty_response(value, key))


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's implicit prompt: ``(prompt, chosen, rejected)`` with the prompt the longest common prefix of the two
    (messages, or characters; for strings a space just before the difference stays in the responses)."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _Bad('fields "chosen" and "rejected" must both be strings or both message lists')
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        if 0 < n < len(chosen) and chosen[n - 1] == " ":
            n -= 1
    elif n == 0:
        raise _Bad('no "prompt" and "chosen" / "rejected" share no first message, so there is no implicit prompt')
    return chosen[:n], chosen[n:], rejected[n:]


def parse_preference(obj: dict) -> PreferenceExample:
    hint = 'preference data needs "prompt", "chosen" and "rejected" (or chosen/rejected sharing the prompt)'
    if "prompt" not in obj and "chosen" in obj and "rejected" in obj:  # TRL's implicit prompt
        prompt, chosen, rejected = split_implicit_prompt(_text(obj, "chosen"), _text(obj, "rejected"))
    else:
        prompt, chosen, rejected = (_text(obj, k, hint) for k in ("prompt", "chosen", "rejected"))
    chosen = _nonempty_response(chosen, "chosen")
    rejected = _nonempty_response(rejected, "rejected")
    if chosen == rejected:
        raise _Bad('fields "chosen" and "rejected" are identical (a pair with no preference: its loss is a '
                   "constant log 2 and it can never be ranked right)", "identical")
    return PreferenceExample(
        prompt=prompt, chosen=chosen, rejected=rejected,
        chosen_reward=_number(obj.get("chosen_reward"), "chosen_reward"),
        rejected_reward=_number(obj.get("rejected_reward"), "rejected_reward"))


def parse_reward(obj: dict) -> RewardExample:
    hint = 'reward data needs "prompt", "response" and "attributes"'
    prompt = _text(obj, "prompt", hint)
    response = _nonempty_response(_text(obj, "response", hint), "response")
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


def parse_unpaired(obj: dict) -> UnpairedExample:
    hint = 'unpaired data needs "prompt", "completion" and "label" (true = desirable, false = undesirable)'
    prompt = _text(obj, "prompt", hint)
    key = "completion" if "completion" in obj or "response" not in obj else "response"
    completion = _nonempty_response(_text(obj, key, hint), key)
    label = _require(obj, "label", hint)
    if not isinstance(label, bool):
        raise _Bad(f'field "label" must be true (desirable) or false (undesirable), got {_type_name(label)} '
                   f"{json.dumps(label)[:40]}")
    return UnpairedExample(prompt, completion, label)


def parse_steer(obj: dict) -> RewardExample:
    """An SFT example with attribute values, as (prompt, response, attributes): for a conversation the prompt
    is everything before its last assistant turn."""
    sft = parse_sft(obj)
    if sft.messages is not None:
        last = max(i for i, m in enumerate(sft.messages) if m["role"] == "assistant")
        prompt, response = sft.messages[:last], sft.messages[last]["content"]
    else:
        prompt, response = sft.prompt, sft.response
    attrs = _require(obj, "attributes", 'SteerLM data needs "attributes" (run `jalign annotate` to add them)')
    if not isinstance(attrs, dict):
        raise _Bad(f'field "attributes" must be an object {{name: number or null}}, got {_type_name(attrs)}')
    return RewardExample(prompt, response, {k: _number(v, f"attributes.{k}") for k, v in attrs.items()})


PARSERS: dict[str, Callable[[dict], Any]] = {
    "sft": parse_sft, "preference": parse_preference, "reward": parse_reward, "prompt": parse_prompt,
    "unpaired": parse_unpaired, "steer": parse_steer,
}


def map_fields(obj: dict, fields: Optional[dict]) -> dict:
    """``obj`` with the columns named in ``fields`` ({jalign field: column}) renamed to the jalign fields."""
    if not fields:
        return obj
    out = dict(obj)
    for ours, theirs in fields.items():
        if theirs not in obj:
            raise _Bad(f'missing column "{theirs}" (data.fields.{ours}: {theirs}); the columns are '
                       f"{', '.join(map(str, obj)) or 'none'}")
        out.pop(theirs)
        out[ours] = obj[theirs]
    return out


def parse_rows(rows: Iterable[tuple[str, Any]], kind: str, *, skip_bad: bool = False,
               max_examples: Optional[int] = None, fields: Optional[dict] = None) -> tuple[list, list, int]:
    """``(where, row)`` pairs -> ``(examples, skipped, rows seen)``; ``row`` is a dict, or a :class:`_Bad`
    for a line that could not be decoded. ``where`` ("path:line") prefixes every message and becomes each
    example's ``source``."""
    if kind not in PARSERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(PARSERS)}")
    parse = PARSERS[kind]
    examples, skipped, seen = [], [], 0
    for where, obj in rows:
        seen += 1
        try:
            if isinstance(obj, _Bad):
                raise obj
            if not isinstance(obj, dict):
                raise _Bad(f"expected a JSON object, got {_type_name(obj)}")
            ex = parse(map_fields(obj, fields))
        except _Bad as e:
            msg = f"{where}: {e}"
            if not skip_bad:
                raise DataError(msg) from None
            skipped.append(SkippedLine(msg, e.reason))
            continue
        ex.source = where
        examples.append(ex)
        if max_examples is not None and len(examples) >= max_examples:
            break
    return examples, skipped, seen


def check_parsed(name, kind: str, examples: list, skipped: list, seen: int) -> None:
    """A source with no rows, or no valid example among them, is an error naming it."""
    if seen == 0:
        raise DataError(f"{name}: file is empty")
    if not examples:
        raise DataError(f"{name}: no valid {kind} examples ({len(skipped)} bad lines skipped; first: "
                        f"{skipped[0] if skipped else '-'})")


def _jsonl_rows(path: Path):
    with path.open("rb") as f:  # bytes, so a bad UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"malformed JSON ({e.msg} at column {e.colno})")


def read_jsonl(path: Union[str, Path], kind: str, *, skip_bad: bool = False,
               max_examples: Optional[int] = None, fields: Optional[dict] = None) -> tuple[list, list[str]]:
    """Parse a JSONL file of ``kind`` (see the module docstring).

    Returns ``(examples, skipped)`` where ``skipped`` holds the ``path:line: reason`` message of every
    skipped line (always empty unless ``skip_bad``). Raises :class:`DataError` on the first bad line,
    on a missing or empty file, and when ``skip_bad`` left no valid example.
    """
    if kind not in PARSERS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(PARSERS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples, skipped, seen = parse_rows(_jsonl_rows(path), kind, skip_bad=skip_bad, max_examples=max_examples,
                                         fields=fields)
    check_parsed(path, kind, examples, skipped, seen)
    return examples, skipped
