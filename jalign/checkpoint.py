"""Orbax checkpoints of the train state (params, optimizer, step, rng), the data iterator and metadata.

Saves are atomic (orbax writes a temporary directory and renames it when complete), optionally
asynchronous, keep the newest N, and are written by every process for its own shards (orbax's
multi-process support); the data-iterator state is saved per process (grain's handler).

Faults, and what the loop gets instead of a traceback:

* **A damaged step** (metadata deleted or garbled, truncated or corrupted array files, an empty step
  directory, a missing item, a missing data-iterator file): :meth:`Checkpointer.restore` raises one
  :class:`CheckpointError` naming the step and what is wrong; :meth:`Checkpointer.restore_latest`
  falls back to the newest step that loads, warns naming the damaged ones, and moves them to
  ``checkpoints/damaged/`` (so that later saves of those steps do not collide with them). Array bytes
  can rot without any reader noticing, so every save records two modular (uint32, order-independent,
  so exact across shardings) checksums per leaf in the ``meta`` item, and a restore compares them.
* **A failed write** (disk full, quota, permissions): the background save's error surfaces as one
  :class:`CheckpointWriteError` ("out of space at PATH while saving step N; the last good checkpoint is
  step M") at the next :meth:`~Checkpointer.check` (cheap: call it every step), :meth:`~Checkpointer.save`,
  :meth:`~Checkpointer.wait` or :meth:`~Checkpointer.close`, and only once. The partial step is
  removed; the previous checkpoints are untouched. orbax's own tracebacks for that failure (logged from
  its threads) are dropped: the exception carries them as its ``__cause__``.
* **A different model**: a state whose shapes differ from the checkpoint's is a :class:`CheckpointMismatch`
  naming the tensors (never mistaken for damage); :func:`jalign.resume.check_resume_config` names the
  config keys.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointHandler as _GrainHandler
from grain.checkpoint import CheckpointRestore, CheckpointSave

from jalign.errors import JalignError

_CHECKSUMS = "_checksums"  # key of the per-leaf checksums in the meta item
_DAMAGED = "damaged"  # subdirectory the damaged steps are moved to


class CheckpointError(JalignError, RuntimeError):
    """A checkpoint that cannot be used; the message names the directory/step and what is wrong."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is readable but holds a differently shaped state (the config changed)."""


class CheckpointWriteError(CheckpointError):
    """A save failed (out of space, permissions, ...); the previous checkpoints are kept."""

    exit_code = 1  # the machine, not the input


# ---- quieting orbax's noise for failures we report ourselves -------------------------------------
class _OrbaxNoiseFilter(logging.Filter):
    """Drops exactly these absl records emitted by orbax code: ERRORs with a traceback (a failed
    background save or restore, which Checkpointer re-raises as one exception with that traceback as
    its cause), the warning that a ``_CHECKPOINT_METADATA`` file does not exist, and the warning that
    an item "could not be restored" (a step without state/_METADATA, reported by restore)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        if record.levelno >= logging.ERROR and record.exc_info:
            return False
        msg = record.getMessage()
        if msg.startswith("Metadata file does not exist") and msg.endswith("_CHECKPOINT_METADATA"):
            return False
        # item metadata of a damaged step (no state/_METADATA): restore() says what is wrong instead
        return not (msg.startswith('Item "') and "was found in the checkpoint, but could not be restored" in msg)


class _OrbaxTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's abandoned write tasks of a
    failed save (logged when they are garbage-collected, often at exit; the failure was raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Task exception was never retrieved") and f"{os.sep}orbax{os.sep}" in msg)


def _unraisable_filter(previous):
    # After a failed read/write, tensorstore completes the other futures once orbax has closed their
    # asyncio loop ("Event loop is closed"), and orbax's abandoned write coroutines are finalised at
    # interpreter exit ("sys.meta_path is None"): a traceback each, through sys.unraisablehook.
    # Nothing is lost: the failure itself is raised to the caller.
    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        code = getattr(obj, "cr_code", None)
        if (isinstance(exc, ImportError) and "sys.meta_path is None" in str(exc) and code is not None
                and f"{os.sep}orbax{os.sep}" in code.co_filename):
            return
        previous(unraisable)

    hook._jalign_checkpoint = True
    return hook


def _quiet_orbax() -> None:
    for name, cls in (("absl", _OrbaxNoiseFilter), ("asyncio", _OrbaxTaskFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
    if not getattr(sys.unraisablehook, "_jalign_checkpoint", False):
        sys.unraisablehook = _unraisable_filter(sys.unraisablehook)


# ---- checksums -----------------------------------------------------------------------------------
def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_sums(x) -> jax.Array:
    """[sum(bits), sum(bits * (1 + flat index))] mod 2**32 of the raw bits: integer sums are
    associative, so the result is exact whatever the sharding or reduction order."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        u = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
    w, stride = jnp.ones(u.shape, jnp.uint32), 1
    for d in reversed(range(u.ndim)):
        w = w + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)])


_sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def _memory_kind(x):
    return getattr(getattr(x, "sharding", None), "memory_kind", None)


def checksums(tree) -> dict[str, list]:
    """``{"params/embed": [dtype, s1, s2], ...}`` for every array leaf (see :func:`_leaf_sums`)."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if isinstance(x, (jax.Array, np.ndarray))]
    if not flat:
        return {}
    leaves = [x for _, x in flat]
    hosted = [i for i, x in enumerate(leaves) if _memory_kind(x) not in (None, "device")]
    on_device = [x for i, x in enumerate(leaves) if i not in set(hosted)]
    out = _sums(on_device) if on_device else []
    for i in hosted:  # host-memory leaves (an offloaded optimizer state): one device copy at a time
        x = leaves[i]
        out.insert(i, _sums([jax.device_put(x, x.sharding.with_memory_kind("device"))])[0])
    host = [np.asarray(o.addressable_shards[0].data) if isinstance(o, jax.Array) else np.asarray(o) for o in out]
    return {_path_str(p): [str(x.dtype), int(h[0]), int(h[1])] for (p, x), h in zip(flat, host)}


def _checksum_problems(tree, saved: Optional[dict], prefix: str = "") -> list[str]:
    if not saved:
        return []  # written before checksums existed
    bad = []
    for path, (dtype, s1, s2) in checksums(tree).items():
        want = saved.get(prefix + path)
        if want is not None and want[0] == dtype and (want[1], want[2]) != (s1, s2):
            bad.append(prefix + path)
    return bad


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def _out_of_space(exc: Optional[BaseException]) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if ("No space left on device" in text or "Disk quota exceeded" in text
                or re.search(r"os_error_code='(28|122)'", text)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ---- the data iterator ---------------------------------------------------------------------------
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


_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def _data_files(step_dir: Path) -> tuple[Optional[dict], str]:
    """``({process: path}, "")`` of a complete set of data-iterator files saved by P processes, or
    ``(None, what is wrong)``."""
    data_dir = step_dir / "data"
    if not data_dir.is_dir():
        return None, "item 'data' (the data-iterator position) is missing"
    files = {}
    for f in data_dir.iterdir():
        m = _PROCESS_FILE.match(f.name)
        if m:
            files.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if not files:
        return None, "item 'data' has no data-iterator file (process_*-of-*.json)"
    if len(files) > 1:
        return None, f"item 'data' mixes files of {sorted(files)} processes"
    (count, found), = files.items()
    missing = sorted(set(range(count)) - set(found))
    if missing:
        return None, f"item 'data' lacks process_{missing[0]}-of-{count}.json ({len(found)} of {count} files)"
    return found, ""


def _step_problem(step_dir: Path, required: tuple) -> str:
    """What is missing from a step directory ('' if nothing)."""
    if not step_dir.is_dir():
        return "no such checkpoint"
    if not any((step_dir / i).is_dir() for i in ("state", "meta", "data")):
        return "empty step directory (no state, meta or data item)"
    return next((f"item '{i}' is missing" for i in required if not (step_dir / i).is_dir()), "")


def _json_problem(path: Path) -> str:
    """What is wrong with a JSON file of a checkpoint ('' if it is fine or absent)."""
    if not path.is_file():
        return ""
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        return f"is not valid JSON ({_short(e, 120)})"
    return ""


def _handlers(state_handler) -> dict:
    return {"state": state_handler, "meta": ocp.JsonCheckpointHandler(), "data": _GrainHandler()}


def _agree(ok: bool) -> bool:
    """True on every process iff ``ok`` on every process (one collective on several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jnp.asarray(int(ok))).min())


