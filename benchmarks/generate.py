"""Generation throughput on the tiny-llama config (vocab 8192, hidden 256, mlp 688, 4 layers, 8/4 heads),
random weights: the static sampler ``jalign.generate``, the rollout engine ``jalign.rollout`` and, when
transformers is installed, HF ``generate`` (torch, the same weights via ``save_hf``), alternated.

    python benchmarks/generate.py [--batch 8 --prompt 64 --new 192 --rounds 2 --scaling 8,32,64 --no-hf]

(a) fixed: batch 8, prompt 64, exactly ``new`` tokens (EOS off), greedy and t=1 sampling (no top-k /
    top-p: like for like with HF), tokens/s and the ratio to HF (target >= 1.5x); the engine samples
    with its default ``sampler="inverse_cdf"`` and also with "gumbel" (the static sampler's draws);
(d) batch scaling: tokens/s at each of ``--scaling`` concurrent sequences (greedy, ``--scaling-new`` tokens).
Also the static sampler's ms per decode step ((T(new) - T(1)) / (new - 1), same executable) and the
engine's own (its decode time / steps), and the engine's slot occupancy. Compiles are excluded (every
case runs once before the timed rounds). No asserts on time; the figures depend on the machine's load.
"""
from __future__ import annotations

import argparse
import statistics

import jax

from _peers import alternate, engine_line, hf_generate, hf_twin, machine_line, report, rng_prompts, tiny_llama
from jalign import generate as gen
from jalign import rollout


def static_step_ms(params, cfg, prompts, new, bucket) -> float:
    run = lambda n: gen.generate(params, cfg, prompts, max_new_tokens=n, greedy=True, new_bucket=bucket)  # noqa
    run(new), run(1)
    t = alternate({"n": lambda: run(new), "1": lambda: run(1)}, 3, warmup=False)
    return (statistics.median(t["n"]) - statistics.median(t["1"])) / (new - 1) * 1e3


def cases(params, cfg, hf, prompts, new, sample: bool, slots: int, stats: dict) -> dict:
    bucket = 1 << (new - 1).bit_length()
    kw = dict(max_new_tokens=new, greedy=not sample, temperature=1.0, rng=0)

    def engine(sampler="inverse_cdf"):
        def run():
            out = rollout.generate(params, cfg, prompts, slots=slots, sampler=sampler, **kw)
            stats.setdefault(sampler, {}).update(out["stats"])
            return out
        return run

    c = {"jalign generate (static)": lambda: gen.generate(params, cfg, prompts, new_bucket=bucket, **kw),
         "jalign rollout engine": engine()}
    if sample:  # generate's own draws (a Gumbel noise per vocabulary entry): like for like with the static sampler
        c["jalign rollout engine, gumbel"] = engine("gumbel")
    if hf is not None:
        c["HF transformers generate"] = lambda: hf_generate(hf, prompts, new, sample=sample)
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scaling", default="8,32,64", help="comma-separated batch sizes for (d); '' to skip")
    ap.add_argument("--scaling-new", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    params, cfg = tiny_llama(a.dtype)
    hf = None if a.no_hf else hf_twin(params, cfg)
    peer = "HF transformers generate" if hf is not None else "jalign generate (static)"
    print(f"{machine_line()}; tiny-llama {a.dtype}; HF peer: {'yes' if hf is not None else ('off' if a.no_hf else 'no (transformers missing)')}")
    prompts = rng_prompts(a.batch, a.prompt, cfg.vocab_size)
    tokens = a.batch * a.new
    print(f"static sampler decode step (greedy, batch {a.batch}): "
          f"{static_step_ms(params, cfg, prompts, a.new, 1 << (a.new - 1).bit_length()):.2f} ms")
    for sample in (False, True):
        stats: dict = {}
        c = cases(params, cfg, hf, prompts, a.new, sample, a.batch, stats)
        t = alternate(c, a.rounds)
        lines = {"jalign rollout engine": engine_line(stats["inverse_cdf"])}
        if sample:
            lines["jalign rollout engine, gumbel"] = engine_line(stats["gumbel"])
        report(f"(a) fixed: batch {a.batch}, prompt {a.prompt}, {a.new} new tokens (EOS off), "
               f"{'t=1 sampling' if sample else 'greedy'}; seconds per round", t, {k: tokens for k in c}, peer, lines)
    for B in [int(x) for x in a.scaling.split(",") if x]:
        stats = {}
        prompts = rng_prompts(B, a.prompt, cfg.vocab_size, seed=B)
        c = cases(params, cfg, hf, prompts, a.scaling_new, False, B, stats)
        t = alternate(c, a.rounds)
        report(f"(d) batch scaling: {B} concurrent sequences, prompt {a.prompt}, {a.scaling_new} new tokens, greedy",
               t, {k: B * a.scaling_new for k in c}, peer, {"jalign rollout engine": engine_line(stats["inverse_cdf"])})
    print(f"\n{machine_line()} (at the end)")


if __name__ == "__main__":
    main()
