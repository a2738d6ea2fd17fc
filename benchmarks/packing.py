"""Packing preference pairs (``data.pack_pairs``) and RL rows (``algorithm.pack_rows``): padding waste and step
throughput, one sample per row against packed rows, on long-tailed length mixes.

    python benchmarks/packing.py [--pairs 2000] [--side-len 1024] [--packed-len 2048] [--max-pairs 16]
                                 [--scale 0.25] [--step-rows 8] [--steps 3] [--rounds 2] [--no-throughput]
                                 [--rl] [--rl-only] [--rl-prompts 4] [--rl-samples 8] [--rl-new 256]
                                 [--rl-rows-per-micro 4]

Each side's length (prompt + response) is drawn log-normally and clipped to [32, side-len] (median ~150
tokens, a long tail to side-len, like chat preference data).

1. Counts (no timing): the padding fraction of both layouts, positions computed per pair, and the model FLOPs
   per pair of the tiny-llama (``compare.py``'s model) for each layout, with attention counted over the full
   row as the dense XLA path computes it (the matmul part is what a segment-aware kernel would also pay).
2. Throughput: pairs/s of a jitted DPO train step (live reference, the tiny-llama of ``benchmarks/dpo.py``, 1
   device) on the same length mix scaled by ``--scale`` (lengths in [32, 1024] x scale) so that a step takes
   seconds on a CPU: unpacked, ``--step-rows`` pairs of [2, T] rows per step (T = 1024 x scale); packed,
   ``--step-rows`` rows of 2T tokens (the same positions per step) holding up to ``--max-pairs`` whole pairs
   each. Rounds alternate the two layouts (``--steps`` steps each after a compile step), so a load change on a
   shared machine hits both; pairs/s = pairs trained / wall time, with the process CPU time beside it.
3. RL (``--rl``): a GRPO step without its rollout (score pass: reference and old log-probs; two minibatch
   updates with the k3 KL term; the tiny-llama, 1 device) on synthetic rollouts of ``--rl-prompts`` x
   ``--rl-samples`` samples whose response lengths are log-normal (median ~30 tokens, a tail to ``--rl-new``),
   a new rollout every step: unpacked (one row of prompt block + ``--rl-new`` slots per sample) against packed
   (``algorithm.pack_rows``, ``--rl-rows-per-micro`` rows of the same length per minibatch of half the
   samples), alternated in rounds. Printed: the padding fraction of the rows the score forwards ran on,
   seconds per step (score + update), samples/s, and how many steps fell back to unpacked rows.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def lengths(n: int, cap: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    raw = r.lognormal(np.log(150), 0.9, size=(n, 2)) * scale
    return np.clip(np.round(raw), max(2, round(32 * scale)), cap).astype(int)


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


def padding_counts(a) -> None:
    import grain

    from jalign.data.packing import pack_pairs, padding_fraction

    from _workloads import forward_flops_per_token, matmul_params

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


# ---- throughput -------------------------------------------------------------------------------------
def dpo_records(lens: np.ndarray, vocab: int, seed: int = 0) -> list[dict]:
    """Preference records (``jalign.data.preference.tokenize_pairs``' layout) with the given side lengths: a
    shared prompt of half the shorter side, random response ids, loss on the responses."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (a, b) in enumerate(lens):
        p = max(1, min(a, b) // 2)
        prompt = rng.integers(3, vocab, p)
        rec = {"index": i, "chosen_reward": 1.0, "rejected_reward": 0.0}
        for side, n in (("chosen", a), ("rejected", b)):
            ids = np.concatenate([prompt, rng.integers(3, vocab, n + 1 - p)]).astype(np.int32)  # n tokens after the shift
            rec[side] = (ids, np.asarray([0] * p + [1] * (n + 1 - p), np.float32))
        out.append(rec)
    return out


def dpo_algo(T: int, rows: int, packed: bool, max_pairs: int, run_dir: str):
    from jalign.algorithms import base
    from jalign.algorithms.dpo import DPO
    from jalign.config import load_config
    from sharding import make_mesh, make_rules

    from dpo import MODEL

    import jax

    cfg = load_config(None, MODEL + [
        "algorithm.name=dpo", "algorithm.reference=live", "eval.prompts=0", "data.train=builtin:addition_pairs:train:64",
        "data.eval=null", f"data.seq_len={T}", f"data.pack_pairs={str(packed).lower()}",
        f"data.pack_max_pairs={max_pairs}", f"train.global_batch={rows}", f"train.out_dir={run_dir}", "mesh.data=1"])
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(run_dir), log=lambda *_: None)
    return rt, DPO(rt)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def throughput(a) -> None:
    import jax

    from jalign.data.packing import padding_fraction
    from jalign.data.pipeline import make_packed_pair_iterator
    from jalign.data.preference import pair_row
    from jalign.roles import build_roles
    from sharding import use_rules

    T = round(1024 * a.scale)
    lens = lengths(4000, T, seed=1, scale=a.scale)
    records = dpo_records(lens, 8192)
    layouts = {}
    for name, packed in (("unpacked", False), ("packed", True)):
        rt, algo = dpo_algo(T, a.step_rows, packed, a.max_pairs, tempfile.mkdtemp(prefix=f"jalign_bench_pack_{name}_"))
        if packed:
            it = make_packed_pair_iterator(records, lambda r: pair_row(r, T, "lm"), seq_len=2 * T,
                                           batch_rows_per_process=a.step_rows, max_pairs=a.max_pairs, shuffle=True,
                                           seed=0)
        else:
            order = np.random.default_rng(0).permutation(len(records))
            it = iter([{k: np.stack([pair_row(records[j], T, "lm")[k] for j in order[i:i + a.step_rows]])
                        for k in pair_row(records[0], T, "lm")}
                       for i in range(0, a.step_rows * (a.steps * a.rounds + 1), a.step_rows)])
        with use_rules(rt.mesh, rt.rules):
            roles = build_roles(rt.cfg, algo.role_specs(), rt.mesh, rt.rules, log=lambda *_: None)
            state = algo.init_state(roles)
            t = time.perf_counter()
            state, m = algo.step(state, roles, next(it))
            jax.block_until_ready(m)
        layouts[name] = dict(rt=rt, algo=algo, it=it, roles=roles, state=state, compile=time.perf_counter() - t,
                             wall=0.0, cpu=0.0, pairs=0, steps=0, pad=[])
    for _ in range(a.rounds):
        for name, L in layouts.items():
            with use_rules(L["rt"].mesh, L["rt"].rules):
                batches = [next(L["it"]) for _ in range(a.steps)]
                t, c = time.perf_counter(), cpu_seconds()
                for b in batches:
                    L["state"], m = L["algo"].step(L["state"], L["roles"], b)
                jax.block_until_ready(m)
                L["wall"] += time.perf_counter() - t
                L["cpu"] += cpu_seconds() - c
            L["pairs"] += int(sum(b["valid"].sum() for b in batches))
            L["steps"] += a.steps
            L["pad"] += [padding_fraction(b["segment_ids"]) for b in batches]
    print(f"\nDPO train step (live reference), tiny-llama {MODEL_NOTE}, 1 device of {jax.device_count()}; side lengths "
          f"{lens.min()}-{lens.max()} (median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}; the mix "
          f"above x {a.scale}), {a.rounds} alternated rounds of {a.steps} steps per layout:")
    for name, L in layouts.items():
        shape = f"{a.step_rows} x [2, {T}]" if name == "unpacked" else f"{a.step_rows} x [{2 * T}] (<= {a.max_pairs} pairs/row)"
        print(f"  {name:8s} {shape}: {L['pairs'] / L['steps']:.1f} pairs/step, padding {np.mean(L['pad']):.1%}, "
              f"step {L['wall'] / L['steps']:.2f} s, {L['pairs'] / L['wall']:.2f} pairs/s "
              f"({L['pairs'] / L['cpu']:.2f} pairs per CPU-s), first step {L['compile']:.1f} s")
    u, p = layouts["unpacked"], layouts["packed"]
    print(f"  packed / unpacked: {(p['pairs'] / p['wall']) / (u['pairs'] / u['wall']):.2f}x pairs/s "
          f"({(p['pairs'] / p['cpu']) / (u['pairs'] / u['cpu']):.2f}x per CPU-s)")


MODEL_NOTE = "(vocab 8192, hidden 256, 4 layers, f32)"


# ---- RL rows (algorithm.pack_rows) ------------------------------------------------------------------
def rl_algo(a, packed: bool, run_dir: str):
    from jalign.algorithms import base
    from jalign.algorithms.grpo import GRPO
    from jalign.config import load_config
    from sharding import make_mesh, make_rules

    from dpo import MODEL

    import jax

    n = a.rl_prompts * a.rl_samples
    cfg = load_config(None, MODEL + [
        "algorithm.name=grpo", "algorithm.reward_fn=exact_match", "data.train=builtin:addition_prompts:train",
        "data.eval=null", "eval.prompts=0", f"train.global_batch={a.rl_prompts}",
        f"algorithm.num_rollouts_per_prompt={a.rl_samples}", f"algorithm.max_new_tokens={a.rl_new}",
        f"data.seq_len={a.rl_new + 64}",
        f"algorithm.minibatch_size={n // 2}", "algorithm.truncated_response=keep",
        f"algorithm.pack_rows={str(packed).lower()}", f"algorithm.pack_rows_per_micro={a.rl_rows_per_micro}",
        f"train.out_dir={run_dir}", "mesh.data=1"])
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(run_dir), log=print)
    return rt, GRPO(rt)


