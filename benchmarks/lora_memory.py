"""Trainable-parameter counts of LoRA and the memory of the frozen base (f32 / bf16 / int8 / nf4 / nf4_dq),
computed from the declarations alone (``jax.eval_shape`` of the quantiser: nothing is allocated).

    python benchmarks/lora_memory.py                    # the tiny config and Llama-3-8B
    python benchmarks/lora_memory.py --rank 8 --targets q,v
    python benchmarks/lora_memory.py --compiled         # + XLA's memory_analysis of a LoRA gradient step

``--compiled`` compiles (never runs) ``grad(loss)(adapters, base, batch)`` for one device from abstract
shapes and prints XLA's argument and temp bytes per base format: what the quantised base saves at run
time, and that no dequantised copy of the layers is kept for the backward pass.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear", help="all-linear or a comma list of q,k,v,o,gate,up,down")
    ap.add_argument("--compiled", action="store_true", help="also compile a LoRA gradient step per base format")
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    lcfg = LoRAConfig(rank=a.rank, alpha=a.alpha, targets=targets)
    for name, cfg in CONFIGS.items():
        report(name, cfg, lcfg)
    if a.compiled:
        for name, cfg in CONFIGS.items():
            compiled_step(name, cfg, lcfg, batch=1, seq=a.seq)


if __name__ == "__main__":
    main()
