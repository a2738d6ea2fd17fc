"""The precompute stage shared by supervised algorithms with a frozen role read once per example: DPO's and
KTO's reference log-probs, a distillation teacher's top-k log-probs.

    columns = PrecomputedColumns(run_dir / "reference_logps", {"ref_logps": ((2,), "float32")}, fingerprint)
    role_specs: {} if columns.ready() else {"reference": ...}      # stored values: the role is not even loaded
    start:      fill_columns(algo, roles, "reference", columns, program, placed_fields)   # then the role is gone
    batches:    columns.join(host_batch, split)

``program(role_params, placed_batch) -> ({column: [B, ...]}, index [B], valid [B])`` is a jitted function of
the algorithm; every split of ``algo.data`` (``ordered(split)``: one pass in order, the same number of batches
on every process) goes through it once. Process 0 writes (``jalign.data.columns``).
"""
from __future__ import annotations

import jax
import numpy as np


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def data_splits(data) -> dict:
    """{split: (number of examples, ordered batches)} of a data kind with ``train_records`` / ``eval_records``."""
    return {s: (len(r), data.ordered(s)) for s, r in (("train", data.train_records), ("eval", data.eval_records))
            if r}


def fill_reference_columns(algo, roles, placed_fields) -> None:
    """``fill_columns`` for a precomputed reference: the ``reference`` role, or under LoRA without one the
    frozen base with the adapters off (which stays: it trains). The pass runs over unpacked rows
    (``algo.data.ordered``) placed with ``placed_fields`` also when training packs pairs (``data.pack_pairs``):
    the values are per pair, joined into packed batches per pair slot (:func:`join_columns`)."""
    from jalign.algorithms.base import to_global_batch

    ref = None
    if "reference" not in roles and algo.trainable.is_lora:
        ref = algo.trainable.reference(roles.on_device(["base"]))
    fill_columns(algo, roles, "reference", algo.columns, algo._ref_step, placed_fields, what="reference log-probs",
                 params=ref,
                 place=lambda b: to_global_batch(b, placed_fields, algo.rt.mesh, algo.rt.rules, 1))


def join_columns(columns, batch: dict, split: str) -> dict:
    """``columns.join`` for flat batches (``index`` [B]) and packed pair batches (``index`` [B, K]: each pair
    slot gets its pair's values, [B, K, ...]; empty slots read row 0 and are masked by ``valid``)."""
    index = np.asarray(batch["index"])
    if index.ndim == 1:
        return columns.join(batch, split)
    flat = columns.join({"index": index.reshape(-1)}, split)
    out = dict(batch)
    for name in columns.columns:
        out[name] = flat[name].reshape(index.shape + flat[name].shape[1:])
    return out


def fill_columns(algo, roles, role: str, columns, program, placed_fields, *, what: str = "", params=None,
                 place=None) -> None:
    """Compute (or reuse) ``columns`` with the frozen ``role``, then release it (see the module docstring).

    ``placed_fields``: the batch keys the program reads (placed with their declared axes, accumulation 1;
    ``place(batch)`` does the placing, default ``algo.global_batch``). When the role is absent the columns were
    found ready before it was built: nothing to do. ``params`` (optional) stand in for the role (under LoRA: the
    frozen base, which stays: it trains)."""
    place = place or (lambda b: algo.global_batch(b, accum=1))
    if role in roles or params is not None:
        params = roles.on_device([role])[role] if params is None else params

        def fn(batch):
            placed = {k: v for k, v in batch.items() if k in placed_fields}
            values, index, valid = jax.device_get(program(params, place(placed)))
            return {k: np.asarray(v) for k, v in values.items()}, index, valid

        splits = data_splits(algo.data)
        columns.compute(splits, fn, writer=jax.process_index() == 0, sync=sync)
        algo.rt.log(f"{what or role} precomputed into {columns.directory} "
                    f"({', '.join(f'{s}: {n}' for s, (n, _) in splits.items())} examples)")
    roles.drop(role)  # no longer needed: the stored values replace it


def reference_pass_programs(algo, placed_fields: dict, what: str) -> dict:
    """``algo``'s supervised programs, preceded (with ``reference: precomputed``) by the one pass of the
    reference over the train set that fills the stored log-probs (``algo._ref_step``); the reference role is
    released after it. Under LoRA without a reference role the pass runs the base with the adapters off."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jalign.abstract import Program
    from jalign.algorithms.base import SupervisedAlgorithm

    progs = SupervisedAlgorithm.programs(algo)
    if not algo.precomputed:
        return progs
    roles, _, _ = algo.abstract_roles()
    rows = algo.cfg.train.global_batch
    batch = algo.abstract_batch(1, rows, placed_fields)
    note = f"{rows} {what} x {algo.cfg.data.seq_len}, once per run"
    if "reference" in roles:
        first = Program(algo._ref_step, (roles["reference"], batch), uses=("role:reference",),
                        releases=("role:reference",), note=note)
    else:  # LoRA: the reference is the frozen base (it stays: it trains)
        base = {n: roles[n] for n in algo.trainable.role_specs()}
        fn = jax.jit(
            lambda r, b: algo._reference_sums(algo.trainable.reference(r), b),
            out_shardings=NamedSharding(algo.rt.mesh, PartitionSpec()))
        first = Program(fn, (base, batch), uses=tuple(f"role:{n}" for n in base), note=note)
    return {"reference_logps": first, **progs}
