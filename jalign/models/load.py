"""THE weight loader: every role's parameters straight onto their shardings, from one kind of spec.

    source = parse_source("run:runs/sft@200", where="model.init_from")   # or "hf:DIR", "random", a bare DIR
    arch = source_architecture(source)         # the ModelConfig the weights were saved with (None: random)
    params = load_params(source, decls, mesh=mesh, rules=rules, dtype=jnp.float32, seed=0,
                         allow_fresh=("score", "score_bias"), role="reward model", where="model.init_from")

Where the weights come from:

* ``hf:DIR`` - a Hugging Face directory (config.json + safetensors), read with ``hf_io``'s
  memory-mapped safetensors reader and name/layout table. Each leaf is read layer-major: one HF tensor
  is mapped at a time and only this process's devices' slices of it are copied out, into per-device
  host buffers that become the device buffers (``jax.make_array_from_single_device_arrays``), so
  the host holds at most one leaf beyond what the devices hold.
* ``run:DIR[@STEP]`` - a jalign run directory (``DIR/checkpoints/STEP/state``, newest step by
  default; only the ``params`` subtree of the train state is read), a ``jalign convert --out DIR``
  directory (``DIR/params``), or an orbax pytree checkpoint directory itself. Orbax restores against
  an abstract target that carries each leaf's sharding and dtype, reading only the leaves asked for and
  only the addressable slices of each, whatever mesh or process count saved it.
* ``random`` (or no spec) - ``params.init_params`` placed shard by shard.

Strictness: every declared leaf must be in the source with exactly the declared shape. A missing leaf
may start fresh only if its path starts with one of ``allow_fresh`` (the score head of a new reward
model or critic); the log names those. Anything else missing or mis-shaped, and any NaN/inf in a
loaded leaf (checked on the host as each HF slice is copied, on device for a run), is one
:class:`LoadError`. Leaves the source has but ``decls`` does not need (an
``lm_head`` when loading a reward-model trunk) are ignored.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.config import ConfigError, ModelConfig
from jalign.models import params as params_lib

# How many bad tensors a message lists before "... and N more".
_SHOWN = 6
_FIX = "set the model: section to the source's architecture, or drop it to take it from the source"


class LoadError(ConfigError):
    """Weights that cannot be loaded as configured; the message names the source, the config key and
    every offending tensor (with checkpoint vs config shapes where they differ)."""


@dataclass(frozen=True)
class WeightSource:
    """Where a role's weights come from (parsed from a config string by :func:`parse_source`)."""

    kind: Literal["hf", "run", "random"]
    path: Optional[str] = None  # an HF directory / a jalign run dir or `jalign convert` dir
    step: Optional[int] = None  # run:DIR@STEP (None: the newest finished step)
    hub: Optional[str] = None  # the Hub name (org/name[@revision]) ``path`` was resolved from, if any

    def __str__(self) -> str:
        if self.kind == "random":
            return "random"
        if self.hub:
            return f"hf:{self.hub}"
        return f"{self.kind}:{self.path}" + (f"@{self.step}" if self.step is not None else "")


RANDOM = WeightSource("random")


# ---- parsing --------------------------------------------------------------------------------------
def parse_source(spec: Optional[str], *, where: str) -> WeightSource:
    """``"hf:DIR"``, ``"run:DIR"``, ``"run:DIR@STEP"``, ``"random"``, ``None`` (random) or a bare
    directory, recognised by its contents (config.json: hf; config.yaml, checkpoints/ or params/: run).
    ``hf:org/name[@revision]`` or a bare ``org/name[@revision]`` that is no local path is a Hugging Face Hub
    model, resolved to its snapshot directory through huggingface_hub's cache (:mod:`jalign.hub`).

    The directory must exist and hold what its kind needs; errors name ``where`` (the config key).
    """
    if spec is None or str(spec).strip() in ("", "random"):
        return RANDOM
    spec = str(spec).strip()
    kind, rest = None, spec
    for prefix in ("hf:", "run:"):
        if spec.startswith(prefix):
            kind, rest = prefix[:-1], spec[len(prefix):]
    hub = _hub_source(kind, rest, where, spec)
    if hub is not None:
        return hub
    path, step = _split_step(rest, where, spec)
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{where}={spec}: {p} does not exist (expected hf:DIR, run:DIR[@STEP] or random)")
    if not p.is_dir():
        raise LoadError(f"{where}={spec}: {p} is a file; weights come from a directory "
                        f"(hf:DIR, run:DIR[@STEP]) or random")
    looks = _looks_like(p)
    if kind is None:
        if len(looks) != 1:
            what = "both a Hugging Face and a jalign directory" if looks else "neither a Hugging Face " \
                   "directory (no config.json) nor a jalign run (no config.yaml, checkpoints/ or params/)"
            raise LoadError(f"{where}={spec}: {p} is {what}; write hf:{path} or run:{path}")
        kind = looks.pop()
    elif kind not in looks:
        other = {"run": f"a jalign run directory: write run:{path}", "hf": f"a Hugging Face directory: write "
                 f"hf:{path}"}[next(iter(looks))] if looks else "empty of weights"
        need = {"hf": "config.json + safetensors", "run": "config.yaml, checkpoints/ or params/"}[kind]
        raise LoadError(f"{where}={spec}: {p} is not a {'Hugging Face' if kind == 'hf' else 'jalign'} "
                        f"directory (needs {need}); it is {other}")
    if kind == "hf" and step is not None:
        raise LoadError(f"{where}={spec}: @STEP applies to run: sources only")
    return WeightSource(kind, str(p), step)


