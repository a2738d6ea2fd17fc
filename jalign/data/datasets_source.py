"""Examples from Hugging Face ``datasets``: Parquet / Arrow / JSON / CSV files, saved datasets, Hub datasets.

    examples, skipped = read_dataset("data/train.parquet", "sft", fields={"prompt": "question"})
    examples, skipped = read_dataset("trl-lib/ultrafeedback_binarized@main:test", "preference")

Which specs come here (:func:`handles`): a local file ending in ``.parquet``, ``.arrow``, ``.json``, ``.csv``
(or ``.json.gz`` / ``.jsonl.gz``); a directory written by ``Dataset.save_to_disk`` (``DIR`` or ``DIR:split``
for a ``DatasetDict``); a Hub dataset ``org/name[@revision][:split]`` (default split ``train``) that is no local
path, fetched through huggingface_hub's cache like models (:mod:`jalign.hub`; data files only, no scripts).
Plain ``.jsonl`` files are read by :func:`jalign.data.formats.read_jsonl` and need no ``datasets``.

Every row goes through the same parsers as a JSONL line (:func:`jalign.data.formats.parse_rows`: the column
mapping, TRL's names, the checks for bad and degenerate rows); a row's ``source`` is ``NAME[row I]``. A column
that is null in a row counts as absent from it (Parquet and Arrow have a value for every column).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from jalign.data.formats import DataError, check_parsed, parse_rows

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv", ".gz": "json"}
_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")


def _saved_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _SAVED)


def _local_split(spec: str) -> tuple[Path, Optional[str]]:
    """``DIR:split`` of a saved DatasetDict (when DIR exists and DIR:split does not) or (path, None)."""
    path = Path(spec).expanduser()
    if not path.exists() and ":" in spec:
        head, _, split = spec.rpartition(":")
        if _saved_dir(Path(head).expanduser()):
            return Path(head).expanduser(), split
    return path, None


def handles(spec: str) -> bool:
    """Whether ``spec`` is read with ``datasets`` (see the module docstring)."""
    from jalign import hub

    path, _ = _local_split(spec)
    if path.exists():
        return (path.is_file() and path.suffix in BUILDERS and not spec.endswith(".jsonl")) or _saved_dir(path)
    return hub.parse_dataset_name(spec) is not None


def _import_datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Parquet / Arrow / JSON / CSV files and Hub datasets are read with the `datasets` "
                        "package: pip install 'jalign[datasets]' (JSONL files need nothing)") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """No progress bars of datasets' own while loading (they are \\r-updated lines in a log file)."""
    was_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.utils.enable_progress_bars()


def open_dataset(spec: str, *, where: str = "data"):
    """The ``datasets.Dataset`` a spec names (one split)."""
    datasets = _import_datasets(spec)
    path, split = _local_split(spec)
    with _quiet(datasets):
        try:
            if path.is_file():
                builder = BUILDERS[path.suffix]
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
                return _pick_split(ds, split, spec)
            from jalign import hub

            directory, split = hub.resolve_dataset(spec, where=where)
            return _pick_split(datasets.load_dataset(str(directory)), split, spec)
        except (ValueError, OSError, TypeError) as e:
            if isinstance(e, DataError) or type(e).__name__ == "HubError":
                raise
            raise DataError(f"{spec}: cannot read it with datasets ({type(e).__name__}: {e})") from None


def _pick_split(ds, split: Optional[str], spec: str):
    if not hasattr(ds, "keys"):  # a single Dataset
        if split is not None:
            raise DataError(f"{spec}: the dataset has no splits; drop ':{split}'")
        return ds
    names = list(ds.keys())
    split = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if split is None or split.split("[")[0] not in names:
        raise DataError(f"{spec}: no split {split!r}; the dataset has {', '.join(names)} (write NAME:SPLIT)")
    base, _, rest = split.partition("[")
    return _slice(ds[base], "[" + rest, spec) if rest else ds[base]  # a slice: train[:100], train[10%:]


def _slice(ds, sl: str, spec: str):
    """``ds`` cut by a split slice ``[a:b]`` (rows, or percentages ``[a%:b%]``)."""
    inner = sl.strip("[]")
    try:
        a, _, b = inner.partition(":")

        def pos(x, default):
            if not x:
                return default
            return round(len(ds) * float(x[:-1]) / 100) if x.endswith("%") else int(x)

        start, stop = pos(a, 0), pos(b, len(ds))
    except ValueError:
        raise DataError(f"{spec}: cannot read the split slice {sl!r} (e.g. train[:100] or train[10%:])") from None
    return ds.select(range(*slice(start, stop).indices(len(ds))))


def read_dataset(spec: str, kind: str, *, skip_bad: bool = False, max_examples: Optional[int] = None,
                 fields: Optional[dict] = None, where: str = "data") -> tuple[list, list]:
    """``(examples, skipped)`` of ``kind`` from a datasets-readable spec (rows parsed like JSONL lines)."""
    ds = open_dataset(spec, where=where)
    rows = ((f"{spec}[row {i}]", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds))
    examples, skipped, seen = parse_rows(rows, kind, skip_bad=skip_bad, max_examples=max_examples, fields=fields)
    check_parsed(spec, kind, examples, skipped, seen)
    return examples, skipped