def rl_rollout(algo, seed: int) -> dict:
    """A sampler output with varied prompt lengths and log-normal response lengths (median ~30 tokens)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    B, P, N, mx = algo.sizes.rollout, algo.P, algo.N, algo.a.max_new_tokens
    pl = rng.integers(max(1, P // 2), P + 1, B)
    lens = np.clip(np.round(rng.lognormal(np.log(30), 1.0, B)), 1, mx).astype(np.int32)
    seg = (np.arange(P)[None, :] >= P - pl[:, None]).astype(np.int32)
    out = {"prompt_tokens": np.where(seg > 0, rng.integers(3, 100, (B, P)), 0), "prompt_segment_ids": seg,
           "prompt_positions": np.where(seg > 0, np.arange(P)[None, :] - (P - pl[:, None]), 0),
           "prompt_lengths": pl, "tokens": rng.integers(3, 8000, (B, N)), "lengths": lens,
           "logprobs_tempered": -rng.uniform(0.5, 6.0, (B, N)), "ended_with_eos": lens < mx}
    return {k: jnp.asarray(v, jnp.float32 if k == "logprobs_tempered" else (bool if k == "ended_with_eos" else jnp.int32))
            for k, v in out.items()}


def rl_throughput(a) -> None:
    import jax
    import jax.numpy as jnp

    from jalign.algorithms.rl_rewards import rule_terms
    from jalign.algorithms.rl_sampling import Rollout
    from jalign.roles import build_roles
    from sharding import use_rules

    layouts, n = {}, a.rl_prompts * a.rl_samples
    for name, packed in (("unpacked", False), ("packed", True)):
        rt, algo = rl_algo(a, packed, tempfile.mkdtemp(prefix=f"jalign_bench_rlpack_{name}_"))
        feed = {"out": None}
        given = lambda: {t.name: jnp.asarray(np.random.default_rng(0).random(n), jnp.float32)  # noqa: E731
                         for t in rule_terms(algo.terms)}
        algo.sampler = lambda *args, _f=feed, _g=given: Rollout(_f["out"], np.arange(n) // a.rl_samples, _g())
        with use_rules(rt.mesh, rt.rules):
            roles = build_roles(rt.cfg, algo.role_specs(), rt.mesh, rt.rules, log=lambda *_: None)
            state = algo.init_state(roles)
            feed["out"] = rl_rollout(algo, 0)
            t = time.perf_counter()
            state, m = algo.step(state, roles, {"prompt_index": np.arange(a.rl_prompts)})
            jax.block_until_ready(m)
        layouts[name] = dict(rt=rt, algo=algo, roles=roles, state=state, feed=feed, compile=time.perf_counter() - t,
                             wall=0.0, cpu=0.0, steps=0, pad=[], fallback=0)
    seed = 1
    for _ in range(a.rounds):
        outs = [rl_rollout(layouts["unpacked"]["algo"], seed + i) for i in range(a.steps)]
        seed += a.steps
        for name, L in layouts.items():
            algo = L["algo"]
            with use_rules(L["rt"].mesh, L["rt"].rules):
                t, c = time.perf_counter(), cpu_seconds()
                for out in outs:
                    L["feed"]["out"] = out
                    L["state"], m = algo.step(L["state"], L["roles"], {"prompt_index": np.arange(a.rl_prompts)})
                    jax.block_until_ready(m)
                    if algo.pack:
                        L["pad"].append(float(m["padding_fraction"]))
                        L["fallback"] += int(m["pack_fallback"])
                    else:
                        real = np.asarray(out["prompt_lengths"] + out["lengths"]).sum()
                        L["pad"].append(1.0 - real / (n * (algo.P + algo.N)))
                L["wall"] += time.perf_counter() - t
                L["cpu"] += cpu_seconds() - c
            L["steps"] += a.steps
    algo = layouts["packed"]["algo"]
    print(f"\nRL: GRPO score + update (no rollout), tiny-llama {MODEL_NOTE}, 1 device; {a.rl_prompts} prompts x "
          f"{a.rl_samples} samples, prompt block {algo.P}, responses log-normal (median ~30, max {a.rl_new}); "
          f"{a.rounds} alternated rounds of {a.steps} steps per layout, a new rollout per step:")
    for name, L in layouts.items():
        rows = f"{n} x [{algo.P + algo.N}]" if name == "unpacked" else (
            f"score {algo.pack.score_rows} x [{algo.pack.row_len}], update {algo.pack.micro_rows} per {algo.sizes.micro}")
        fb = f", {L['fallback']}/{L['steps']} steps fell back to unpacked" if name == "packed" else ""
        print(f"  {name:8s} {rows}: padding {np.mean(L['pad']):.1%}, step {L['wall'] / L['steps']:.2f} s, "
              f"{n * L['steps'] / L['wall']:.2f} samples/s ({n * L['steps'] / L['cpu']:.2f} per CPU-s), first step "
              f"{L['compile']:.1f} s{fb}")
    u, p = layouts["unpacked"], layouts["packed"]
    print(f"  packed / unpacked: {u['wall'] / p['wall']:.2f}x samples/s ({u['cpu'] / p['cpu']:.2f}x per CPU-s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--side-len", type=int, default=1024)
    ap.add_argument("--packed-len", type=int, default=2048)
    ap.add_argument("--max-pairs", type=int, default=16)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.25, help="throughput: the length mix scaled by this")
    ap.add_argument("--step-rows", type=int, default=8, help="throughput: rows per step (pairs when unpacked)")
    ap.add_argument("--steps", type=int, default=3, help="throughput: timed steps per round and layout")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-throughput", action="store_true", help="only the counts")
    ap.add_argument("--rl", action="store_true", help="also the RL section (algorithm.pack_rows)")
    ap.add_argument("--rl-only", action="store_true", help="only the RL section")
    ap.add_argument("--rl-prompts", type=int, default=4)
    ap.add_argument("--rl-samples", type=int, default=8)
    ap.add_argument("--rl-new", type=int, default=256, help="RL: max_new_tokens (the response block)")
    ap.add_argument("--rl-rows-per-micro", type=int, default=4, help="RL: algorithm.pack_rows_per_micro")
    a = ap.parse_args(argv)
    if a.packed_len < 2 * a.side_len:
        ap.error("--packed-len must hold the longest pair: at least 2 x --side-len")
    if not a.rl_only:
        padding_counts(a)
        if not a.no_throughput:
            throughput(a)
    if a.rl or a.rl_only:
        rl_throughput(a)


if __name__ == "__main__":
    main()
