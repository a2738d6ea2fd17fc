"""SFT and DPO train-step MFU at Llama 1B and 8B shapes, for a GPU (or TPU) host.

    python benchmarks/gpu.py [--shape 1b|8b|tiny] [--workloads sft,dpo] [--attention xla|cudnn|pallas]
                             [--dtype bfloat16] [--batch 8] [--seq 2048] [--steps 5] [--remat full]
                             [--peak-tflops 989] [--fp8]

Per workload: first step (compile + run), step time, tokens/s, model TFLOP/s and MFU against (a) a measured
bf16 (or --dtype) matmul rate on one device (8192^3) and (b) ``--peak-tflops`` per device if given (the
datasheet figure, e.g. 989 for H100 SXM dense bf16). Model FLOPs: 6 N per trained token (N = matmul
weights) + causal attention 6 x layers x heads x head_dim x seq; DPO adds the reference's forward (2 N + ...)
over the same tokens. Recomputation (``--remat``) is not counted (MFU, not HFU).

The mesh is FSDP over every local device (one data-parallel group), enough for 8B with AdamW on 8 x 80 GB.
On a host without an accelerator the 1B/8B shapes are refused (the figures would mean nothing and the
compile alone takes minutes); ``--shape tiny`` runs everywhere to check the script. Figures only.

``--fp8``: the policy's layer matmuls run in fp8 (``model.matmul_fp8``, ``jalign.models.fp8``: e4m3 weights and
activations, e5m2 output gradients, per-tensor current scaling); the DPO reference stays in --dtype, as in a
jalign run. MFU is then also given against a measured fp8 matmul rate (e4m3 x e4m3 -> f32, 8192^3). XLA runs
fp8 dots on fp8 tensor cores from compute capability 8.9 (Ada, Hopper); elsewhere it converts the operands
back up, so a GPU below 8.9 gets a warning and the CPU only ``--shape tiny`` (the script check).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jalign.algorithms import base  # noqa: E402
from jalign.algorithms.reward import flatten_pairs  # noqa: E402
from jalign.config import ModelConfig, OptimConfig  # noqa: E402
from jalign.data.fields import SFT_FIELDS, pair_fields  # noqa: E402
from jalign.losses import dpo_loss, sequence_logps, sft_loss  # noqa: E402
from jalign.models import fp8 as fp8_lib  # noqa: E402
from jalign.models import params as params_lib  # noqa: E402
from jalign.models import transformer as tfm  # noqa: E402
from jalign.state import TrainedModel  # noqa: E402
from sharding import make_mesh, make_rules, use_rules  # noqa: E402

LLAMA = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192)
SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "1b": dict(LLAMA, hidden=2048, mlp=8192, layers=16, heads=32, kv_heads=8, tie_embeddings=True),
    "8b": dict(LLAMA, hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8),
    "tiny": dict(vocab_size=8192, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4, max_seq_len=4096),
}


def matmul_params(cfg: ModelConfig) -> int:
    decls = params_lib.flatten(tfm.declare_params(cfg))
    n = sum(int(np.prod(d.shape)) for p, d in decls.items() if not p.endswith("norm") and p != "embed")
    return n + (cfg.hidden * cfg.vocab_size if cfg.tie_embeddings else 0)  # a tied head still multiplies


def forward_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    return 2 * matmul_params(cfg) + 2 * cfg.layers * cfg.heads * cfg.resolved_head_dim * seq


def measured_matmul_tflops(dtype, n: int = 8192, reps: int = 5) -> float:
    a = jnp.ones((n, n), dtype)  # fp8 dtypes too: XLA emits the fp8 GEMM for fp8 operands with an f32 result
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def policy(p, cfg):
    """The params the policy's forward takes: fp8-wrapped layer weights under --fp8 (as Trainable.forward_params)."""
    return fp8_lib.with_fp8(p) if cfg.matmul_fp8 else p


def sft_setup(cfg, trained, B, T):
    def loss_fn(p, mb, norms, roles):
        loss, m = sft_loss(base.policy_token_logps(policy(p, cfg), mb, cfg), mb["loss_mask"], norms["num_tokens"])
        return loss, {"loss": loss}

    rng = np.random.default_rng(0)
    rows = dict(tokens=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
                targets=rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                segment_ids=np.ones((B, T), np.int32), loss_mask=np.ones((B, T), np.float32))
    step = base.make_train_step(loss_fn, lambda b: {"num_tokens": jnp.sum(b["loss_mask"])}, trained)
    return step, rows, SFT_FIELDS, None, 3 * forward_flops_per_token(cfg, T) * B * T


