"""``generate()``'s calling convention on the rollout engine, and the multi-process row helpers.

    out = generate(params, cfg, prompts, max_new_tokens=64, temperature=0.7, rng=key, num_samples=4, mesh=mesh)
    out["tokens"], out["logprobs"], out["logprobs_tempered"]   # [n, max_new_tokens], padded (pad_id / 0)
    out["lengths"], out["ended_with_eos"], out["rows"]         # [n]; rows = global row of each returned row
    dev = generate(..., return_device=True)                    # generate(return_device=True)'s device layout

Rows: ``num_samples=K`` samples per prompt, row ``p * K + j`` = sample j of prompt p (the order of
``np.repeat(prompts, K)``); row ``b`` draws token i from ``fold_in(fold_in(rng, i), b)``: with
``sampler="gumbel"`` exactly what ``jalign.generate.generate`` draws for row b with the same ``rng``
(the same samples up to float rounding in attention); the default "inverse_cdf" samples the same
distribution more cheaply. Requests with the same prompt (the K samples) share its prompt pages
(prefilled once).

One process: every row, ``rows = arange(n)``. Several processes (each calls with the same global
prompts): the rows are split like a [B, ...] array sharded over the data-parallel axes ("batch",
B = ``device_rows(n)``), and a process serves and returns only its own rows (``out["rows"]`` =
``served_rows(n, mesh, rules, B)``), so no rollout is gathered to every host. To keep results on the
devices: ``return_device=True`` returns global arrays whose shards each process filled with its own
rows (no cross-host transfer), and ``global_rows(local, out["rows"], B, sharding)`` does the same for
any per-row host array built from them (e.g. rule rewards, RL rows).
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


def batch_parallel(mesh, rules) -> int:
    """The data-parallel size: devices the logical "batch" axis is split over."""
    from sharding.rules import logical_to_spec

    spec = logical_to_spec(("batch",), rules)[0]
    n = 1
    for a in (spec if isinstance(spec, tuple) else (spec,)) if spec else ():
        n *= mesh.shape[a]
    return n


def device_rows(n_rows: int, mesh, rules=DEFAULT_RULES, batch_bucket: bool = False) -> int:
    """Rows of the device outputs: ``n_rows`` rounded up to the data-parallel size, or (``batch_bucket``)
    to a power of two times it, exactly like ``jalign.generate.generate``'s batch."""
    dp = 1 if mesh is None else batch_parallel(mesh, rules)
    n = 1 << (max(n_rows, 1) - 1).bit_length() if batch_bucket else n_rows
    return -(-n // dp) * dp


def served_rows(n_rows: int, mesh, rules=DEFAULT_RULES, total: Optional[int] = None) -> np.ndarray:
    """Global row indices (< n_rows) this process serves, all rows on one process: the rows whose shard of
    a [total, ...] array sharded over "batch" (default total: ``device_rows(n_rows)``) lives here."""
    if mesh is None or jax.process_count() == 1:
        return np.arange(n_rows)
    B = total or device_rows(n_rows, mesh, rules)
    s = prog.array_sharding(mesh, rules, ("batch",), (B,))
    rows = sorted({i for sl in s.addressable_devices_indices_map((B,)).values() for i in range(*sl[0].indices(B))})
    return np.asarray([r for r in rows if r < n_rows], np.int64)


def global_rows(local: np.ndarray, rows: np.ndarray, total: int, sharding: NamedSharding, n_valid: Optional[int] = None,
                fill=0) -> jax.Array:
    """One global array [total, ...] from this process's rows (row ``rows[j]`` = ``local[j]``) without any
    cross-host transfer: each device receives its own rows only. ``sharding`` must split dim 0 like
    "batch" (e.g. ``rl_common.rows_sharding``); rows >= ``n_valid`` (default: the largest served row + 1)
    are padding and hold ``fill``; a device asking for a valid row this process did not serve is an error."""
    local = np.asarray(local)
    n_valid = int(max(rows, default=-1)) + 1 if n_valid is None else n_valid
    pos = np.full((total,), -1, np.int64)
    pos[np.asarray(rows, np.int64)] = np.arange(len(rows))

    def piece(idx):
        want = np.arange(total)[idx[0]]
        r = pos[want]
        missing = (r < 0) & (want < n_valid)
        if missing.any():
            raise ValueError(f"global_rows: this process's devices hold rows {want[missing][:4].tolist()}..., which it "
                             f"did not serve (the sharding splits rows unlike 'batch', or the row lists differ)")
        out = np.full((len(r),) + local.shape[1:], fill, local.dtype)
        out[r >= 0] = local[r[r >= 0]]
        return out[(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback((total,) + local.shape[1:], sharding, piece)


def default_slots(n_rows: int, dp: int) -> int:
    """The engine's slots when ``rollout.slots`` is not set: every row in a slot, up to 64 per shard."""
    return dp * min(1 << (max(-(-n_rows // dp), 1) - 1).bit_length(), 64)


def generate(params, cfg: ModelConfig, prompt_ids, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_ids: Sequence[int] = (), stop_ids: Sequence[int] = (), pad_id: int = 0, rng=0, prompt_mask=None,
             mesh=None, rules=DEFAULT_RULES, prompt_bucket: int = 64, batch_bucket: bool = True,
             new_bucket: Optional[int] = None, return_device: bool = False, num_samples: int = 1,
             slots: Optional[int] = None, page_size: int = 16, steps_per_call: int = 32, prefix_sharing: bool = True,
             sampler: str = "inverse_cdf", engine: Optional[Engine] = None, **engine_kwargs) -> dict:
    """``jalign.generate.generate`` on the engine (see the module docstring for rows and processes).

    Host results (default): numpy ``tokens/logprobs/logprobs_tempered`` [n, max_new_tokens] (pad_id / 0
    past each length), ``lengths``, ``ended_with_eos`` [n] for this process's ``rows``, plus ``steps``
    (decode steps) and ``stats`` (the engine's). ``return_device=True``: the same keys as global jax
    arrays in generate()'s bucketed device layout (rows ``device_rows(n, batch_bucket)``, new tokens
    ``new_bucket`` or a power of two, padding rows with length 0) plus generate's left-padded prompt block
    ``prompt_tokens``, ``prompt_positions``, ``prompt_segment_ids`` [B, P] and ``prompt_lengths`` [B]
    (P = the longest prompt rounded up to ``prompt_bucket``), and ``host``: the host results.
    ``slots`` (default: the rows per data-parallel shard rounded to a power of two, at most 64 per
    shard) are refilled as rows end. ``sampler``: see the module docstring. ``engine``: reuse an
    ``Engine`` (its slots, pages and sampler settings); extra keywords go to ``Engine``.
    """
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    if prompt_mask is not None:
        ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
        prompts = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
    else:
        prompts = [list(map(int, p)) for p in prompt_ids]
    n = len(prompts) * num_samples
    B = device_rows(n, mesh, rules, batch_bucket)
    rows = served_rows(n, mesh, rules, total=B)
    if engine is None:
        dp = 1 if mesh is None else batch_parallel(mesh, rules)
        if slots is None:
            slots = default_slots(n, dp)
        engine = Engine(params, cfg, slots=slots, page_size=page_size, steps_per_call=steps_per_call,
                        prefix_sharing=prefix_sharing, sampler=sampler, mesh=mesh, rules=rules, **engine_kwargs)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    ends = tuple(sorted(set(map(int, eos_ids)) | set(map(int, stop_ids))))
    reqs = [Request(prompt=prompts[b // num_samples], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, end_ids=ends, key=key,
                    stream=int(b)) for b in rows]
    res = engine.run(reqs)
    N = max_new_tokens
    if return_device:
        N = (1 << (max(N, 8) - 1).bit_length()) if new_bucket is None else max(int(new_bucket), N)
    host = {"tokens": np.full((len(rows), N), pad_id, np.int32), "logprobs": np.zeros((len(rows), N), np.float32),
            "logprobs_tempered": np.zeros((len(rows), N), np.float32),
            "lengths": np.asarray([r.length for r in res], np.int32).reshape(len(rows)),
            "ended_with_eos": np.asarray([r.ended_with_eos for r in res], bool).reshape(len(rows))}
    for j, r in enumerate(res):
        host["tokens"][j, :r.length] = r.tokens
        host["logprobs"][j, :r.length] = r.logprobs
        host["logprobs_tempered"][j, :r.length] = r.logprobs_tempered
    extra = {"rows": rows, "steps": engine.stats.get("decode_steps", 0), "stats": dict(engine.stats)}
    if not return_device:
        return dict(host, **extra)
    from jalign.generate import prepare_prompts

    longest = max(map(len, prompts))
    P = -(-longest // prompt_bucket) * prompt_bucket
    per_row = [prompts[b // num_samples] for b in range(n)]
    pt, pp, ps, pl = prepare_prompts(per_row, pad_id=pad_id, batch=B, length=P)
    dev = {}
    for k, v in host.items():
        sharding = (prog.array_sharding(mesh, rules, ("batch",) + (None,) * (v.ndim - 1), (B,) + v.shape[1:])
                    if mesh is not None else None)
        if sharding is None:
            full = np.full((B,) + v.shape[1:], pad_id if k == "tokens" else 0, v.dtype)
            full[rows] = v
            dev[k] = jax.numpy.asarray(full)
        else:
            dev[k] = global_rows(v, rows, B, sharding, n_valid=n, fill=pad_id if k == "tokens" else 0)
    blocks = {"prompt_tokens": pt, "prompt_positions": pp, "prompt_segment_ids": ps, "prompt_lengths": pl}
    dev.update(prog.device_put_tree(blocks, mesh, rules, {k: ("batch",) + (None,) * (v.ndim - 1)
                                                          for k, v in blocks.items()}))
    return dict(dev, host=host, **extra)
