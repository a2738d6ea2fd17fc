"""``generate()``'s calling convention on the rollout engine, and the multi-process row helpers.

    out = generate(params, cfg, prompts, max_new_tokens=64, temperature=0.7, rng=key, num_samples=4, mesh=mesh)
    out["tokens"], out["logprobs"], out["logprobs_tempered"]   # [n, max_new_tokens], padded (pad_id / 0)
    out["lengths"], out["ended_with_eos"], out["rows"]         # [n]; rows = global row of each returned row

Rows: ``num_samples=K`` samples per prompt, row ``p * K + j`` = sample j of prompt p (the order of
``np.repeat(prompts, K)``); every row draws its tokens like row ``b`` of ``jalign.generate.generate``
with the same ``rng`` (``fold_in(fold_in(rng, i), b)``), so the engine and the static sampler give the
same samples for the same seed (up to float rounding in attention). The K samples of a prompt share
its prompt pages (prefilled once).

One process: every row, ``rows = arange(n)``. Several processes (each calls with the same global
prompts): the rows are split like a [n, ...] array sharded over the data-parallel axes ("batch"), and
a process serves and returns only its own rows (``out["rows"]``, = ``served_rows(n, mesh, rules)``), so
no rollout is gathered to every host. ``global_rows(local, out["rows"], n, sharding)`` puts per-row host
arrays built from them (e.g. the RL rows [n, S]) on the devices as one global array without any
cross-host transfer; ``return_device=True`` does that for the outputs (``out["device"]``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from jalign.config import ModelConfig
from jalign.rollout import programs as prog
from jalign.rollout.engine import Engine, Request
from sharding.rules import DEFAULT_RULES


def _dp(mesh, rules) -> int:
    from sharding.rules import logical_to_spec

    spec = logical_to_spec(("batch",), rules)[0]
    n = 1
    for a in (spec if isinstance(spec, tuple) else (spec,)) if spec else ():
        n *= mesh.shape[a]
    return n


def padded_rows(n_rows: int, mesh, rules=DEFAULT_RULES) -> int:
    dp = 1 if mesh is None else _dp(mesh, rules)
    return -(-n_rows // dp) * dp


def served_rows(n_rows: int, mesh, rules=DEFAULT_RULES) -> np.ndarray:
    """Global row indices this process serves (all rows on one process): the rows whose shard of a
    [padded_rows(n), ...] array sharded over "batch" live on this process's devices."""
    if mesh is None or jax.process_count() == 1:
        return np.arange(n_rows)
    B = padded_rows(n_rows, mesh, rules)
    s = prog.array_sharding(mesh, rules, ("batch",), (B,))
    rows = sorted({i for sl in s.addressable_devices_indices_map((B,)).values() for i in range(*sl[0].indices(B))})
    return np.asarray([r for r in rows if r < n_rows], np.int64)


def global_rows(local: np.ndarray, rows: np.ndarray, n_rows: int, sharding: NamedSharding, fill=0) -> jax.Array:
    """One global array [n_rows rounded up to dim 0's shard count, ...] from this process's rows
    (row ``rows[j]`` = ``local[j]``); ``sharding`` must split dim 0 like "batch" (e.g.
    ``rl_common.rows_sharding``). Each device receives its own rows only; padding rows hold ``fill``."""
    local = np.asarray(local)
    ax = sharding.spec[0] if len(sharding.spec) else None
    shards = 1
    for a in (() if ax is None else ax if isinstance(ax, tuple) else (ax,)):
        shards *= sharding.mesh.shape[a]
    B = -(-n_rows // shards) * shards
    pos = np.full((B,), -1, np.int64)
    pos[np.asarray(rows, np.int64)] = np.arange(len(rows))

    def piece(idx):
        want = np.arange(B)[idx[0]]
        r = pos[want]
        if ((r < 0) & (want < n_rows)).any():
            raise ValueError(f"global_rows: a device of this process holds rows {want[(r < 0) & (want < n_rows)][:4]}"
                             f"... which this process did not serve (the sharding splits rows unlike 'batch')")
        out = np.full((len(r),) + local.shape[1:], fill, local.dtype)
        out[r >= 0] = local[r[r >= 0]]
        return out[(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback((B,) + local.shape[1:], sharding, piece)


def generate(params, cfg: ModelConfig, prompt_ids, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_ids: Sequence[int] = (), stop_ids: Sequence[int] = (), pad_id: int = 0, rng=0, prompt_mask=None,
             mesh=None, rules=DEFAULT_RULES, num_samples: int = 1, slots: Optional[int] = None,
             page_size: int = 16, steps_per_call: int = 32, prefix_sharing: bool = True,
             return_device: bool = False, engine: Optional[Engine] = None, **engine_kwargs) -> dict:
    """``jalign.generate.generate`` on the engine (see the module docstring for rows and processes).

    ``slots`` (default: the rows per data-parallel shard rounded to a power of two, at most 64 per
    shard) are refilled as rows end. ``engine``: reuse an ``Engine`` (its slots and pages
    settings); extra keywords go to ``Engine``. Also returns ``steps`` (decode steps) and ``stats``.
    """
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    if prompt_mask is not None:
        ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
        prompts = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
    else:
        prompts = [list(map(int, p)) for p in prompt_ids]
    n = len(prompts) * num_samples
    rows = served_rows(n, mesh, rules)
    if engine is None:
        dp = 1 if mesh is None else _dp(mesh, rules)
        if slots is None:  # every row in a slot up to 64 per shard
            slots = dp * min(1 << (max(-(-n // dp), 1) - 1).bit_length(), 64)
        engine = Engine(params, cfg, slots=slots, page_size=page_size, steps_per_call=steps_per_call,
                        prefix_sharing=prefix_sharing, mesh=mesh, rules=rules, **engine_kwargs)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    ends = tuple(sorted(set(map(int, eos_ids)) | set(map(int, stop_ids))))
    reqs = [Request(prompt=prompts[b // num_samples], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, end_ids=ends, key=key,
                    stream=int(b)) for b in rows]
    res = engine.run(reqs)
    N = max_new_tokens
    out = {"tokens": np.full((len(rows), N), pad_id, np.int32), "logprobs": np.zeros((len(rows), N), np.float32),
           "logprobs_tempered": np.zeros((len(rows), N), np.float32),
           "lengths": np.asarray([r.length for r in res], np.int32).reshape(len(rows)),
           "ended_with_eos": np.asarray([r.ended_with_eos for r in res], bool).reshape(len(rows))}
    for j, r in enumerate(res):
        out["tokens"][j, :r.length] = r.tokens
        out["logprobs"][j, :r.length] = r.logprobs
        out["logprobs_tempered"][j, :r.length] = r.logprobs_tempered
    out.update(rows=rows, steps=engine.stats.get("decode_steps", 0), stats=dict(engine.stats))
    if return_device:
        if mesh is None:
            out["device"] = {k: jax.numpy.asarray(out[k]) for k in ("tokens", "logprobs", "logprobs_tempered",
                                                                     "lengths", "ended_with_eos")}
        else:
            B = padded_rows(n, mesh, rules)
            out["device"] = {
                k: global_rows(out[k], rows, n, prog.array_sharding(mesh, rules, ("batch",) + (None,) * (out[k].ndim - 1),
                                                                  (B,) + out[k].shape[1:]), fill=pad_id if k == "tokens" else 0)
                for k in ("tokens", "logprobs", "logprobs_tempered", "lengths", "ended_with_eos")}
    return out