def dpo_setup(cfg, trained, B, T, beta=0.1):
    """B pairs of T-token sides (prompt = the first quarter), live reference: the same weights, frozen."""
    names = ("tokens", "targets", "positions", "segment_ids", "loss_mask")

    def sums(p, mb):
        both = flatten_pairs(mb, names)
        return sequence_logps(base.policy_token_logps(p, both, cfg), both["loss_mask"]).reshape(-1, 2)

    def loss_fn(p, mb, norms, roles):
        pi = sums(policy(p, cfg), mb)
        ref = jax.lax.stop_gradient(sums(roles["reference"], mb))
        loss, m = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], mb["valid"], norms["num_pairs"], beta=beta)
        return loss, {"loss": loss}

    rng = np.random.default_rng(0)
    mask = np.zeros((B, 2, T), np.float32)
    mask[..., T // 4:] = 1.0
    rows = dict(tokens=rng.integers(0, cfg.vocab_size, (B, 2, T)).astype(np.int32),
                targets=rng.integers(0, cfg.vocab_size, (B, 2, T)).astype(np.int32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy(),
                segment_ids=np.ones((B, 2, T), np.int32), loss_mask=mask,
                index=np.arange(B, dtype=np.int32), valid=np.ones(B, np.float32),
                rewards=np.zeros((B, 2), np.float32))
    step = base.make_train_step(loss_fn, lambda b: {"num_pairs": jnp.sum(b["valid"])}, trained)
    return step, rows, pair_fields("lm"), "reference", (3 + 1) * forward_flops_per_token(cfg, T) * 2 * B * T


def run(workload, cfg, mesh, rules, B, T, steps):
    decls = tfm.declare_params(cfg)
    trained = TrainedModel(decls, OptimConfig(), 100, mesh, rules, jnp.float32)
    setup = sft_setup if workload == "sft" else dpo_setup
    step, rows, fields, ref_role, flops = setup(cfg, trained, B, T)
    params = params_lib.init_params(decls, 0, shardings=trained.param_shardings)
    # A copy: with --dtype float32 astype would return the very buffers the step donates with the state.
    roles = ({ref_role: jax.tree.map(lambda x: jnp.array(x, tfm.DTYPES[cfg.dtype], copy=True), params)}
             if ref_role else None)
    state = trained.new_state(params, jax.random.key(0))
    batch = base.to_global_batch(rows, fields, mesh, rules, 1)
    t0 = time.perf_counter()
    state, m = step(state, roles, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, roles, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tokens = B * T * (2 if workload == "dpo" else 1)
    return dict(first=first, step=dt, tokens_per_s=tokens / dt, tflops=flops / dt / 1e12, loss=float(m["loss"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--workloads", default="sft,dpo")
    ap.add_argument("--attention", default="cudnn", choices=("xla", "cudnn", "pallas"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--remat", default="full", choices=("none", "full", "dots_saveable",
                                                        "dots_with_no_batch_dims_saveable"))
    ap.add_argument("--batch", type=int, help="rows (SFT) / pairs (DPO) per step; default 2 per device")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, help="datasheet peak per device (e.g. 989 for H100 bf16)")
    ap.add_argument("--fp8", action="store_true", help="the policy's layer matmuls in fp8 (model.matmul_fp8)")
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    if backend == "cpu" and a.shape != "tiny":
        sys.exit(f"benchmarks/gpu.py: no GPU/TPU here (JAX backend 'cpu'); the {a.shape} shapes are for an "
                 "accelerator. Use --shape tiny --seq 256 to check the script on CPU.")
    workloads = [w for w in a.workloads.split(",") if w]
    bad = [w for w in workloads if w not in ("sft", "dpo")]
    if bad:
        ap.error(f"--workloads: unknown {', '.join(bad)} (known: sft, dpo)")
    if a.fp8 and backend == "cpu":
        print("note: --fp8 on CPU: XLA emulates fp8 dots in f32 (a correctness path; the figures mean nothing)")
    elif a.fp8 and backend == "gpu":
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if cc is not None and tuple(int(c) for c in str(cc).split(".")[:2]) < (8, 9):
            print(f"warning: --fp8 on compute capability {cc} (< 8.9: no fp8 tensor cores); XLA converts the "
                  "operands up, so expect no speed-up")
    attention = a.attention
    if backend == "cpu" and attention == "pallas":
        print("note: on CPU the Pallas kernel runs in interpret mode (a correctness path, very slow); using xla")
        attention = "xla"
    n = jax.device_count()
    cfg = ModelConfig(**SHAPES[a.shape], dtype=a.dtype, param_dtype="float32", remat=a.remat, attention=attention,
                      matmul_fp8=a.fp8)
    if a.seq > cfg.max_seq_len:
        ap.error(f"--seq {a.seq} is longer than the shape's max_seq_len {cfg.max_seq_len}")
    B = a.batch or 2 * n
    if B % n:
        ap.error(f"--batch {B} must be divisible by the {n} devices")
    mesh, rules = make_mesh(1, n, 1, 1), make_rules()
    size = 8192 if backend != "cpu" else 1024
    measured = measured_matmul_tflops(jnp.dtype(a.dtype), n=size)
    measured8 = measured_matmul_tflops(jnp.dtype(fp8_lib.FORWARD_DTYPE), n=size) if a.fp8 else None
    print(f"{a.shape}: {matmul_params(cfg) / 1e6:,.1f} M matmul params, {n} x {jax.devices()[0].device_kind} "
          f"({backend}), {a.dtype} compute / f32 master weights, attention {attention}, remat {a.remat}, "
          f"FSDP over {n}" + (", fp8 layer matmuls (e4m3/e5m2, per-tensor current scaling)" if a.fp8 else ""))
    print(f"measured {a.dtype} matmul: {measured:.3g} TFLOP/s per device"
          + (f"; fp8 (e4m3) matmul: {measured8:.3g}" if a.fp8 else "")
          + (f"; datasheet peak {a.peak_tflops:.0f}" if a.peak_tflops else ""))
    with use_rules(mesh, rules):
        for w in workloads:
            r = run(w, cfg, mesh, rules, B, a.seq, a.steps)
            per_dev = r["tflops"] / n
            mfu = f"MFU {per_dev / measured:.1%} of measured {a.dtype}"
            if measured8:
                mfu += f", {per_dev / measured8:.1%} of measured fp8"
            if a.peak_tflops:
                mfu += f", {per_dev / a.peak_tflops:.1%} of datasheet"
            unit = "pairs" if w == "dpo" else "rows"
            print(f"{w}: {B} {unit} x {a.seq}: first step {r['first']:.1f} s, step {r['step'] * 1e3:.0f} ms, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.3g} model TFLOP/s ({per_dev:.3g} per device), "
                  f"{mfu}; loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
