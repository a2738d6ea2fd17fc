"""Padding waste of preference pairs, one pair per [2, T] row against packed rows (``pack_pairs``), on a
long-tailed length mix.

    python benchmarks/packing.py [--pairs 2000] [--side-len 1024] [--packed-len 2048] [--max-pairs 16]

Each side's length (prompt + response) is drawn log-normally and clipped to [32, side-len] (median ~150
tokens, a long tail to side-len, like chat preference data). Printed: the padding fraction of both layouts,
positions computed per pair, and the model FLOPs per pair of the tiny-llama (``compare.py``'s model) for each
layout, with attention counted over the full row as the dense XLA path computes it (the matmul part is what a
segment-aware kernel would also pay). No timing: these are counts.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def lengths(n: int, cap: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    return np.clip(np.round(r.lognormal(np.log(150), 0.9, size=(n, 2))), 32, cap).astype(int)


def pair_rows(lens: np.ndarray, T: int):
    for i, (a, b) in enumerate(lens):
        row = {k: np.zeros((2, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        row["loss_mask"] = np.zeros((2, T), np.float32)
        for s, n in enumerate((a, b)):
            row["tokens"][s, :n] = 5
            row["segment_ids"][s, :n] = 1
            row["positions"][s, :n] = np.arange(n)
            row["loss_mask"][s, n // 2:n] = 1
        row.update(index=np.int32(i), valid=np.float32(1), rewards=np.zeros(2, np.float32))
        yield row


def main(argv=None) -> None:
    import grain

    from jalign.data.packing import pack_pairs, padding_fraction

    from _workloads import forward_flops_per_token, matmul_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--side-len", type=int, default=1024)
    ap.add_argument("--packed-len", type=int, default=2048)
    ap.add_argument("--max-pairs", type=int, default=16)
    ap.add_argument("--bins", type=int, default=8)
    a = ap.parse_args(argv)
    if a.packed_len < 2 * a.side_len:
        ap.error("--packed-len must hold the longest pair: at least 2 x --side-len")
    lens = lengths(a.pairs, a.side_len)
    rows = list(pair_rows(lens, a.side_len))
    ds = grain.MapDataset.source(rows).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    packed = list(pack_pairs(ds, a.packed_len, a.bins, a.max_pairs, rows[0]))
    seg = np.stack([r["segment_ids"] for r in packed])
    n_pairs = int(sum(r["valid"].sum() for r in packed))
    assert n_pairs == a.pairs
    unpadded = 1 - lens.sum() / (a.pairs * 2 * a.side_len)
    print(f"{a.pairs} pairs, side lengths median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}, "
          f"max {lens.max()} (lognormal, clipped to [32, {a.side_len}])")
    print(f"one pair per [2, {a.side_len}] row: padding {unpadded:.1%}, {2 * a.side_len} positions per pair")
    per_pair = seg.size / a.pairs
    print(f"packed rows of {a.packed_len} (<= {a.max_pairs} pairs, first fit over {a.bins} bins): {len(packed)} rows, "
          f"padding {padding_fraction(seg):.1%}, {per_pair:.0f} positions per pair ({2 * a.side_len / per_pair:.2f}x "
          f"fewer)")
    mm = 2 * matmul_params()
    for name, T, positions in (("unpacked", a.side_len, 2 * a.side_len), ("packed", a.packed_len, per_pair)):
        total = forward_flops_per_token(T) * positions
        print(f"  tiny-llama forward per pair, {name}: {total / 1e9:.2f} GFLOP (matmuls {mm * positions / 1e9:.2f}, "
              f"dense attention over {T}-token rows {(total - mm * positions) / 1e9:.2f})")


if __name__ == "__main__":
    main()
