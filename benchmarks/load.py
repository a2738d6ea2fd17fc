"""Loading a >= 1B-parameter Llama onto 8 simulated devices (fsdp=8): peak host RSS and wall time.

    python benchmarks/load.py [--cache /tmp/jalign-bench-load] [--skip-old] [--skip-run]

Writes (once, cached) a random 1.1B Llama (TinyLlama's shape) as a bf16 safetensors HF directory,
tensor by tensor with NumPy, and a jalign params checkpoint of the same weights (bf16, orbax) for the
``run:`` source. Then each measurement runs in a fresh subprocess with 8 simulated CPU devices:

* ``new``: ``jalign.models.load.load_params(hf:DIR)`` onto fsdp=8 (f32 params);
* ``old``: ``algorithms.base.initial_params`` with ``model.hf_path`` (random init + load + host copy),
  run once, only when ``free`` shows >= 20 GiB available (it peaks at ~17 GiB);
* ``run``: ``load_params(run:DIR)`` from the orbax checkpoint onto fsdp=8 (f32);
* ``numpy``: the floor, every tensor read and converted to f32 once with NumPy (no JAX, no sharding);
* ``reader``: ``hf_io.load_hf_params`` alone (the existing per-slice reader the old path starts with).

Peak RSS is the child's VmHWM (it includes the memory-mapped file pages the loader touched; on CPU
the device buffers are host memory too, so the loaded params themselves are 1.0x). The file read
time is ``cat FILES > /dev/null`` just before each load, from the disk (the files evicted from the page
cache with POSIX_FADV_DONTNEED first) and again from the page cache; ``--cold`` evicts them before each
load too.
CPU time (user+sys of the child) is printed next to wall time: on a shared machine it is the steadier
measure of the work a load does. Prints figures only; never asserts on time or memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
# TinyLlama-1.1B's shape: 1.10e9 parameters, 2.05 GiB as bf16, 4.10 GiB as f32.
LLAMA_1B = dict(vocab_size=32000, hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4, max_seq_len=2048,
                rope_theta=10000.0, norm_eps=1e-5)


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmHWM = peak resident set, VmRSS = current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


# ---- writing the checkpoint (parent process, little RAM) ----------------------------------------
def write_hf(out: Path, shard_bytes: int = 1 << 30) -> None:
    """A random bf16 Llama HF directory written one tensor (in 64 MiB chunks) at a time."""
    import ml_dtypes
    import numpy as np

    from jalign.config import ModelConfig
    from jalign.models import hf_io

    cfg = ModelConfig(**LLAMA_1B)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = []
    for path, m in hf_io._hf_layout(cfg).items():
        names = [m.hf_name.format(i=i) for i in range(cfg.layers)] if path.startswith("layers/") else [m.hf_name]
        entries += [(n, tuple(m.hf_shape), path) for n in names]
    shards, cur, size = [], [], 0
    for e in entries:
        n = math.prod(e[1]) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            hf_io._write_header(f, [(n, s, bf16) for n, s, _ in shard])
            for name, shape, path in shard:
                count = math.prod(shape)
                for start in range(0, count, 1 << 25):
                    n = min(1 << 25, count - start)
                    if path.endswith("norm"):
                        chunk = (1.0 + 0.1 * rng.standard_normal(n, np.float32)).astype(bf16)
                    else:
                        chunk = (0.02 * rng.standard_normal(n, np.float32)).astype(bf16)
                    f.write(chunk.tobytes())
                weight_map[name], total = fname, total + count * 2
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(hf_io.hf_config_dict(cfg, "bfloat16"), indent=1))
    tmp.rename(out)


def _files(hf_dir: Path) -> list[str]:
    return sorted(str(p) for p in hf_dir.glob("*.safetensors"))


def evict(files: list[str]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED: no root needed, nothing else
    affected), so the next read comes from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_seconds(files: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


# ---- the measured children (8 simulated devices each) -------------------------------------------
def child(mode: str, hf_dir: str, run_dir: str) -> None:
    import jax
    import jax.numpy as jnp

    from jalign.models import hf_io
    from jalign.models.transformer import declare_params
    from sharding import make_mesh
    from sharding.rules import DEFAULT_RULES

    cfg = hf_io.model_config_from_hf(hf_dir)
    mesh = make_mesh(data=1, fsdp=8)
    decls = declare_params(cfg)
    jax.block_until_ready(jnp.zeros(8))  # devices up before the baseline
    base_rss = _status("VmHWM")
    t, cpu = time.perf_counter(), _cpu_seconds()
    if mode == "numpy":  # the floor: every tensor read and converted to f32 once, no JAX, no sharding
        import numpy as np

        weights = hf_io.open_weights(hf_dir)
        n = 0
        for name, f in weights.items():
            n += np.asarray(f.array(name), np.float32).size
        print(json.dumps({"mode": mode, "seconds": time.perf_counter() - t, "cpu": _cpu_seconds() - cpu,
                          "peak": _status("VmHWM"), "baseline": base_rss, "f32_bytes": 4 * n, "params": n}))
        return
    if mode == "reader":  # hf_io.load_hf_params alone: the existing per-slice reader, no merge
        params = hf_io.load_hf_params(hf_dir, cfg, mesh=mesh, rules=DEFAULT_RULES, dtype=jnp.float32)
    elif mode == "old":
        import dataclasses

        from jalign.algorithms import base
        from jalign.config import Config, MeshConfig

        conf = Config(model=dataclasses.replace(cfg, hf_path=hf_dir), mesh=MeshConfig(data=1, fsdp=8))
        rt = base.Runtime(cfg=conf, mesh=mesh, rules=DEFAULT_RULES, run_dir=Path("/tmp"))
        params = base.initial_params(rt, decls, jax.random.key(0), log=lambda *_: None)
    elif mode == "convert":  # writes the run: source (bf16 params checkpoint) for later measurements
        import orbax.checkpoint as ocp

        from jalign.config import Config, dump_config
        from jalign.models.load import load_params, parse_source

        params = load_params(parse_source(hf_dir, where="--hf"), decls, mesh=mesh, rules=DEFAULT_RULES,
                             dtype=jnp.bfloat16, seed=0, log=lambda *_: None)
        tmp = Path(run_dir + ".tmp")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.absolute() / "params", params)
        dump_config(Config(model=cfg), tmp / "config.yaml")
        tmp.rename(run_dir)
    else:
        from jalign.models.load import load_params, parse_source

        source = parse_source(hf_dir if mode == "new" else f"run:{run_dir}", where="--source")
        params = load_params(source, decls, mesh=mesh, rules=DEFAULT_RULES, dtype=jnp.float32, seed=0,
                             log=lambda *_: None)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    leaves = jax.tree.leaves(params)
    f32 = sum(math.prod(x.shape) for x in leaves) * 4
    print(json.dumps({"mode": mode, "seconds": seconds, "cpu": _cpu_seconds() - cpu, "peak": _status("VmHWM"),
                      "baseline": base_rss,
                      "f32_bytes": f32, "params": sum(math.prod(x.shape) for x in leaves)}))


def measure(mode: str, hf_dir: Path, run_dir: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--hf", str(hf_dir), "--run", str(run_dir)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/jalign-bench-load")
    ap.add_argument("--skip-old", action="store_true", help="do not run the old path (it peaks at ~17 GiB)")
    ap.add_argument("--skip-run", action="store_true", help="do not measure the run: (orbax) source")
    ap.add_argument("--repeats", type=int, default=2, help="new-path loads, alternated with the others")
    ap.add_argument("--cold", action="store_true", help="evict the files from the page cache before each load "
                                                        "(default: loads read from the page cache)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.hf, a.run)
    cache = Path(a.cache)
    hf_dir, run_dir = cache / "llama-1.1b-hf", cache / "llama-1.1b-run"
    if not hf_dir.is_dir():
        t = time.perf_counter()
        write_hf(hf_dir)
        print(f"wrote {hf_dir} in {time.perf_counter() - t:.0f} s")
    if not a.skip_run and not run_dir.is_dir():
        measure("convert", hf_dir, run_dir)
        print(f"wrote {run_dir} (bf16 orbax params)")
    files = _files(hf_dir)
    disk = sum(os.path.getsize(f) for f in files)
    print(f"checkpoint: {len(files)} safetensors files, {disk / GiB:.2f} GiB (bf16); "
          f"load average {os.getloadavg()[0]:.1f}, {_available_gib():.1f} GiB available, {os.cpu_count()} cores")
    plan = []
    for i in range(a.repeats):
        plan.append("new")
        if i == 0 and not a.skip_old:
            plan.append("old")
        if i == 0 and not a.skip_run:
            plan.append("run")
    plan[:0] = ["numpy", "reader"]
    rows = []
    for mode in plan:
        if mode == "old" and _available_gib() < 20:
            print(f"old path skipped: only {_available_gib():.1f} GiB available (needs >= 20)")
            continue
        evict(files)
        cold = cat_seconds(files)  # from the disk
        warm = cat_seconds(files)  # from the page cache
        if a.cold:
            evict(files)
        load_avg = os.getloadavg()[0]
        r = measure(mode, hf_dir, run_dir)
        read = cold if a.cold else warm
        r.update(read=read, load_avg=load_avg)
        rows.append(r)
        print(f"{mode:>6}: {r['seconds']:5.1f} s wall, {r['cpu']:5.1f} s CPU (user+sys) = "
              f"{r['seconds'] / read:5.1f}x cat of the files from "
              f"{'disk' if a.cold else 'page cache'} (cat: {cold:4.1f} s cold, {warm:4.2f} s warm); peak RSS "
              f"{r['peak'] / GiB:5.2f} GiB = {r['peak'] / r['f32_bytes']:.2f}x the f32 params "
              f"({r['f32_bytes'] / GiB:.2f} GiB, {r['params'] / 1e9:.2f}B params); {r['baseline'] / GiB:.2f} GiB "
              f"before loading, so the load added {(r['peak'] - r['baseline']) / r['f32_bytes']:.2f}x; "
              f"load average {load_avg:.1f}", flush=True)
    new = [r for r in rows if r["mode"] == "new"]
    old = [r for r in rows if r["mode"] == "old"]
    if new and old:
        print(f"old / new: peak RSS {old[0]['peak'] / min(r['peak'] for r in new):.2f}x, "
              f"wall time {old[0]['seconds'] / min(r['seconds'] for r in new):.2f}x, "
              f"CPU time {old[0]['cpu'] / min(r['cpu'] for r in new):.2f}x")


if __name__ == "__main__":
    main()
