"""SFT train-step throughput on one device: tokens/s and achieved GFLOP/s next to the machine's matmul rate.

    python benchmarks/sft.py [--config tiny-llama|tiny-default] [--batch 8] [--seq 256] [--steps 5]

Prints figures only; never asserts on time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jalign.algorithms import base  # noqa: E402
from jalign.data.fields import SFT_FIELDS  # noqa: E402
from jalign.state import TrainedModel  # noqa: E402
from jalign.config import ModelConfig, OptimConfig  # noqa: E402
from jalign.losses import sft_loss  # noqa: E402
from jalign.models import params as params_lib  # noqa: E402
from jalign.models import transformer as tfm  # noqa: E402
from sharding import make_mesh, make_rules, use_rules  # noqa: E402

CONFIGS = {
    "tiny-llama": ModelConfig(vocab_size=8192, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4),
    "tiny-default": ModelConfig(vocab_size=384, hidden=128, mlp=384, layers=4, heads=4, kv_heads=2),
}


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """6 N per token for the matmuls (forward + backward) plus causal attention scores and values."""
    decls = params_lib.flatten(tfm.declare_params(cfg))
    n_matmul = sum(int(np.prod(d.shape)) for p, d in decls.items() if not p.endswith("norm") and p != "embed")
    attention = 6 * cfg.layers * cfg.heads * cfg.resolved_head_dim * seq  # 2 matmuls x (fwd + 2 bwd), causal half
    return 6 * n_matmul + attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny-llama", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rules = make_rules()
    decls = tfm.declare_params(cfg)
    trained = TrainedModel(decls, OptimConfig(), 100, mesh, rules, jnp.float32)

    def loss_fn(params, mb, norms, frozen):
        loss, m = sft_loss(base.policy_token_logps(params, mb, cfg), mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss, "num_tokens": m["num_tokens"]}

    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    rows = dict(tokens=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
                targets=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                segment_ids=np.ones((B, T), np.int32), loss_mask=np.ones((B, T), np.float32))
    with use_rules(mesh, rules):
        state = trained.new_state(params_lib.init_params(decls, 0, shardings=trained.param_shardings),
                                  jax.random.key(0))
        step = base.make_train_step(loss_fn, lambda b: {"num_tokens": jnp.sum(b["loss_mask"])}, trained)
        batch = base.to_global_batch(rows, SFT_FIELDS, mesh, rules, 1)
        t0 = time.perf_counter()
        state, m = step(state, None, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, None, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / args.steps
    tokens = B * T
    achieved = train_flops_per_token(cfg, T) * tokens / dt / 1e9
    peak = matmul_gflops()
    print(f"config {args.config}: batch {B} x seq {T}, {jax.devices()[0].platform}")
    print(f"first step (compile + run): {compile_s:.1f} s")
    print(f"step: {dt * 1e3:.1f} ms   tokens/s: {tokens / dt:,.0f}")
    print(f"achieved: {achieved:.2f} GFLOP/s   f32 matmul 2048^3: {peak:.2f} GFLOP/s   ratio: {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
