"""Trainable-parameter counts of LoRA and the memory of the frozen base (f32 / bf16 / int8 / nf4 / nf4_dq),
computed from the declarations alone (``jax.eval_shape`` of the quantiser: nothing is allocated).

    python benchmarks/lora_memory.py                    # the tiny config and Llama-3-8B
    python benchmarks/lora_memory.py --rank 8 --targets q,v
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

from jalign.config import LoRAConfig, ModelConfig
from jalign.models import lora, quant
from jalign.models.params import abstract_params, flatten
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear", help="all-linear or a comma list of q,k,v,o,gate,up,down")
    a = ap.parse_args()
    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    lcfg = LoRAConfig(rank=a.rank, alpha=a.alpha, targets=targets)
    for name, cfg in CONFIGS.items():
        report(name, cfg, lcfg)


if __name__ == "__main__":
    main()
