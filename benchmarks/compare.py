"""jalign against a plain PyTorch/transformers loop on the same workload, side by side.

    python benchmarks/compare.py [--workloads sft,dpo[,decode]] [--peers torch] [--rounds 4] [--steps 3]

Each side is a persistent worker process (``benchmarks/_workloads.py``: same shapes, data, weights and
optimizer) that builds and warms up its program once, then runs ``--steps`` steps per round when told to;
the rounds alternate (jalign, peer, jalign, peer, ...) so the two never compete for the cores. Printed per
workload: every round's rate (wall and per CPU-second), the median, and the ratio jalign / peer with its
spread (min-max over the rounds, each jalign round against the peer round next to it); the first step
(compile + run) of each side; the load average before and after; for the training workloads the achieved
model GFLOP/s of each side and its MFU against the f32 matmul rate measured here (a 2048^3 ``x @ x`` in
JAX, best of a few; the same matmul in torch is printed beside it). Without transformers / torch (the ``[hf]``
extra) only jalign runs. Figures only: nothing is asserted.

jalign runs as two sides for training: on one CPU device (XLA:CPU spreads each op over the cores; what a
plain ``jalign train`` gets) and on one CPU device per core with the batch data-parallel over them
(``--xla_force_host_platform_device_count``, ``mesh.data`` = cores), the way to use a multi-core CPU fully.

Workloads: ``sft`` tokens/s (8 rows x 256 tokens), ``dpo`` pairs/s (8 pairs x (64 + 192), live reference),
``decode`` generated tokens/s (greedy, batch 8, prompt 64, 192 new; jalign's static sampler and its rollout
engine). Rates per CPU-second (user + system time of the worker, all threads) are printed beside wall rates:
on a machine other jobs load, CPU time is the steadier measure of the work each side does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

UNITS = {"sft": ("tokens/s", 8 * 256), "dpo": ("pairs/s", 8), "decode": ("tokens/s", 8 * 192)}
PEERS = {"sft": ("torch",), "dpo": ("torch",), "decode": ("torch",)}
JALIGN_SIDES = {"sft": ("jalign", "jalign-dp"), "dpo": ("jalign", "jalign-dp"), "decode": ("jalign", "jalign-engine")}
LABELS = {"jalign": "jalign", "jalign-dp": "jalign, a device per core", "jalign-engine": "jalign rollout engine",
          "torch": "PyTorch/transformers loop"}


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class Worker:
    def __init__(self, side: str, workload: str, model_dir: str, env: dict):
        self.side = side
        self.p = subprocess.Popen([sys.executable, os.path.join(HERE, "_workloads.py"), "--side", side, "--workload",
                                   workload, "--model-dir", model_dir], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.ready = self._read("ready")

    def _read(self, tag: str) -> dict:
        for line in self.p.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        raise RuntimeError(f"worker {self.side} exited (status {self.p.wait()}) before '{tag}'")

    def run(self, steps: int) -> dict:
        self.p.stdin.write(f"run {steps}\n")
        return self._read("done")

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.p.kill()


def make_model_dir() -> str:
    """The tiny-llama weights every side loads (random init from jalign, written as an HF directory)."""
    import jax

    from jalign.config import ModelConfig
    from jalign.models.hf_io import save_hf
    from jalign.models.params import init_params
    from jalign.models.transformer import declare_params

    from _workloads import MODEL

    cfg = ModelConfig(**MODEL, max_seq_len=4096)
    d = os.path.join(tempfile.mkdtemp(prefix="jalign_cmp_"), "model")
    save_hf(init_params(declare_params(cfg), jax.random.key(0)), cfg, d)
    return d


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """f32 GFLOP/s of an n^3 matmul in JAX on this machine (best of ``reps``: the least-disturbed run)."""
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def torch_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import time

    import torch

    a = torch.ones((n, n))
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"


def compare(workload: str, peers: list[str], model_dir: str, rounds: int, steps: int, env: dict,
            peak: float) -> dict:
    from _workloads import step_flops

    unit, per_step = UNITS[workload]
    flops = step_flops(workload)
    sides = list(JALIGN_SIDES[workload]) + [p for p in peers if p in PEERS[workload]]
    print(f"\n== {workload}: {unit}, {rounds} rounds x {steps} steps, alternated; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    workers, results = {}, {}
    try:
        for s in sides:  # built one after the other: compiles do not overlap
            try:
                workers[s] = Worker(s, workload, model_dir, env)
                print(f"  {LABELS[s]:28s} first step (build + compile + run): {workers[s].ready['first_step_s']:.1f} s",
                      flush=True)
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                print(f"  {LABELS[s]:28s} unavailable: {e}")
        times = {s: [] for s in workers}
        for _ in range(rounds):
            for s, w in workers.items():
                times[s].append(w.run(steps))
    finally:
        for w in workers.values():
            w.close()
    for s, ts in times.items():
        wall = [steps * per_step / t["wall"] for t in ts]
        cpu = [steps * per_step / t["cpu"] for t in ts]
        gflops = [steps * flops / t["wall"] / 1e9 for t in ts]
        results[s] = {"wall": wall, "cpu": cpu, "loss": ts[-1]["loss"], "first_step_s": workers[s].ready["first_step_s"],
                      "gflops": gflops}
        print(f"  {LABELS[s]:28s} {unit} per round: {' / '.join(f'{x:,.3g}' for x in wall)}   median "
              f"{statistics.median(wall):,.3g}; per CPU-second {statistics.median(cpu):,.3g}; last loss "
              f"{ts[-1]['loss']:.4g}")
        if flops:
            print(f"  {'':28s} model GFLOP/s per round: {' / '.join(f'{g:.1f}' for g in gflops)}   MFU vs "
                  f"{peak:.0f} GFLOP/s matmul: {' / '.join(f'{g / peak:.1%}' for g in gflops)}")
    base = [s for s in JALIGN_SIDES[workload] if s in results]
    for j in base:
        for p in (x for x in results if x not in JALIGN_SIDES[workload]):
            rw = [a / b for a, b in zip(results[j]["wall"], results[p]["wall"])]
            rc = [a / b for a, b in zip(results[j]["cpu"], results[p]["cpu"])]
            print(f"  ratio {LABELS[j]} / {LABELS[p]}: wall {spread(rw)}x; per CPU-second {spread(rc)}x")
    print(f"  load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="sft,dpo", help="comma list of sft, dpo, decode")
    ap.add_argument("--peers", default="torch", help="'torch' or '' (jalign only)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    peers = [p for p in a.peers.split(",") if p]
    unknown = [p for p in peers if p not in LABELS or p.startswith("jalign")]
    if unknown:
        ap.error(f"--peers: unknown peer(s) {', '.join(unknown)} (known: torch)")
    bad = [w for w in a.workloads.split(",") if w and w not in UNITS]
    if bad:
        ap.error(f"--workloads: unknown workload(s) {', '.join(bad)} (known: {', '.join(UNITS)})")
    if a.rounds < 1 or a.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    missing = [p for p in peers if not (have("transformers") and have("torch"))]
    if missing:
        print(f"peers not installed (the [hf] extra: torch + transformers): {', '.join(missing)}; running without them")
        peers = [p for p in peers if p not in missing]
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    model_dir = make_model_dir()
    print(f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; weights in {model_dir}")
    peak = matmul_peak_gflops()
    torch_peak = f"; torch {torch_matmul_gflops():.1f}" if peers else ""
    print(f"f32 matmul 2048^3: JAX {peak:.1f} GFLOP/s{torch_peak} (the MFU denominator is the JAX figure)")
    out = {w: compare(w, peers, model_dir, a.rounds, a.steps, env, peak) for w in a.workloads.split(",") if w}
    out["matmul_peak_gflops"] = peak
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
