"""Generation throughput: batch 8, prompt 64, 192 new tokens on the tiny-llama config, random params.

    python benchmarks/generate.py [--batch 8 --prompt 64 --new 192 --dtype float32]

Prints compile time (first call minus a steady call), steady-state generated tokens/s, prefill time and
ms per decode step ((T(new) - T(1)) / (new - 1), both runs on the same executable). No asserts on time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jalign import generate as gen
from jalign.config import ModelConfig
from jalign.models.params import init_params
from jalign.models.transformer import declare_params


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=8192, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4, dtype=a.dtype)
    params = init_params(declare_params(cfg), jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, a.prompt).tolist() for _ in range(a.batch)]
    bucket = 1 << (a.new - 1).bit_length()
    run = lambda n: gen.generate(params, cfg, prompts, max_new_tokens=n, temperature=1.0, top_p=0.95,  # noqa
                                 rng=0, new_bucket=bucket)
    t0 = time.perf_counter()
    run(a.new)
    first = time.perf_counter() - t0
    full, out = timed(lambda: run(a.new), a.repeats)
    one, _ = timed(lambda: run(1), a.repeats)
    assert out["steps"] == a.new, out["steps"]
    step_ms = (full - one) / (a.new - 1) * 1e3
    print(f"device={jax.devices()[0].platform} x{jax.device_count()}  batch={a.batch} prompt={a.prompt} "
          f"new={a.new} (cache {a.prompt + bucket} slots) dtype={a.dtype}")
    print(f"compile            {first - full:8.2f} s")
    print(f"generate (steady)  {full * 1e3:8.1f} ms  -> {a.batch * a.new / full:8.0f} generated tokens/s")
    print(f"prefill + 1 token  {one * 1e3:8.1f} ms")
    print(f"decode step        {step_ms:8.2f} ms  -> {a.batch / step_ms * 1e3:8.0f} tokens/s in decode")


if __name__ == "__main__":
    main()
