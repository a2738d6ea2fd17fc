"""A Hugging Face Hub cache filled from local files, as huggingface_hub itself lays it out (no network).

    commit = populate(cache_dir, "org/tiny-llama", src_dir)                 # refs/main -> that commit
    populate(cache_dir, "org/tiny-llama", other_dir, revision="v1")         # a tag with another snapshot

The layout is the one ``huggingface_hub`` downloads into (its "manage cache" guide): ``REPO_FOLDER/blobs/HASH``
holds each file once, ``snapshots/COMMIT/PATH`` are relative symlinks to the blobs, ``refs/REVISION`` names the
commit. The folder name comes from ``huggingface_hub.file_download.repo_folder_name`` and the commit's file
listing is written with huggingface_hub's own tree cache (``write_tree_cache``), which offline resolution reads
to check that a snapshot is complete. Tests check the result with ``huggingface_hub.scan_cache_dir``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def populate(cache_dir, repo_id: str, src_dir, *, revision: str = "main", repo_type: str = "model") -> str:
    from huggingface_hub.file_download import repo_folder_name

    src_dir = Path(src_dir)
    files = sorted(p for p in src_dir.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode() + revision.encode())
    for p in files:
        digest.update(p.relative_to(src_dir).as_posix().encode() + p.read_bytes())
    commit = digest.hexdigest()  # 40 hex digits, like a git commit
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    entries = {}
    for p in files:
        rel = p.relative_to(src_dir).as_posix()
        data = p.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / blob, link.parent))
        entries[rel] = _tree_entry(data, blob)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    from huggingface_hub._tree_cache import write_tree_cache

    write_tree_cache(str(storage), commit, entries)
    return commit


def _tree_entry(data: bytes, sha256: str):
    from huggingface_hub._tree_cache import TreeCacheEntry

    blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
    return TreeCacheEntry(size=len(data), blob_id=blob_id, lfs_sha256=sha256, lfs_size=len(data))
