"""Ring attention (sequence=8) vs dense attention (no sequence sharding): per-device memory and wall time.

    python benchmarks/ring_attention.py [--lengths 2048,4096,...] [--heads 8] [--kv-heads 8] [--head-dim 64]
                                        [--dtype float32] [--time-upto 4096] [--layout zigzag]

Memory is read from the compiled executable's ``memory_analysis()`` (argument + output + temp bytes of
one device's program); the big lengths are only lowered and compiled, never run. The measured function is
attention forward + backward (grads wrt q, k, v of sum(out)), i.e. what a train step needs. Wall time runs
on 8 simulated CPU devices sharing this machine's cores: it shows overhead, not real speed-up.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jalign.models.attention import attention_mask, dense_attention  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.ring_attention import ring_attention_auto, to_zigzag  # noqa: E402
from sharding.rules import use_rules  # noqa: E402


def _grad_fn(attn):
    def loss(q, k, v, seg, idx):
        return jnp.sum(attn(q, k, v, seg, idx).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _dense(q, k, v, seg, idx):
    return dense_attention(q, k, v, attention_mask(seg, seg, idx, idx))


def build(kind, T, args, mesh):
    """(jitted fn, abstract args with shardings) for 'ring' (sequence-sharded) or 'dense' (one device)."""
    dtype = jnp.dtype(args.dtype)
    shapes = [(1, T, args.heads, args.head_dim), (1, T, args.kv_heads, args.head_dim),
              (1, T, args.kv_heads, args.head_dim), (1, T), (1, T)]
    dtypes = [dtype, dtype, dtype, jnp.int32, jnp.int32]
    if kind == "ring":
        specs = [P(None, "sequence", None, None)] * 3 + [P(None, "sequence")] * 2

        def attn(q, k, v, seg, idx):
            with use_rules(mesh):
                return ring_attention_auto(q, k, v, seg, seg, idx, idx)

        shardings = [NamedSharding(mesh, s) for s in specs]
    else:
        attn = _dense
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = [one] * 5
    abstract = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d, sh in zip(shapes, dtypes, shardings)]
    return jax.jit(_grad_fn(attn)), abstract, shardings


def concrete(abstract, shardings, T, n, layout):
    rng = np.random.RandomState(0)
    idx = np.arange(T, dtype=np.int32)[None]
    if layout == "zigzag":
        idx = to_zigzag(idx, n)
    vals = [rng.randn(*a.shape).astype(a.dtype) for a in abstract[:3]] + [np.ones((1, T), np.int32), idx]
    return [jax.device_put(x, s) for x, s in zip(vals, shardings)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--time-upto", type=int, default=4096, help="run (not just compile) lengths up to this")
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    args = ap.parse_args()
    n = 8
    mesh = make_mesh(1, 1, 1, n)
    print(f"attention fwd+bwd, batch 1, {args.heads} heads ({args.kv_heads} kv), head_dim {args.head_dim}, "
          f"{args.dtype}, ring over sequence={n} ({args.layout}) vs dense on one device; MiB per device")
    hdr = f"{'seq':>6} | {'dense arg':>9} {'temp':>9} {'total':>9} | {'ring arg':>9} {'temp':>9} {'total':>9} | " \
          f"{'ratio':>6} | {'dense ms':>9} {'ring ms':>9}"
    print(hdr)
    print("-" * len(hdr))
    for T in (int(x) for x in args.lengths.split(",")):
        row, times = {}, {}
        for kind in ("dense", "ring"):
            fn, abstract, shardings = build(kind, T, args, mesh)
            compiled = fn.lower(*abstract).compile()
            ma = compiled.memory_analysis()
            arg = ma.argument_size_in_bytes / 2**20
            total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes) / 2**20
            row[kind] = (arg, ma.temp_size_in_bytes / 2**20, total)
            if T <= args.time_upto:
                xs = concrete(abstract, shardings, T, n, args.layout if kind == "ring" else "contiguous")
                jax.block_until_ready(compiled(*xs))
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(*xs))
                    ts.append(time.perf_counter() - t0)
                times[kind] = f"{1e3 * float(np.median(ts)):9.1f}"
        d, r = row["dense"], row["ring"]
        print(f"{T:>6} | {d[0]:9.1f} {d[1]:9.1f} {d[2]:9.1f} | {r[0]:9.1f} {r[1]:9.1f} {r[2]:9.1f} | "
              f"{d[2] / r[2]:6.1f} | {times.get('dense', '        -'):>9} {times.get('ring', '        -'):>9}",
              flush=True)


if __name__ == "__main__":
    main()
