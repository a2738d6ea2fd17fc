"""DPO train-step throughput (live reference) on a tiny Llama, next to this machine's f32 matmul rate.

    python benchmarks/dpo.py [--steps 5] [--pairs 8] [--prompt 64] [--response 192]

Prints pairs/s, tokens/s and achieved GFLOP/s. FLOPs are *model* matmul FLOPs: per token a forward pass
costs 2 * N (N = parameters used in matmuls: attention and MLP projections and the LM head; the embedding
lookup is free) plus attention scores/values 4 * T * heads * head_dim per layer (dense T x T, as
computed); the policy does forward + backward (3x), the reference one forward (1x). Rematerialised
work (the chunked log-prob recomputes the logits in the backward pass) is not counted.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import base
from jalign.algorithms.dpo import DPO
from jalign.config import load_config
from jalign.roles import build_roles
from sharding import make_mesh, make_rules, use_rules

MODEL = ["model.vocab_size=8192", "model.hidden=256", "model.mlp=688", "model.layers=4", "model.heads=8",
         "model.kv_heads=4", "model.dtype=float32", "model.param_dtype=float32"]


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a, b).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def step_flops(cfg, rows: int, T: int) -> float:
    m = cfg.model
    hd = m.resolved_head_dim
    per_layer = m.hidden * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * m.hidden + 3 * m.hidden * m.mlp
    n_matmul = m.layers * per_layer + m.hidden * m.vocab_size
    tokens = rows * T
    forward = 2 * n_matmul * tokens + m.layers * 4 * T * T * m.heads * hd * rows
    return 3 * forward + forward  # policy forward + backward, reference forward


def synthetic_batch(pairs: int, prompt: int, response: int, vocab: int, seed: int = 0) -> dict:
    """A pairwise batch in jalign's layout: every sequence field [pairs, 2, T] (side 0 chosen, 1 rejected)."""
    T = prompt + response
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (pairs, 2, T + 1)).astype(np.int32)
    mask = np.zeros((pairs, 2, T), np.float32)
    mask[..., prompt - 1:] = 1.0  # targets from the first response token on
    return {"tokens": ids[..., :-1], "targets": ids[..., 1:], "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (pairs, 2, T)).copy(),
            "segment_ids": np.ones((pairs, 2, T), np.int32), "index": np.arange(pairs, dtype=np.int32),
            "valid": np.ones(pairs, np.float32), "rewards": np.tile(np.asarray([[1.0, 0.0]], np.float32), (pairs, 1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    a = ap.parse_args(argv)
    T = a.prompt + a.response
    run_dir = tempfile.mkdtemp(prefix="jalign_bench_dpo_")
    cfg = load_config(None, MODEL + [
        "algorithm.name=dpo", "algorithm.reference=live", "eval.prompts=0",
        "data.train=builtin:addition_pairs:train:64", "data.eval=null", f"data.seq_len={T}",
        f"train.global_batch={a.pairs}", f"train.out_dir={run_dir}", "mesh.data=1"])
    devices = jax.devices()[:1]
    mesh = make_mesh(1, 1, 1, 1, devices=devices)
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=__import__("pathlib").Path(run_dir),
                      log=lambda *_: None)
    batch = synthetic_batch(a.pairs, a.prompt, a.response, cfg.model.vocab_size)
    with use_rules(mesh, rt.rules):
        algo = DPO(rt)
        roles = build_roles(cfg, algo.role_specs(), mesh, rt.rules, log=lambda *_: None)
        state = algo.init_state(roles)
        t0 = time.perf_counter()
        state, m = algo.step(state, roles, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            state, m = algo.step(state, roles, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops = step_flops(cfg, 2 * a.pairs, T)
    peak = matmul_gflops()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(f"device: {devices[0].platform} x1 ({jax.device_count()} visible), model params {n_params / 1e6:.2f}M, "
          f"{a.pairs} pairs x 2 x {T} tokens (prompt {a.prompt} + response {a.response}), live reference")
    print(f"first step (compile + run): {compile_s:.1f} s; step time median of {a.steps}: {step_s * 1e3:.0f} ms "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")
    print(f"pairs/s: {a.pairs / step_s:.2f}   tokens/s: {2 * a.pairs * T / step_s:.0f}   "
          f"model GFLOP/step: {flops / 1e9:.1f}   achieved GFLOP/s: {flops / step_s / 1e9:.1f}")
    print(f"f32 matmul (2048^3 jnp.dot) on this machine: {peak:.1f} GFLOP/s  ->  "
          f"{100 * flops / step_s / 1e9 / peak:.0f}% of it; loss {float(m['loss']):.4f}")


if __name__ == "__main__":
    main()
