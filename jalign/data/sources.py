"""Where examples come from: a JSONL file, or a built-in generated task (``builtin:NAME:SPLIT[:N]``).

    examples, skipped = load_source("data/train.jsonl", "sft", skip_bad=True)
    examples, _ = load_source("builtin:addition_pairs:feedback", "preference", seed=0)

``kind`` is one of the formats of :mod:`jalign.data.formats` (sft, preference, reward, prompt, ...). Returns
``(examples, skipped)`` where ``skipped`` holds the ``path:line: reason`` message of every skipped bad line.
No JAX here.
"""
from __future__ import annotations

from typing import Optional

from jalign.data.formats import read_jsonl


def load_source(spec: str, kind: str, skip_bad: bool = False, *, seed: int = 0,
                max_examples: Optional[int] = None) -> tuple[list, list[str]]:
    """Examples of ``kind`` from a builtin name or a JSONL path (see the module docstring)."""
    if spec.startswith("builtin:"):
        from jalign.data.tiny import load_builtin

        examples = load_builtin(spec, kind, seed)
        return (examples if max_examples is None else examples[:max_examples]), []
    return read_jsonl(spec, kind, skip_bad=skip_bad, max_examples=max_examples)