def _hub_source(kind: Optional[str], rest: str, where: str, spec: str) -> Optional[WeightSource]:
    """A Hub model name that is no local path -> its snapshot directory (None: not a Hub name)."""
    from jalign import hub

    if kind == "run" or hub.is_local(rest) or hub.parse_name(rest) is None:
        return None
    return WeightSource("hf", str(hub.resolve_model(rest, where=where)), hub=rest)


def _split_step(rest: str, where: str, spec: str) -> tuple[str, Optional[int]]:
    """``DIR@STEP`` -> (DIR, STEP); a path that itself contains '@' and exists is left alone."""
    if "@" not in rest or Path(rest).expanduser().exists():
        return rest, None
    path, _, step = rest.rpartition("@")
    if not step.isdigit():
        raise LoadError(f"{where}={spec}: the step after '@' must be a non-negative integer, got {step!r}")
    return path, int(step)


def _looks_like(p: Path) -> set:
    kinds = set()
    if (p / "config.json").is_file():
        kinds.add("hf")
    if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir() or (p / "params").is_dir() \
            or (p / "_METADATA").is_file():
        kinds.add("run")
    return kinds


# ---- architecture ---------------------------------------------------------------------------------
def source_architecture(source: WeightSource, *, seq_len: Optional[int] = None,
                        where: str = "model") -> Optional[ModelConfig]:
    """The ModelConfig the source was saved with: an HF directory's config.json, a run's (or a
    ``jalign convert`` directory's) ``config.yaml`` model section; None for random. ``seq_len`` is
    checked against an HF model's sliding window (see ``hf_io.model_config_from_hf``)."""
    if source.kind == "random":
        return None
    if source.kind == "hf":
        from jalign.models import hf_io

        try:
            return hf_io.model_config_from_hf(source.path, seq_len=seq_len)
        except hf_io.HFCheckpointError as e:
            raise LoadError(f"{where}={source}: {e}") from None
    from jalign.config import load_config

    path = Path(source.path) / "config.yaml"
    if not path.is_file():
        raise LoadError(f"{where}={source}: no config.yaml, so the architecture it was saved with is unknown; "
                        f"give the model: section explicitly")
    return load_config(path).model


