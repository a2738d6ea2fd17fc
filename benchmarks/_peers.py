"""Shared pieces of the generation benchmarks: the tiny-llama model, its HF twin, timing, printing."""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Optional

import jax
import numpy as np

from jalign.config import ModelConfig
from jalign.models.params import init_params
from jalign.models.transformer import declare_params


def tiny_llama(dtype: str = "float32") -> tuple[dict, ModelConfig]:
    cfg = ModelConfig(vocab_size=8192, hidden=256, mlp=688, layers=4, heads=8, kv_heads=4, dtype=dtype,
                      max_seq_len=4096)
    return init_params(declare_params(cfg), jax.random.key(0)), cfg


def hf_twin(params, cfg):
    """The same weights as a transformers LlamaForCausalLM (via save_hf), or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from jalign.models.hf_io import save_hf

    d = f"{tempfile.mkdtemp(prefix='jalign_bench_hf_')}/model"
    save_hf(params, cfg, d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model


def hf_generate(model, prompts: list, new: int, *, sample: bool, seed: int = 0):
    """HF generate on left-padded prompts, exactly ``new`` tokens (EOS off), t=1 without top-k/top-p
    when sampling (HF's default top_k=50 would not be like for like). Returns generated ids [B, new]."""
    import torch

    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=0, eos_token_id=None, **kw)
    return out[:, T:]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    if isinstance(out, dict):
        jax.block_until_ready([v for v in out.values() if isinstance(v, jax.Array)])
    return time.perf_counter() - t, out


def alternate(cases: dict, rounds: int, warmup: bool = True) -> dict:
    """Run every case once to compile / warm up, then ``rounds`` times alternated; {name: [seconds]}."""
    times = {k: [] for k in cases}
    if warmup:
        for fn in cases.values():
            fn()
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn)[0])
    return times


def fmt(ts: list[float]) -> str:
    return " / ".join(f"{t:.2f}" for t in ts)


def report(title: str, times: dict, tokens: dict, peer: Optional[str], extra: Optional[dict] = None) -> None:
    """One line per case: seconds per round, tokens/s (median round), ratio to ``peer``."""
    print(f"\n{title}")
    rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        ratio = f"  x{rate[k] / rate[peer]:.2f} vs {peer}" if peer in rate and k != peer else ""
        more = f"  {extra[k]}" if extra and k in extra else ""
        print(f"  {k:34s} {fmt(v):>22s} s   {rate[k]:8.0f} tokens/s{ratio}{more}")


def engine_line(stats: dict) -> str:
    return (f"{stats['ms_per_step']:.2f} ms/decode step, occupancy {stats['slot_occupancy']:.2f}, "
            f"{stats['decode_steps']} steps in {stats['decode_calls']} calls, prefill {stats['prefill_tokens']} tokens")


def machine_line() -> str:
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"device={jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, load average {load:.1f}"


def rng_prompts(n: int, lengths, vocab: int, seed: int = 0) -> list:
    r = np.random.default_rng(seed)
    lengths = [lengths] * n if np.isscalar(lengths) else list(lengths)
    return [r.integers(3, vocab, int(k)).tolist() for k in lengths]