class Checkpointer:
    """The loop's checkpoints. Per step: ``check()``; at checkpoint steps ``save(...)``; at the end
    ``wait()`` then ``close()``; on resume ``restore_latest(...)`` (see the module docstring)."""

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers(ocp.StandardCheckpointHandler()))
        self._pending: Optional[int] = None  # step of a background save not yet known to have finished
        self._failure: Optional[CheckpointWriteError] = None
        self._reported = False

    # -- steps --
    def latest_step(self) -> Optional[int]:
        """The newest finished step (it may still be damaged: see :meth:`restore_latest`)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving --
    def save(self, step: int, state: dict, data_iterator=None, meta: Optional[dict] = None,
             force: bool = False) -> bool:
        """Start saving ``step`` (in the background with ``async_save``). Raises
        :class:`CheckpointWriteError` if this save, or an earlier background one, failed."""
        self._finish_pending(block=True)  # orbax would wait for it anyway; this attributes its errors
        if self._failure is not None:  # orbax's manager is unusable after a failed save: stop here too
            self._reported = True
            raise self._failure
        meta = {**(meta or {}), _CHECKSUMS: checksums(state)}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = CheckpointSave(_IteratorSnapshot(data_iterator, data_iterator.get_state()))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported as one error
            self._fail(step, e)
            self._reported = True
            raise self._failure from e
        if saved:
            self._pending = step  # finished or not: check() asks orbax when it is no longer in progress
        return saved

    def check(self) -> None:
        """Cheap (no I/O, no collective): raises :class:`CheckpointWriteError` once if a background
        save has failed since the last call."""
        self._finish_pending(block=False)
        self._raise_failure()

    def wait(self) -> None:
        """Block until the background save is written; raises :class:`CheckpointWriteError` if it failed."""
        self._finish_pending(block=True)
        self._raise_failure()

    def close(self) -> None:
        """Wait for the background save and release orbax's threads. Raises a write failure that was
        not reported yet; one already raised by check/save/wait is not raised (or printed) again."""
        try:
            self._finish_pending(block=True)
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - orbax re-raises a failure we hold already
                if self._failure is None:
                    self._fail(self._pending if self._pending is not None else -1, e)
        self._raise_failure()

    def _finish_pending(self, block: bool) -> None:
        if self._pending is None:
            return
        if not block and self.manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)

    def _fail(self, step: int, exc: BaseException) -> None:
        if self._failure is not None:
            return
        self._cleanup_partial(step)
        try:
            self.manager.reload()
            good = self.manager.latest_step()
        except Exception:  # noqa: BLE001 - the message must come out even if listing fails
            good = None
        last = f"the last good checkpoint is step {good}" if good is not None else "there is no earlier checkpoint"
        if _out_of_space(exc):
            try:
                free = f" ({shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free)"
            except OSError:
                free = ""
            msg = f"out of space at {self.directory}{free} while saving step {step}; {last}"
        else:
            msg = f"could not write {self.directory}/{step} ({_short(exc)}); {last}"
        self._failure = CheckpointWriteError(msg)
        self._failure.__cause__ = exc

    def _raise_failure(self) -> None:
        if self._failure is not None and not self._reported:
            self._reported = True
            raise self._failure

    def _cleanup_partial(self, step: int) -> None:
        """Remove the unfinished ``<step>.orbax-checkpoint-tmp*`` directory (frees the space it took)."""
        if jax.process_index() != 0 or step < 0:
            return
        for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)

    # -- restoring --
    def restore(self, step: int, abstract_state: dict, data_iterator=None) -> tuple[dict, dict]:
        """The train state (re-sharded onto ``abstract_state``'s shardings, whatever the saving
        topology) and metadata; the data iterator is positioned where the save left it.

        The iterator state is saved per process. Restored with a different process count, it is
        converted when that is exact (see :func:`reshard_iterator_state`); otherwise the iterator
        starts from the beginning of its data and a warning says so. Raises :class:`CheckpointError`
        naming the step and the damage, :class:`CheckpointMismatch` if the shapes differ.
        """
        where = f"{self.directory}/{step}"
        step_dir = self.directory / str(step)
        problem = _step_problem(step_dir, ("state", "meta"))
        if problem:
            raise CheckpointError(f"{where}: {problem}")
        files = None
        if data_iterator is not None:
            files, problem = _data_files(step_dir)
            if files is None:
                raise CheckpointError(f"{where}: {problem}")
        for f in [step_dir / "state" / "_METADATA", step_dir / "meta" / "metadata", *(files or {}).values()]:
            problem = _json_problem(f)
            if problem:
                raise CheckpointError(f"{where}: {f.relative_to(step_dir)} {problem}")
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        own = files is not None and len(files) == jax.process_count()
        if own:
            items["data"] = CheckpointRestore(_IteratorSnapshot(data_iterator))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - a damaged step, whatever the reader's complaint
            raise CheckpointError(f"{where}: cannot be read ({_short(e)})") from e
        meta = dict(out["meta"] or {})
        bad = _checksum_problems(out["state"], meta.pop(_CHECKSUMS, None))
        if bad:
            raise CheckpointError(f"{where}: corrupt array data: {', '.join(bad[:4])}"
                                  + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
                                  + " do not match the checksums saved with them")
        if files is not None and not own:
            try:
                states = [json.loads(files[i].read_text()) for i in sorted(files)]
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{where}: data-iterator file unreadable ({_short(e)})") from e
            new = reshard_iterator_state(states, jax.process_index(), jax.process_count())
            if new is None:
                warnings.warn(f"{where}: the data-iterator state was saved by {len(states)} processes and "
                              f"cannot be converted exactly to {jax.process_count()}; the data iterator starts "
                              "again from the beginning of its data", stacklevel=2)
            else:
                data_iterator.set_state(new)
        return out["state"], meta

    def _check_shapes(self, step: int, abstract_state: dict) -> None:
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.directory}/{step}: the state cannot be read ({_short(e)})") from e
        if saved is None or not getattr(saved, "tree", None):  # no _METADATA: the restore (and checksums) will tell
            return
        saved = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
            saved.tree, is_leaf=lambda x: hasattr(x, "shape"))[0]}
        diffs = []
        for p, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            name = _path_str(p)
            have = saved.get(name)
            if have is None:
                diffs.append(f"{name} is not in the checkpoint")
            elif tuple(getattr(have, "shape", ())) != tuple(want.shape):
                diffs.append(f"{name} is {list(have.shape)} in the checkpoint but {list(want.shape)} now")
        if diffs:
            raise CheckpointMismatch(f"{self.directory}/{step}: the checkpoint holds a different model: "
                                     + "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
                                     + ". Did the model or algorithm config change? Use a new train.out_dir.")

    def restore_latest(self, abstract_state: dict, data_iterator=None,
                       log: Optional[Callable[[str], None]] = None) -> Optional[tuple[int, dict, dict]]:
        """``(step, state, meta)`` of the newest step that loads, or None if there is no checkpoint.

        Damaged newer steps are skipped with a warning (``log``, default ``warnings.warn``) naming each
        and what is wrong, and moved to ``checkpoints/damaged/``. Raises :class:`CheckpointError`
        naming the directory if no step loads, :class:`CheckpointMismatch` on a shape mismatch.
        All processes agree on the step.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state, data_iterator)
                ok = True
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                ok, reason = False, str(e)
            if not _agree(ok):
                damaged.append((step, reason if not ok else "damaged on another process"))
                continue
            if damaged:
                self._set_aside(damaged, step, log)
            return step, state, meta
        if damaged:
            raise CheckpointError(f"{self.directory}: no checkpoint can be loaded ("
                                  + "; ".join(r for _, r in damaged) + ")")
        return None

    def _set_aside(self, damaged: list[tuple[int, str]], restored: int, log) -> None:
        target = self.directory / _DAMAGED
        moved = []
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
            for step, _ in damaged:
                dest = target / str(step)
                k = 1
                while dest.exists():
                    dest, k = target / f"{step}.{k}", k + 1
                (self.directory / str(step)).rename(dest)
                moved.append(str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jalign_checkpoint_set_aside:{self.directory}")
        self.manager.reload()
        msg = (f"checkpoint: resuming from step {restored}; skipped damaged "
               + "; ".join(reason for _, reason in damaged)
               + (f" (moved to {', '.join(moved)})" if moved else ""))
        (log or (lambda m: warnings.warn(m, stacklevel=3)))(msg)


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


def _read_manager(directory: Path):
    return ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=_handlers(ocp.PyTreeCheckpointHandler()))