# ---- loading --------------------------------------------------------------------------------------
def load_params(source: WeightSource, decls: dict, *, mesh, rules, dtype=jnp.float32, seed=0,
                allow_fresh: Sequence[str] = (), role: str = "policy", where: str = "model",
                log: Callable[[str], None] = print) -> dict:
    """Params for ``decls`` from ``source``, each leaf created directly with its target sharding
    (``params.param_shardings(decls, mesh, rules)``) and ``dtype``.

    Raises :class:`LoadError` for missing leaves (other than those under ``allow_fresh``), leaves of
    another shape, and non-finite loaded values. ``seed`` (an int or a JAX key) seeds the leaves that
    start fresh, with the same values ``params.init_params`` would give them in a full random init.
    """
    shardings = params_lib.flatten(params_lib.param_shardings(decls, mesh, rules))
    flat = params_lib.flatten_decls(decls)
    if source.kind == "random":
        log(f"{role}: {len(flat)} tensors initialised at random")
        return params_lib.init_params(decls, seed, dtype, params_lib.unflatten(shardings))
    reader = _HFReader(source, where) if source.kind == "hf" else _RunReader(source, where)
    available = reader.shapes()
    missing = [p for p in flat if p not in available]
    fresh = [p for p in missing if any(p.startswith(a) for a in allow_fresh)]
    mismatched = [p for p in flat if p in available and tuple(available[p]) != tuple(flat[p].shape)]
    bad = [p for p in missing if p not in fresh]
    if mismatched or bad:
        raise LoadError(_mismatch_message(source, where, role, flat, available, mismatched, bad))
    wanted = {p: flat[p] for p in flat if p not in missing}
    loaded = reader.read(wanted, {p: shardings[p] for p in wanted}, dtype)
    nonfinite = reader.nonfinite(loaded)
    if nonfinite:
        raise LoadError(f"{where}={source}: the {role}'s weights contain NaN or inf in "
                        f"{_listing(nonfinite)}; the checkpoint is damaged or diverged: point {where} at a "
                        f"good one")
    out = dict(loaded)
    if fresh:
        init = params_lib.init_params(params_lib.unflatten({p: flat[p] for p in fresh}), seed, dtype,
                                      params_lib.unflatten({p: shardings[p] for p in fresh}))
        out.update(params_lib.flatten(init))
        log(f"{role}: {len(loaded)} tensors from {source}; initialised fresh (not in the source): "
            f"{', '.join(fresh)}")
    else:
        log(f"{role}: {len(loaded)} tensors from {source}")
    return params_lib.unflatten({p: out[p] for p in flat})


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _mismatch_message(source, where, role, flat, available, mismatched, missing) -> str:
    lines = [f"{p}: checkpoint {tuple(available[p])} vs config {tuple(flat[p].shape)}" for p in mismatched]
    lines += [f"{p}: not in the checkpoint (config {tuple(flat[p].shape)})" for p in missing]
    head = f"{where}={source}: the {role}'s weights do not match the model configuration ("
    if mismatched:
        fix = _FIX
    else:  # only missing tensors: the architecture agrees, the checkpoint is of another kind of model
        fix = (f"the source lacks these tensors: point {where} at a checkpoint of this kind of model "
               f"(e.g. a reward-model run has a score head), or {_FIX}")
    more = f"; and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return head + "; ".join(lines[:_SHOWN]) + more + f"). Fix: {fix}"


def _nonfinite_leaves(flat: dict) -> list[str]:
    """Names of the leaves holding NaN/inf: one on-device reduction per leaf; only a boolean per leaf
    comes back to the host. One program per leaf, not one for all: XLA's CPU backend materialises
    ``isfinite(x)`` (a byte per element) before reducing, and in one program those temporaries of
    every leaf would be live together."""
    flags = {name: _all_finite(x) for name, x in flat.items()}
    return [name for name, ok in flags.items() if not bool(ok)]


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


