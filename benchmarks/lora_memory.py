"""Trainable-parameter counts of LoRA and the memory of the frozen base (f32 / bf16 / int8 / nf4 / nf4_dq),
computed from the declarations alone (``jax.eval_shape`` of the quantiser: nothing is allocated).

    python benchmarks/lora_memory.py                    # the tiny config and Llama-3-8B
    python benchmarks/lora_memory.py --rank 8 --targets q,v
    python benchmarks/lora_memory.py --compiled         # + XLA's memory_analysis of a LoRA gradient step

``--compiled`` compiles (never runs) ``grad(loss)(adapters, base, batch)`` for one device from abstract
shapes and prints XLA's argument and temp bytes per base format: what the quantised base saves at run
time, and that no dequantised copy of the layers is kept for the backward pass.

    python benchmarks/lora_memory.py --runs --seq 64    # SFT and DPO at a 0.54B random model, LoRA vs full
    python benchmarks/lora_memory.py --runs --seq 64 --execute lora   # full fine-tuning compiled, not run

``--runs`` builds the real SFT and DPO algorithms (``jalign.algorithms``, one CPU device, f32, a random
Llama-shaped model of ``--size``), each in a child process of its own so that its host RSS is its own, and
runs a few train steps. Per run: trainable parameters, XLA's ``memory_analysis()`` of the compiled train step
(arguments + outputs - aliased + temporaries: the device memory of the step, with the frozen base / the DPO
reference among the arguments), the process's peak host RSS, and steps/s (on a shared machine: indicative
only). Under LoRA the DPO reference is the base with the adapters off, so DPO+LoRA holds one copy of the model.
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

from jalign.config import LoRAConfig, ModelConfig
from jalign.models import lora, quant
from jalign.models.params import abstract_params, flatten
from jalign.models import transformer as tfm
from jalign.models.transformer import declare_params

CONFIGS = {
    "tiny (configs/sft_tiny.yaml: 4 x 128)": ModelConfig(vocab_size=384, hidden=128, mlp=384, layers=4, heads=4,
                                                         kv_heads=2),
    "Llama-3-8B": ModelConfig(vocab_size=128256, hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8),
}


def gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB" if n >= 2**26 else f"{n / 2**20:8.3f} MiB"


def report(name: str, cfg: ModelConfig, lcfg: LoRAConfig) -> None:
    decls = declare_params(cfg)
    s = lora.trainable_summary(cfg, lcfg)
    lin = sum(lora.param_count(flatten(decls)[p]) for p in quant.quantized_paths(decls))
    print(f"\n{name}: {s['base']:,} base parameters ({lin:,} in the layers' linear weights)")
    print(f"  LoRA rank {lcfg.rank} on {','.join(lora.resolve_targets(lcfg))}: {s['trainable']:,} trainable "
          f"({100 * s['trainable_fraction']:.3f}% of the base); Adam state for them: "
          f"{gib(8 * s['trainable']).strip()} (f32 mu + nu)")
    f32 = quant.tree_bytes(abstract_params(decls, jnp.float32))
    print("  frozen base                      bytes       / f32")
    for dt in (jnp.float32, jnp.bfloat16):
        n = quant.tree_bytes(abstract_params(decls, dt))
        print(f"  {jnp.dtype(dt).name:32s} {gib(n)}   {n / f32:6.3f}")
    for fmt in quant.FORMATS:
        for dt in (jnp.float32, jnp.bfloat16):  # the dtype of what stays unquantised (embeddings, head, norms)
            n = quant.tree_bytes(quant.abstract_quantized(decls, fmt, dtype=dt))
            print(f"  {fmt + ' linears, rest ' + jnp.dtype(dt).name:32s} {gib(n)}   {n / f32:6.3f}")
    paths = quant.quantized_paths(decls)
    n_lin = {}
    for fmt in quant.FORMATS:
        flat = flatten(quant.abstract_quantized(decls, fmt))
        n_lin[fmt] = quant.tree_bytes([v for k, v in flat.items() if any(k.startswith(p + "/") for p in paths)])
    print("  bits per linear weight: " + ", ".join(f"{f} {8 * n / lin:.3f}" for f, n in n_lin.items()))


def compiled_step(name: str, cfg: ModelConfig, lcfg: LoRAConfig, batch: int, seq: int) -> None:
    import dataclasses

    import jax

    cfg = dataclasses.replace(cfg, dtype="bfloat16", remat="full")
    decls = declare_params(cfg)
    ad = abstract_params(lora.declare_lora(cfg, lcfg))
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(adapters, base, tokens):
        p = lora.with_adapters(base, adapters, lcfg)
        logits = tfm.lm_logits(p, tfm.forward(p, tokens, tokens, tokens, cfg), cfg)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    grad = jax.jit(jax.grad(loss))
    print(f"\n{name}: compiled LoRA gradient step, batch {batch} x {seq} tokens, bf16 compute, remat full, "
          "1 device")
    print("  base format                 arguments          temp")
    for label, base in [("float32", abstract_params(decls, jnp.float32)),
                        ("bfloat16", abstract_params(decls, jnp.bfloat16))] + [
            (f"{fmt} (rest bf16)", quant.abstract_quantized(decls, fmt, dtype=jnp.bfloat16)) for fmt in quant.FORMATS]:
        m = grad.lower(ad, base, tok).compile().memory_analysis()
        print(f"  {label:22s} {gib(m.argument_size_in_bytes)}  {gib(m.temp_size_in_bytes)}")


# a Llama-shaped model of 0.54B parameters (vocab 32000, untied head) and a 0.13B one for quick checks
SIZES = {
    "0.5b": ["model.vocab_size=32000", "model.hidden=1024", "model.mlp=4608", "model.layers=28", "model.heads=16",
             "model.kv_heads=4"],
    "0.1b": ["model.vocab_size=32000", "model.hidden=512", "model.mlp=2048", "model.layers=16", "model.heads=8",
             "model.kv_heads=4"],
}
DATA = {"sft": "builtin:addition:train", "dpo": "builtin:addition_pairs:train"}


def _config(algorithm: str, lora_rank: int, size: str, seq: int, batch: int, steps: int, out):
    from pathlib import Path

    from jalign.config import load_config

    root = Path(__file__).resolve().parent.parent
    overrides = [*SIZES[size], "model.init_from=null", "model.hf_path=null", f"model.max_seq_len={max(seq, 64)}",
                 f"data.train={DATA[algorithm]}", "data.eval=null", f"data.seq_len={seq}", f"train.global_batch={batch}",
                 f"train.steps={steps}", "train.eval_every=0", "train.progress=false", "train.tensorboard=false",
                 "optim.warmup_steps=0", f"train.out_dir={out}"]
    if algorithm == "dpo":
        overrides.append("algorithm.reference=live")  # the reference model inside the step (LoRA: the base)
    if lora_rank:
        overrides += [f"model.lora.rank={lora_rank}", f"model.lora.alpha={2 * lora_rank}"]
    return load_config(root / "configs" / f"{algorithm}_tiny.yaml", overrides)


def one_run(algorithm: str, lora_rank: int, size: str, seq: int, batch: int, steps: int, execute: bool) -> dict:
    """One configuration in this process: the train step compiled from abstract shapes (its memory_analysis;
    nothing allocated), then, with ``execute``, the real run of ``steps`` steps (peak RSS, steps/s)."""
    import resource
    import tempfile
    import time
    from pathlib import Path

    import jax

    from jalign.algorithms import base
    from jalign.algorithms.registry import resolve
    from jalign.roles import build_roles
    from sharding import make_mesh, make_rules, use_rules

    out = Path(tempfile.mkdtemp(prefix=f"lora_memory_{algorithm}_"))
    cfg = _config(algorithm, lora_rank, size, seq, batch, steps, out)
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rules = make_rules()
    abstract = resolve(algorithm)(base.Runtime(cfg=cfg, mesh=mesh, rules=rules, run_dir=out, log=lambda *_: None,
                                               abstract=True))
    t0 = time.perf_counter()
    with use_rules(mesh, rules):
        prog = abstract.programs()["train_step"]
        m = prog.fn.lower(*prog.resolve_args({})).compile().memory_analysis()
        roles, _, _ = abstract.abstract_roles()
        trainable = sum(x.size for x in jax.tree.leaves(abstract.abstract_state().params))
    row = {"algorithm": algorithm, "lora": lora_rank, "trainable": trainable,
           "frozen_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(roles)),
           "arguments": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
           "device": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
           "compile_s": time.perf_counter() - t0, "executed": execute}
    if execute:
        algo = resolve(algorithm)(base.Runtime(cfg=cfg, mesh=mesh, rules=rules, run_dir=out, log=lambda *_: None))
        with use_rules(mesh, rules):
            roles = build_roles(cfg, algo.role_specs(), mesh, rules, log=lambda *_: None)
            state = algo.init_state(roles)
            algo.start(state, roles)
            it = algo.train_batches()
            times = []
            for _ in range(steps):  # the first step compiles
                b = next(it)
                t = time.perf_counter()
                state, metrics = algo.step(state, roles, b)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t)
        row.update(steps_per_s=(len(times) - 1) / sum(times[1:]) if len(times) > 1 else float("nan"),
                   loss=float(jax.device_get(metrics["loss"])))
    row["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def runs(a) -> None:
    """Each configuration in a child process (its own peak RSS), then one table."""
    import json
    import subprocess
    import sys

    rows = []
    for algorithm in ("sft", "dpo"):
        for rank in (0, a.rank):
            execute = a.execute == "all" or (a.execute == "lora" and rank > 0)
            cmd = [sys.executable, __file__, "--one", f"{algorithm},{rank},{int(execute)}", "--size", a.size,
                   "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(f"{algorithm} lora={rank}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  done: {algorithm} lora={rank}", file=sys.stderr, flush=True)
    n = max((r["trainable"] for r in rows if not r["lora"]), default=0)
    print(f"\nmodel {a.size} ({n / 1e9:.3f}B parameters, f32, 1 CPU device), batch {a.batch} x {a.seq} tokens "
          f"(DPO: {a.batch} pairs); device memory: memory_analysis() of the compiled train step (arguments + outputs "
          "- aliased + temporaries); steps/s on a shared machine: indicative only")
    print("| run | trainable params | frozen roles | step device memory (args / temp) | peak host RSS | steps/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = f"{r['algorithm'].upper()} " + (f"LoRA r={r['lora']}" if r["lora"] else "full")
        rss = gib(r["rss"]).strip() + ("" if r["executed"] else " (compile only, not run)")
        sps = f"{r['steps_per_s']:.3f}" if r["executed"] else "-"
        print(f"| {name} | {r['trainable']:,} | {gib(r['frozen_bytes']).strip()} | {gib(r['device']).strip()} "
              f"({gib(r['arguments']).strip()} / {gib(r['temp']).strip()}) | {rss} | {sps} |")
    full = {r["algorithm"]: r for r in rows if not r["lora"]}
    for r in rows:
        if r["lora"] and r["algorithm"] in full:
            f = full[r["algorithm"]]
            rss = f", host RSS {r['rss'] / f['rss']:.3f}" if f["executed"] and r["executed"] else ""
            print(f"{r['algorithm'].upper()}: LoRA / full = step device memory {r['device'] / f['device']:.3f}{rss}, "
                  f"trainable {r['trainable'] / f['trainable']:.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear", help="all-linear or a comma list of q,k,v,o,gate,up,down")
    ap.add_argument("--compiled", action="store_true", help="also compile a LoRA gradient step per base format")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--runs", action="store_true", help="SFT and DPO, LoRA vs full, at --size (child processes)")
    ap.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=2, help="--runs: rows per step (DPO: pairs)")
    ap.add_argument("--steps", type=int, default=3, help="--runs: steps per run (the first one compiles)")
    ap.add_argument("--execute", default="all", choices=["all", "lora", "none"],
                    help="--runs: which runs also execute (RSS, steps/s); the others only compile (full fine-tuning "
                         "of DPO at 0.5B in f32 needs ~15 GiB of host memory)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "ALGORITHM,RANK,EXECUTE": one run, a JSON line on stdout
    a = ap.parse_args()
    if a.one:
        import json

        algorithm, rank, execute = a.one.split(",")
        print(json.dumps(one_run(algorithm, int(rank), a.size, a.seq, a.batch, a.steps, bool(int(execute)))))
        return
    if a.runs:
        runs(a)
        return
    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    lcfg = LoRAConfig(rank=a.rank, alpha=a.alpha, targets=targets)
    for name, cfg in CONFIGS.items():
        report(name, cfg, lcfg)
    if a.compiled:
        for name, cfg in CONFIGS.items():
            compiled_step(name, cfg, lcfg, batch=1, seq=a.seq)


if __name__ == "__main__":
    main()
