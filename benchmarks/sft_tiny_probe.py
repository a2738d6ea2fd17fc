"""Where the tiny SFT run is on its way to the sloppy-demonstration optimum, per checkpoint.

    python benchmarks/sft_tiny_probe.py --out /tmp/probe [--devices 8] [--noisy] [key=value ...]

Runs ``configs/sft_tiny.yaml`` (with the overrides) in a subprocess-free way, keeping a checkpoint every
``train.eval_every`` steps, then scores each checkpoint on the whole held-out ``eval`` split: greedy exact
match on prompts with and without a carry, how often the greedy answer is the dropped-carry one, and the
teacher-forced probabilities of the right and the dropped-carry answers on carry prompts. Prints one
line per checkpoint and writes ``OUT/probe.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--noisy", action="store_true", help="tests/conftest.py's opt-level-0 XLA flags")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "sft_tiny.yaml"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    flags = [f"--xla_force_host_platform_device_count={a.devices}"]
    if a.noisy:
        flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jalign.checkpoint import load_params
    from jalign.config import load_config
    from jalign.data import tiny
    from jalign.data.chat import encode_prompt
    from jalign.data.tokenizer import load_tokenizer
    from jalign.generate import generate
    from jalign.models import transformer as tfm
    from jalign.trainer import train

    out = Path(a.out)
    cfg = load_config(a.config, [f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false",
                                 "train.keep_checkpoints=100", *a.overrides])
    cfg.train.checkpoint_every = cfg.train.eval_every
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    tok = load_tokenizer(cfg.model.tokenizer)
    pairs = tiny._pairs("eval", None, 0)
    prompts = [encode_prompt(tiny.prompt_for(x, y), cfg.data.chat_template, tok) for x, y in pairs]
    carry = np.array([tiny.has_carry(x, y) for x, y in pairs])

    @jax.jit
    def log_probs(params, toks, pos, seg):
        h = tfm.forward(params, toks, pos, seg, cfg.model)
        return jax.nn.log_softmax(tfm.lm_logits(params, h, cfg.model), -1)

    def answer_logp(params, answers):
        rows = [p + tok.encode(s, add_special=False) + [tok.eos_id] for p, s in zip(prompts, answers)]
        T = max(map(len, rows))
        toks = np.zeros((len(rows), T), np.int32)
        mask = np.zeros((len(rows), T), np.float32)
        for i, (r, p) in enumerate(zip(rows, prompts)):
            toks[i, :len(r)] = r
            mask[i, len(p) - 1:len(r) - 1] = 1  # predictions of the answer and eos
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), toks.shape)
        logp = log_probs(params, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(toks > 0, jnp.int32))
        tgt = np.concatenate([toks[:, 1:], np.zeros((len(rows), 1), np.int32)], 1)
        lp = np.take_along_axis(np.asarray(logp), tgt[..., None], -1)[..., 0]
        return (lp * mask).sum(1)

    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ev = {m["step"]: m for m in metrics if "eval/loss" in m}
    rows = []
    ckdir = out / "checkpoints"
    for step in sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()):
        params = load_params(out, step)
        g = generate(params, cfg.model, prompts, max_new_tokens=6, greedy=True, eos_ids=(tok.eos_id,),
                     pad_id=tok.pad_id, rng=jax.random.key(0))
        texts = [tok.decode([int(t) for t in r[:n]]).strip() for r, n in zip(np.asarray(g["tokens"]),
                                                                                np.asarray(g["lengths"]))]
        right = np.array([t == str(x + y) for t, (x, y) in zip(texts, pairs)])
        dropped = np.array([t == tiny._dropped_carry(x, y) for t, (x, y) in zip(texts, pairs)])
        p_right = np.exp(answer_logp(params, [str(x + y) for x, y in pairs]))
        p_drop = np.exp(answer_logp(params, [tiny._dropped_carry(x, y) for x, y in pairs]))
        r = {"step": step, "eval_loss": ev.get(step, {}).get("eval/loss"), "em": right.mean(),
             "em_nocarry": right[~carry].mean(), "em_carry": right[carry].mean(),
             "greedy_dropped_carry": dropped[carry].mean(), "p_right_nocarry": p_right[~carry].mean(),
             "p_right_carry": p_right[carry].mean(), "p_dropped_carry": p_drop[carry].mean()}
        rows.append(r)
        print(" ".join(f"{k}={v}" if v is None or k == "step" else f"{k}={float(v):.3f}" for k, v in r.items()), flush=True)
    print(f"train wall {wall:.0f}s", flush=True)
    (out / "probe.json").write_text(json.dumps({"overrides": a.overrides, "devices": a.devices, "noisy": a.noisy,
                                                "wall": wall, "rows": rows}, default=float, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
