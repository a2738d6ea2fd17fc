"""Orbax checkpoints of the train state (params, optimizer, step, rng), the data iterator and metadata.

Saves are atomic (orbax writes a temporary directory and renames it when complete), optionally
asynchronous, keep the newest N, and are written by every process for its own shards (orbax's
multi-process support); the data-iterator state is saved per process (grain's handler).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointRestore, CheckpointSave


class _IteratorSnapshot:
    """The iterator state captured *now*, so an async save cannot see a later position.

    grain's orbax handler calls ``get_state()`` (bytes for non-``DatasetIterator`` objects) on save and
    ``set_state(bytes)`` + ``start_prefetch()`` on restore.
    """

    def __init__(self, iterator, state: Optional[dict] = None):
        self.iterator = iterator
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator=None, meta: Optional[dict] = None,
             force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = CheckpointSave(_IteratorSnapshot(data_iterator, data_iterator.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, data_iterator=None) -> tuple[dict, dict]:
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = CheckpointRestore(_IteratorSnapshot(data_iterator))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_checkpoint_dir(path: str | Path) -> Path:
    """A run directory (with checkpoints/) or a checkpoints directory itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def load_params(path: str | Path, step: Optional[int] = None) -> dict:
    """Only the params of a jalign checkpoint (newest step unless given), as host-local arrays.

    Used to start one stage from another (SFT -> reward model / DPO / PPO). The arrays are restored
    unsharded and re-placed by the caller onto its own mesh.
    """
    directory = find_checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory found (expected a run dir with checkpoints/)")
    mgr = ocp.CheckpointManager(directory.absolute())
    step = mgr.latest_step() if step is None else step
    mgr.close()
    if step is None:
        raise FileNotFoundError(f"{directory}: contains no finished checkpoint")
    path = directory.absolute() / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    params_meta = tree["params"]
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), params_meta)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]
