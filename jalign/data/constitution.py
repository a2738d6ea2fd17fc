"""A constitution (principles with critique, revision and judging requests) and the prompt templates of
Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"). No JAX here.

    principles = load_constitution("configs/constitution.yaml")      # or "builtin:tiny"
    text = render(CRITIQUE_TEMPLATE, "algorithm.critique_template", prompt="37+48=", response="75",
                  critique_request=principles[0].critique_request, principle=principles[0].name)

A constitution file is a YAML list of mappings, or JSONL with one mapping per line::

    - name: carry
      critique_request: "Carry right?"
      revision_request: "Fix it."
      judge_question: "Which carries right?"

Templates are Python format strings over named fields only (``{prompt}``; no attribute or index access, no
conversions: a template from a config must not reach into the objects it is given); ``{{`` and ``}}`` are
literal braces. The rendered text becomes the user turn of a conversation, so the model's chat template
wraps it (``jalign.data.chat.encode_prompt``).
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from jalign.errors import ConfigError

# Defaults, short enough for the tiny task's byte tokenizer (the tiny critic is trained on exactly these).
CRITIQUE_TEMPLATE = "{prompt}{response}\n{critique_request}"
REVISION_TEMPLATE = "{prompt}{response}\n{critique_request}\n{critique}\n{revision_request}"
JUDGE_TEMPLATE = "{prompt}\n{judge_question}\nA: {response_a}\nB: {response_b}"

CRITIQUE_FIELDS = ("prompt", "response", "critique_request", "principle")
REVISION_FIELDS = CRITIQUE_FIELDS + ("critique", "revision_request")
JUDGE_FIELDS = ("prompt", "response_a", "response_b", "judge_question", "principle")


@dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str
    revision_request: str
    judge_question: str


PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "judge_question")

TINY = (  # the tiny addition task's constitution (builtin:tiny)
    Principle("carry", "Carry right?", "Fix it.", "Which carries right?"),
    Principle("digits", "Digits right?", "Fix it.", "Which digits are right?"),
    Principle("check", "Check it.", "Fix it.", "Which is right?"),
)


def _principle(obj, where: str) -> Principle:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a principle is a mapping with {', '.join(PRINCIPLE_KEYS)}, got {obj!r}")
    unknown = sorted(set(obj) - set(PRINCIPLE_KEYS))
    missing = [k for k in PRINCIPLE_KEYS if k not in obj]
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown keys {unknown}" if unknown else "",
                                     f"missing keys {missing}" if missing else "") if x)
        raise ConfigError(f"{where}: {what} (a principle has {', '.join(PRINCIPLE_KEYS)})")
    for k in PRINCIPLE_KEYS:
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise ConfigError(f"{where}: {k} must be a non-empty string, got {obj[k]!r}")
    return Principle(**{k: obj[k] for k in PRINCIPLE_KEYS})


def load_constitution(spec: str) -> tuple[Principle, ...]:
    """``builtin:tiny``, a ``.yaml``/``.yml`` list of principles, or a ``.jsonl`` file (one per line)."""
    if spec == "builtin:tiny":
        return TINY
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"algorithm.constitution={spec}: no such file (expected builtin:tiny, a YAML list or "
                          "a JSONL file of principles)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the constitution ({e})") from None
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            out.append(_principle(obj, f"{path}:{i}"))
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML: "
                              f"{getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a constitution is a list of principles, got {type(data).__name__}")
        out = [_principle(obj, f"{path}: principle {i}") for i, obj in enumerate(data)]
    if not out:
        raise ConfigError(f"{path}: the constitution has no principles")
    return tuple(out)


def check_template(template: str, key: str, allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Refuse a template with unknown fields, attribute/index access, conversions or format specs, or one
    missing a ``required`` field; the message names the config ``key``."""
    allowed = tuple(allowed)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{key}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    seen = set()
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in allowed:
            raise ConfigError(f"{key}: unknown field {{{field}}} (fields: "
                              + ", ".join("{" + f + "}" for f in allowed) + ")")
        if spec or conversion:
            raise ConfigError(f"{key}: {{{field}}} may not carry a conversion or format spec")
        seen.add(field)
    missing = [f for f in required if f not in seen]
    if missing:
        raise ConfigError(f"{key}: the template must contain " + ", ".join("{" + f + "}" for f in missing))


def render(template: str, key: str, **fields: str) -> str:
    """The template with its fields filled in (``check_template`` first; extra fields are ignored)."""
    check_template(template, key, tuple(fields))
    return template.format_map({k: str(v) for k, v in fields.items()})