# ---- Hugging Face directories ---------------------------------------------------------------------
class _HFReader:
    """An HF directory in our layout: ``shapes()`` from config.json, ``read()`` slice by slice."""

    def __init__(self, source: WeightSource, where: str):
        from jalign.models import hf_io
        from jalign.models.transformer import declare_params

        self.source, self.where, self.hf_io = source, where, hf_io
        try:
            self.cfg = hf_io.model_config_from_hf(source.path)
        except hf_io.HFCheckpointError as e:
            raise LoadError(f"{where}={source}: {e}") from None
        self.layout = hf_io._hf_layout(self.cfg)
        src_decls = params_lib.flatten_decls(declare_params(self.cfg))
        self._shapes = {p: d.shape for p, d in src_decls.items() if p in self.layout}

    def shapes(self) -> dict:
        return self._shapes

    def nonfinite(self, loaded: dict) -> list[str]:
        """Checked on the host while each slice was copied (the values pass through it anyway, and
        this needs no compiled program per leaf shape)."""
        return [p for p in loaded if p in self._nonfinite]

    def _names(self, path: str) -> list[str]:
        m = self.layout[path]
        if path.startswith("layers/"):
            return [m.hf_name.format(i=i) for i in range(self.cfg.layers)]
        return [m.hf_name]

    def read(self, wanted: dict, shardings: dict, dtype) -> dict:
        try:
            weights = self.hf_io.open_weights(self.source.path)
        except self.hf_io.HFCheckpointError as e:
            raise LoadError(f"{self.where}={self.source}: {e}") from None
        problems = []  # the files must agree with their own config.json before any device work
        for path in wanted:
            hf_shape = tuple(self.layout[path].hf_shape)
            for name in self._names(path):
                if name not in weights:
                    problems.append(f"tensor {name} (for {path}) is missing from the safetensors files")
                elif tuple(weights[name].shape(name)) != hf_shape:
                    problems.append(f"{weights[name].path.name}: tensor {name} has shape "
                                    f"{tuple(weights[name].shape(name))}, config.json says {hf_shape}")
        if problems:
            raise LoadError(f"{self.where}={self.source}: " + "; ".join(problems[:_SHOWN])
                            + (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""))
        np_dtype = np.dtype(dtype)
        self._nonfinite = set()
        out = {}
        with ThreadPoolExecutor(max_workers=min(jax.local_device_count(), os.cpu_count() or 1)) as pool:
            for path, decl in wanted.items():
                out[path] = self._leaf(weights, path, decl.shape, shardings[path], np_dtype, pool)
        return out

    def _leaf(self, weights, path, shape, sharding, np_dtype, pool) -> jax.Array:
        """One leaf, read layer-major: each HF tensor is mapped once, every addressable device's slice
        of it is copied out (in parallel threads: NumPy releases the GIL while copying), then it is
        unmapped, so at most one HF tensor's pages are mapped at a time and each page is faulted in
        once. The per-device host buffers are page-aligned, which lets ``jax.device_put`` on CPU adopt
        them as the device buffers (no second copy); on an accelerator they are this process's share
        of one leaf, freed once transferred."""
        m, stacked = self.layout[path], path.startswith("layers/")
        groups: dict = {}  # normalised index -> the devices holding that slice
        for device, idx in sharding.addressable_devices_indices_map(tuple(shape)).items():
            groups.setdefault(_normalise(idx, shape), []).append(device)
        buffers = {key: _aligned_empty(tuple(b - a for a, b in key), np_dtype) for key in groups}
        try:
            for i, name in enumerate(self._names(path)):
                view = m.to_ours(weights[name].array(name))
                jobs = []  # (destination, source slice) per distinct device slice
                for key, buf in buffers.items():
                    if not stacked:
                        jobs.append((buf, view[_slices(key)]))
                    elif key[0][0] <= i < key[0][1]:  # this layer lies in the device's slice of layers
                        jobs.append((buf[i - key[0][0]], view[_slices(key[1:])]))
                if not all(pool.map(lambda job: _cast_copy(*job), jobs)):
                    self._nonfinite.add(path)
                del view, jobs  # unmaps this tensor
        except (OSError, ValueError) as e:  # e.g. a truncated file: a map past its end
            raise LoadError(f"{self.where}={self.source}: cannot read the tensors of {path} ({e})") from None
        # On CPU, device_put adopts an aligned host buffer without copying, so replicas get a copy each:
        # no two device buffers may share memory. Elsewhere device_put copies and replicas share one.
        devices, host = [], []
        for key, group in groups.items():
            for j, device in enumerate(group):
                devices.append(device)
                host.append(_aligned_copy(buffers[key]) if j and device.platform == "cpu" else buffers[key])
        del buffers
        arrays = jax.device_put(host, devices)
        return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def _slices(key: tuple) -> tuple:
    return tuple(slice(a, b) for a, b in key)


