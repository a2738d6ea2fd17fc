"""Where examples come from: JSONL, files and datasets read with Hugging Face ``datasets``, Hub datasets, or a
built-in generated task (``builtin:NAME:SPLIT[:N]``).

    examples, skipped = load_source("data/train.jsonl", "sft", skip_bad=True)
    examples, _ = load_source("data/train.parquet", "sft", fields={"prompt": "question", "response": "answer"})
    examples, _ = load_source("trl-lib/ultrafeedback_binarized:test", "preference")
    examples, _ = load_source("builtin:addition_pairs:feedback", "preference", seed=0)

``kind`` is one of the formats of :mod:`jalign.data.formats` (sft, preference, reward, prompt, ...). Returns
``(examples, skipped)`` where ``skipped`` holds the ``path:line: reason`` message of every skipped bad line.
``fields`` maps jalign field names to the source's columns. Parquet / Arrow / JSON / CSV files, saved datasets
and Hub dataset names (``org/name[@revision][:split]``) go through :mod:`jalign.data.datasets_source` (needs the
``datasets`` package); a ``.jsonl`` file is read directly. No JAX here.

One source per call: a mixture (``data.train`` as a list) and named eval sets (``data.eval`` as a mapping) are
built from several calls by the data pipelines (:mod:`jalign.data.mixture`).
"""
from __future__ import annotations

from typing import Optional

from jalign.data.formats import read_jsonl
from jalign.errors import ConfigError


def load_source(spec: str, kind: str, skip_bad: bool = False, *, seed: int = 0,
                max_examples: Optional[int] = None, fields: Optional[dict] = None) -> tuple[list, list[str]]:
    """Examples of ``kind`` from one source spec (see the module docstring)."""
    if not isinstance(spec, str):
        what = "a mixture of sources (data.train as a list)" if isinstance(spec, list) else \
            "named eval sets (data.eval as a mapping)"
        raise ConfigError(f"data: {what} is read by the supervised data pipelines (SFT, reward models, the DPO "
                          f"family); this algorithm reads one source: give data.train / data.eval as one source")
    if spec.startswith("builtin:"):
        from jalign.data.tiny import load_builtin

        examples = load_builtin(spec, kind, seed)
        return (examples if max_examples is None else examples[:max_examples]), []
    from jalign.data import datasets_source

    if datasets_source.handles(spec):
        return datasets_source.read_dataset(spec, kind, skip_bad=skip_bad, max_examples=max_examples, fields=fields)
    return read_jsonl(spec, kind, skip_bad=skip_bad, max_examples=max_examples, fields=fields)