def spread_sharding(shape: tuple, devices: Optional[Sequence] = None) -> jax.sharding.NamedSharding:
    """A leaf of ``shape`` split over ``devices`` (default: this process's) along its largest axis they
    divide; replicated when none does (a bias of odd length). Used where no mesh is given, so that no whole
    model is ever staged on one device."""
    devices = list(devices if devices is not None else jax.local_devices())
    mesh = jax.sharding.Mesh(np.array(devices), ("shard",))
    n = len(devices)
    axes = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    spec = [None] * len(shape)
    if axes and n > 1:
        spec[max(axes, key=lambda i: shape[i])] = "shard"
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _restore_shardings(params_meta, shardings, where: str):
    """One sharding per saved leaf: ``shardings``' (a tree of the params' structure) or spread ones."""
    if shardings is None:
        return jax.tree.map(lambda m: spread_sharding(tuple(m.shape)), params_meta)
    want, got = jax.tree.structure(params_meta), jax.tree.structure(shardings)
    if want != got:
        saved = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params_meta)[0]}
        given = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        diff = sorted(saved ^ given)
        raise CheckpointMismatch(f"{where}: the params saved here and the shardings asked for differ in "
                                 f"{', '.join(diff[:6]) or 'their tree structure'}"
                                 + (f" and {len(diff) - 6} more" if len(diff) > 6 else ""))
    return shardings


