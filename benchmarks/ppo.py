"""One PPO step on the tiny-llama config (vocab 8192, hidden 256, mlp 688, 4 layers, 8/4 heads):
8 prompts x 64 tokens, 192 new tokens, random actor / critic / reference, a rule reward.

    python benchmarks/ppo.py [--prompts 8 --prompt-len 64 --new 192 --epochs 1 --dtype float32] [--engines engine,static]

Prints seconds per step split into rollout (generation + host row building), scoring (old / reference
log-probs, values, reward, advantages: one jitted program) and training (actor + critic updates), for
steady-state steps (compile excluded: the first step is reported separately), for each of ``--engines``:
``engine`` rolls out with the continuous-batching engine (``rollout.engine: true``, the default), ``static``
with one static batch (``jalign.generate``, the sampler before the engine), one after the other in this process.
No asserts on time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jalign.algorithms.base import Runtime
from jalign.algorithms.ppo import PPO
from jalign.config import load_config, validate_for_devices
from jalign.roles import build_roles
from sharding.mesh import make_mesh
from sharding.rules import make_rules, use_rules


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3, help="steady-state steps timed after the first")
    ap.add_argument("--engines", default="engine,static", help="comma list of engine, static")
    a = ap.parse_args()
    for kind in a.engines.split(","):
        one_run(a, kind)


def one_run(a, kind: str) -> None:
    if kind not in ("engine", "static"):
        raise SystemExit(f"--engines: {kind!r} is neither 'engine' nor 'static'")
    tmp = Path(tempfile.mkdtemp(prefix="jalign_bench_ppo_"))
    rng = np.random.default_rng(0)
    # byte tokenizer + "none" template: a prompt of n characters is n tokens (plus BOS)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    with open(tmp / "prompts.jsonl", "w") as f:
        for _ in range(4 * a.prompts):
            f.write(json.dumps({"prompt": "".join(rng.choice(letters, a.prompt_len - 1))}) + "\n")
    cfg = load_config(None, [
        "model.vocab_size=8192", "model.hidden=256", "model.mlp=688", "model.layers=4", "model.heads=8",
        "model.kv_heads=4", f"model.dtype={a.dtype}", f"data.train={tmp / 'prompts.jsonl'}", "data.eval=null",
        "data.chat_template=none", f"data.seq_len={a.prompt_len + a.new}", "algorithm.name=ppo",
        "algorithm.reward_fn=contains", f"algorithm.max_new_tokens={a.new}", f"algorithm.ppo_epochs={a.epochs}",
        f"train.global_batch={a.prompts}", "algorithm.num_rollouts_per_prompt=1", f"train.out_dir={tmp}",
        "optim.warmup_steps=0", "train.timing=true", f"rollout.engine={str(kind == 'engine').lower()}"])
    mesh = make_mesh(**validate_for_devices(cfg, jax.device_count()))
    rules = make_rules()
    rt = Runtime(cfg=cfg, mesh=mesh, rules=rules, run_dir=tmp, log=lambda *_: None)
    with use_rules(mesh, rules):
        algo = PPO(rt)
        roles = build_roles(cfg, algo.role_specs(), mesh, rules, log=lambda *_: None)
        state = algo.init_state(roles)
        algo.start(state, roles)
        it = algo.train_batches()
        t0 = time.perf_counter()
        state, first = algo.step(state, roles, next(it))
        jax.block_until_ready(first)
        first_total = time.perf_counter() - t0
        steady = []
        for _ in range(a.steps):
            state, m = algo.step(state, roles, next(it))
            steady.append(jax.device_get(m))
    med = {k: statistics.median(float(m[k]) for m in steady) for k in ("time_rollout", "time_score", "time_train",
                                                                        "response_length")}
    med["generate_tokens_per_s"] = a.prompts * med["response_length"] / med["time_rollout"]
    total = med["time_rollout"] + med["time_score"] + med["time_train"]
    print(f"[{kind}] device={jax.devices()[0].platform} x{jax.device_count()}  prompts={a.prompts} x {a.prompt_len} tokens, "
          f"new={a.new}, rows S={algo.P + algo.N}, epochs={a.epochs}, dtype={a.dtype}")
    print(f"first step (with compiles)  {first_total:8.2f} s")
    print(f"steady step                 {total:8.2f} s   (median of {a.steps})")
    print(f"  rollout                   {med['time_rollout']:8.2f} s   "
          f"({med['generate_tokens_per_s']:.0f} generated tokens/s, {med['response_length']:.0f} tokens/response)")
    print(f"  scoring                   {med['time_score']:8.2f} s")
    print(f"  training                  {med['time_train']:8.2f} s")


if __name__ == "__main__":
    main()
