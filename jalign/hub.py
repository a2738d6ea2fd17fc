"""Hugging Face Hub names -> local directories, through ``huggingface_hub`` and its cache.

    path = resolve_model("meta-llama/Llama-3.2-1B@main", where="model.hf_path")   # a snapshot directory
    path = resolve_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", where="model.tokenizer")
    path, split = resolve_dataset("trl-lib/ultrafeedback_binarized:test", where="data.eval")

A name is ``org/name`` with an optional ``@revision`` (branch, tag or commit) and, for datasets, ``:split``.
It is used only when no local path of that name exists (a local directory always wins). Everything else is
``huggingface_hub``'s: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``: the
cache only), the token from its usual place (``HF_TOKEN`` or ``hf auth login``), a cached snapshot when the
Hub cannot be reached. Only data files are fetched: config and tokenizer JSON, chat templates and
``*.safetensors`` for a model (never pickled ``.bin`` weights, never Python code), data files for a dataset.

A name that cannot be resolved is one :class:`HubError` naming the config key, the repository and what to do
(not in the cache while offline, no such repository or revision, gated, no safetensors weights).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from jalign.errors import ConfigError

# org/name: the Hub's own rule for repo ids (letters, digits, "-", "_", "."; no "--" or ".." at the ends)
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]*[\w]"
HUB_NAME = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<revision>[\w./-]+))?$")
HUB_DATASET = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<revision>[\w./-]+))?(?::(?P<split>.+))?$")

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "config.json")
DATASET_FILES = ("*.parquet", "*.arrow", "*.json", "*.jsonl", "*.jsonl.gz", "*.json.gz", "*.csv", "README.md")


class HubError(ConfigError):
    """A Hub name that cannot be resolved; the message names the config key, the repository and the fix."""


def parse_name(spec: str) -> Optional[tuple[str, Optional[str]]]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``spec`` is not a Hub model name."""
    m = HUB_NAME.match(spec.strip())
    if m is None or m["repo"].lower().endswith(_FILE_SUFFIXES):  # a mistyped file path, not a repository
        return None
    return m["repo"], m["revision"]


def parse_dataset_name(spec: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """``"org/name@rev:split"`` -> ``("org/name", "rev", "split")``; None when not a Hub dataset name."""
    m = HUB_DATASET.match(spec.strip())
    if m is None or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["revision"], m["split"]


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def resolve_model(spec: str, *, where: str) -> Path:
    """The snapshot directory of a model repository (config.json, safetensors, tokenizer files)."""
    repo, revision = _parsed(spec, where)
    path = snapshot(repo, revision, repo_type="model", patterns=MODEL_FILES, where=where, spec=spec)
    if not any(path.glob("*.safetensors")):
        raise HubError(f"{where}={spec}: the repository {repo} has no *.safetensors weights; jalign loads only "
                       "safetensors (never pickled .bin files). Convert them once with transformers "
                       "(save_pretrained(..., safe_serialization=True)) and point at that directory")
    return path


def resolve_tokenizer(spec: str, *, where: str) -> Path:
    """The snapshot directory holding a repository's tokenizer files (no weights are fetched)."""
    repo, revision = _parsed(spec, where)
    return snapshot(repo, revision, repo_type="model", patterns=TOKENIZER_FILES, where=where, spec=spec)


def resolve_dataset(spec: str, *, where: str, default_split: str = "train") -> tuple[Path, str]:
    """(snapshot directory of a dataset repository, split) for ``org/name[@revision][:split]``."""
    parsed = parse_dataset_name(spec)
    if parsed is None:
        raise HubError(f"{where}={spec}: not a Hub dataset name (org/name[@revision][:split])")
    repo, revision, split = parsed
    return snapshot(repo, revision, repo_type="dataset", patterns=DATASET_FILES, where=where,
                    spec=spec), split or default_split


def _parsed(spec: str, where: str) -> tuple[str, Optional[str]]:
    parsed = parse_name(spec)
    if parsed is None:
        raise HubError(f"{where}={spec}: not a local path nor a Hub name (org/name[@revision])")
    return parsed


def snapshot(repo: str, revision: Optional[str], *, repo_type: str, patterns: Sequence[str], where: str,
             spec: str) -> Path:
    """``huggingface_hub.snapshot_download`` of the files matching ``patterns``; its errors as HubError."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise HubError(f"{where}={spec}: a Hub name needs the huggingface_hub package "
                       "(pip install huggingface_hub)") from None
    key = (repo, revision, repo_type, tuple(patterns), constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    if key in _RESOLVED and Path(_RESOLVED[key]).is_dir():  # a run names the same model several times
        return _RESOLVED[key]
    errors = _error_classes()
    kind = "dataset " if repo_type == "dataset" else ""
    where = f"{where}={spec}: no local path of that name; as a Hugging Face Hub name"
    try:
        path = huggingface_hub.snapshot_download(repo, repo_type=repo_type, revision=revision,
                                                 allow_patterns=list(patterns))
    except errors["gated"]:
        raise HubError(f"{where}, {kind}{repo} is gated: accept its terms on the Hub, then log in "
                       "(`hf auth login`) or set HF_TOKEN") from None
    except errors["revision"]:
        raise HubError(f"{where}, {kind}{repo} has no revision {revision!r}") from None
    except errors["repository"]:
        raise HubError(f"{where}: no {kind}repository {repo} on the Hub (or it is private: log in with "
                       "`hf auth login` or set HF_TOKEN)") from None
    except errors["local"] as e:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        what = f"{repo}@{revision}" if revision else repo
        raise HubError(f"{where}, {kind}{what} is not in the cache ({constants.HF_HUB_CACHE}) "
                       f"and {offline}; download it once with network (`hf download {repo}"
                       f"{' --repo-type dataset' if kind else ''}`) or give a local directory"
                       + _cause(e)) from None
    _RESOLVED[key] = Path(path)
    return _RESOLVED[key]


_RESOLVED: dict = {}
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".gz", ".yaml", ".yml", ".txt")


def _cause(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f" ({text})" if "incomplete" in text.lower() else ""


def _error_classes() -> dict:
    try:
        from huggingface_hub import errors as e
    except ImportError:  # huggingface_hub < 0.23 kept them in utils
        from huggingface_hub import utils as e
    return {"gated": e.GatedRepoError, "revision": e.RevisionNotFoundError,
            "repository": e.RepositoryNotFoundError, "local": e.LocalEntryNotFoundError}