def _restore_params(mgr, directory: Path, step: int, shardings=None) -> dict:
    where = f"{directory}/{step}"
    problem = _step_problem(directory / str(step), ("state",))
    if not problem and _json_problem(directory / str(step) / "state" / "_METADATA"):
        problem = "state/_METADATA " + _json_problem(directory / str(step) / "state" / "_METADATA")
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    try:
        saved = mgr.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: the state cannot be read ({_short(e)})") from e
    tree = getattr(saved, "tree", None)
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{where}: the state's metadata (state/_METADATA) is missing or holds no params")
    params_meta = tree["params"]
    placed = _restore_shardings(params_meta, shardings, where)
    restore_args = jax.tree.map(lambda _, sh: ocp.ArrayRestoreArgs(sharding=sh), params_meta, placed)
    items = {"state": ocp.args.PyTreeRestore(item={"params": params_meta}, restore_args={"params": restore_args},
                                             partial_restore=True)}
    has_meta = (directory / str(step) / "meta").is_dir()
    if has_meta:
        items["meta"] = ocp.args.JsonRestore()
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: cannot be read ({_short(e)})") from e
    params = out["state"]["params"]
    bad = _checksum_problems(params, (out["meta"] or {}).get(_CHECKSUMS) if has_meta else None, prefix="params/")
    if bad:
        raise CheckpointError(f"{where}: corrupt array data: {', '.join(bad[:4])} do not match the checksums "
                              "saved with them")
    return params


def load_params(path: str | Path, step: Optional[int] = None, *, shardings=None) -> dict:
    """Only the params of a jalign checkpoint (newest loadable step unless given), restored sharded.

    ``shardings``: a tree of the params' structure holding each leaf's target sharding (e.g. a train
    state's ``params`` shardings on the run's mesh): orbax reads only this process's slices of each leaf
    straight onto them. Without it every leaf is split over this process's devices along its largest
    axis they divide (:func:`spread_sharding`); no whole model is staged on one device either way.
    A damaged given ``step`` raises :class:`CheckpointError`; without ``step`` damaged newer steps are
    skipped with a warning. (Training starts go through :mod:`jalign.models.load`, which also checks
    shapes per role; this is the reader for tools: export, tests.)
    """
    _quiet_orbax()
    directory = find_checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory found (expected a run dir with checkpoints/)")
    mgr = _read_manager(directory)
    try:
        if step is not None:
            return _restore_params(mgr, directory, step, shardings)
        steps = sorted(mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{directory}: contains no finished checkpoint")
        problems = []
        for s in steps:
            try:
                params = _restore_params(mgr, directory, s, shardings)
            except CheckpointMismatch:
                raise  # the caller asked for another tree: an older step is no better
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                warnings.warn(f"{directory}: loading params of step {s}; skipped damaged " + "; ".join(problems),
                              stacklevel=2)
            return params
        raise CheckpointError(f"{directory}: no checkpoint can be loaded (" + "; ".join(problems) + ")")
    finally:
        mgr.close()
