"""Orbax checkpoints of the train state (params, optimizer, step, rng), the data iterator and metadata.

Saves are atomic (orbax writes a temporary directory and renames it when complete), optionally
asynchronous, keep the newest N, and are written by every process for its own shards (orbax's
multi-process support); the data-iterator state is saved per process (grain's handler).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

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
        """The train state (re-sharded onto ``abstract_state``'s shardings, whatever the saving
        topology) and metadata; the data iterator is positioned where the save left it.

        The iterator state is saved per process. Restored with a different process count, it is
        converted when that is exact (see :func:`reshard_iterator_state`); otherwise the iterator
        starts from the beginning of its data and a warning says so.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        saved = None
        if data_iterator is not None:
            data_dir = self.directory / str(step) / "data"
            own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if own.exists() or not data_dir.is_dir():
                items["data"] = CheckpointRestore(_IteratorSnapshot(data_iterator))
            else:
                saved = sorted(data_dir.glob("process_*-of-*.json"))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if saved is not None:
            states = [json.loads(f.read_text()) for f in saved]
            new = reshard_iterator_state(states, jax.process_index(), jax.process_count())
            if new is None:
                warnings.warn(f"{self.directory}/{step}: the data-iterator state was saved by {len(states)} "
                              f"processes and cannot be converted exactly to {jax.process_count()}; the "
                              f"data iterator starts again from the beginning of its data", stacklevel=2)
            else:
                data_iterator.set_state(new)
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def reshard_iterator_state(states: list[dict], process_index: int, process_count: int) -> Optional[dict]:
    """This process's iterator state from the states saved by another number of processes, or None.

    Exact for the unpacked pipelines (``{"next_index": m}`` on every process): the data are shuffled
    as a whole and then sliced ``[p::P]``, so P processes at slice position ``m`` have together
    consumed the first ``m * P`` examples of the epoch's order, which Q processes reach at
    ``m * P / Q`` (needs Q to divide ``m * P``). Across an epoch boundary this also requires the
    number of examples to be divisible by P and Q. Packed pipelines carry partial rows: None.
    """
    if not states or any(set(s) != {"next_index"} for s in states):
        return None
    positions = {int(s["next_index"]) for s in states}
    if len(positions) != 1:
        return None
    consumed = positions.pop() * len(states)
    if consumed % process_count:
        return None
    return {"next_index": consumed // process_count}


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