def _normalise(idx: tuple, shape) -> tuple:
    """A device's index (a tuple of slices, possibly open) as ((start, stop), ...) per dimension."""
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    return tuple(s.indices(n)[:2] for s, n in zip(idx, shape))


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous memory map: page-aligned, which XLA's CPU client
    needs to adopt a host buffer as a device buffer without copying. Not ``np.empty``: NumPy asks the
    kernel for transparent huge pages on large arrays (madvise), and where the kernel compacts memory
    to satisfy that on each fault (``defrag=madvise``, the common default) filling the params cost
    several times more system time than the copy itself (13 s vs 3 s for a 1.1B model here)."""
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buf = mmap.mmap(-1, nbytes, flags=private) if private else mmap.mmap(-1, nbytes)
    return np.frombuffer(buf, dtype, count=count).reshape(shape)


def _aligned_copy(x: np.ndarray) -> np.ndarray:
    out = _aligned_empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out


def _cast_copy(dst: np.ndarray, src: np.ndarray) -> bool:
    """``dst[...] = src`` with a dtype cast; True if every copied value is finite (checked while
    ``dst`` is still in cache). A transposed (non-contiguous) ``src`` is cast in its own memory order
    first and then copied: a strided cast is several times slower than a contiguous cast followed by a
    same-dtype strided copy."""
    if src.dtype == dst.dtype or src.flags.c_contiguous:
        np.copyto(dst, src, casting="unsafe")
    else:
        np.copyto(dst, np.asarray(src, dst.dtype))
    return bool(np.isfinite(dst).all())


# ---- jalign runs and `jalign convert` directories -------------------------------------------------
class _RunReader:
    """An orbax pytree checkpoint: a run's ``checkpoints/STEP/state`` (its ``params`` subtree), a
    ``jalign convert`` directory's ``params/``, or a pytree checkpoint directory itself."""

    def __init__(self, source: WeightSource, where: str):
        self.source, self.where = source, where
        self.directory, self.step = self._locate()
        self.subtree, self._meta = self._metadata()

    def _locate(self) -> tuple[Path, Optional[int]]:
        p = Path(self.source.path)
        ckpts = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and (d / "state").is_dir()) \
            if ckpts.is_dir() else []
        if steps:
            step = steps[-1] if self.source.step is None else self.source.step
            if step not in steps:
                raise LoadError(f"{self.where}={self.source}: no finished checkpoint of step {step} in {ckpts} "
                                f"(there are steps {', '.join(map(str, steps))})")
            return ckpts / str(step) / "state", step
        if self.source.step is not None:
            raise LoadError(f"{self.where}={self.source}: {ckpts} has no checkpoint steps")
        for d in (p / "params", p):
            if (d / "_METADATA").is_file():
                return d, None
        what = "contains no finished checkpoint" if (p / "checkpoints").is_dir() else \
            "has no checkpoints/ (a run) and no params/ (a `jalign convert --out` directory)"
        raise LoadError(f"{self.where}={self.source}: {p} {what}")

    def _metadata(self) -> tuple[Optional[str], dict]:
        import orbax.checkpoint as ocp

        try:
            meta = ocp.PyTreeCheckpointHandler().metadata(self.directory)
            tree = meta.tree if hasattr(meta, "tree") else meta
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds for damaged metadata
            raise LoadError(f"{self.where}={self.source}: cannot read the checkpoint metadata in "
                            f"{self.directory} ({type(e).__name__}: {e})") from None
        if not isinstance(tree, dict):
            raise LoadError(f"{self.where}={self.source}: {self.directory} is not a jalign checkpoint")
        subtree = "params" if isinstance(tree.get("params"), dict) else None  # a train state
        flat = params_lib.flatten(tree[subtree] if subtree else tree)
        return subtree, {p: m for p, m in flat.items() if hasattr(m, "shape")}

    def shapes(self) -> dict:
        return {p: tuple(m.shape) for p, m in self._meta.items()}

    def nonfinite(self, loaded: dict) -> list[str]:
        return _nonfinite_leaves(loaded)

    def read(self, wanted: dict, shardings: dict, dtype) -> dict:
        """One orbax restore of just ``wanted``, each leaf onto its sharding and cast to ``dtype``
        slice by slice; ``restore_concurrent_gb`` bounds the bytes in flight on the host."""
        import orbax.checkpoint as ocp

        target = {p: jax.ShapeDtypeStruct(d.shape, dtype, sharding=shardings[p]) for p, d in wanted.items()}
        args = {p: ocp.ArrayRestoreArgs(sharding=shardings[p], dtype=dtype, global_shape=tuple(d.shape))
                for p, d in wanted.items()}
        item, restore_args = params_lib.unflatten(target), params_lib.unflatten(args)
        if self.subtree:
            item, restore_args = {self.subtree: item}, {self.subtree: restore_args}
        handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=self._in_flight_gb(wanted))
        try:
            with ocp.Checkpointer(handler) as ckptr:
                out = ckptr.restore(self.directory, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - truncated or corrupt array files
            raise LoadError(f"{self.where}={self.source}: cannot restore the params from {self.directory} "
                            f"({type(e).__name__}: {e})") from None
        return params_lib.flatten(out[self.subtree] if self.subtree else out)

    def _in_flight_gb(self, wanted: dict) -> int:
        """Orbax's bound on the bytes being read at once (per process), in GB: 1, or more if one shard
        of a leaf may need more (orbax refuses a shard larger than the bound). Orbax counts a shard's
        domain rounded out to the stored chunks, so a leaf's chunk-rounded size bounds any of its shards."""
        largest = 0
        for path in wanted:
            meta = self._meta[path]
            chunks = getattr(getattr(meta, "storage", None), "chunk_shape", None) or meta.shape
            rounded = [-(-n // max(c, 1)) * max(c, 1) for n, c in zip(meta.shape, chunks)]
            largest = max(largest, int(np.prod(rounded, dtype=np.int64)) * np.dtype(meta.dtype).itemsize)
        return max(1, -(-(largest + 1) // 10**9))
