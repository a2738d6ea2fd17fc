"""Rollout-engine workloads on the tiny-llama config (vocab 8192, hidden 256, mlp 688, 4 layers, 8/4 heads),
random weights, alternated against the static sampler ``jalign.generate`` and (when transformers is
installed) HF ``generate`` on the same requests and weights (EOS off everywhere: lengths are exact).

    python benchmarks/rollout.py [--requests 64 --slots 8,16 --rounds 2 --no-hf] [--small]

(b) variable: ``--requests`` requests, prompt lengths 16-128, per-request max_new_tokens drawn from
    8-512 (seeded), t=1 sampling. The engine with each of ``--slots`` slots, against the static sampler
    (and HF) run in consecutive batches of the same size (each batch decodes to its longest request; the
    surplus is dropped) and the static sampler on all requests at once. Useful tokens / wall second;
    target: engine >= 2x the static sampler.
(c) grouped: ``--prompts`` prompts x ``--samples`` samples (GRPO/RLOO-style), with and without prefix
    sharing, against the static sampler on the repeated prompts: tokens/s, prefill tokens, peak pages.
Also the engine's ms per decode step and slot occupancy. Every case runs once before the timed rounds
(compiles excluded). No asserts on time; the figures depend on the machine's load.
"""
from __future__ import annotations

import argparse

import numpy as np

from _peers import alternate, engine_line, hf_generate, hf_twin, machine_line, report, rng_prompts, tiny_llama
from jalign import generate as gen
from jalign import rollout
from jalign.rollout import Engine, Request


def variable(params, cfg, hf, a) -> None:
    r = np.random.default_rng(1)
    lo, hi = (16, 128) if not a.small else (8, 32)
    new_lo, new_hi = (8, 512) if not a.small else (4, 48)
    lengths = r.integers(lo, hi + 1, a.requests)
    max_new = r.integers(new_lo, new_hi + 1, a.requests)
    prompts = rng_prompts(a.requests, lengths, cfg.vocab_size, seed=2)
    useful = int(max_new.sum())
    reqs = [Request(prompt=p, max_new_tokens=int(m), temperature=1.0, key=0, stream=b)
            for b, (p, m) in enumerate(zip(prompts, max_new))]

    def batched(fn, size):
        def run():
            for s in range(0, len(prompts), size):
                fn(prompts[s:s + size], int(max_new[s:s + size].max()))
        return run

    for slots in [int(x) for x in a.slots.split(",")]:
        stats: dict = {}
        eng = Engine(params, cfg, slots=slots, page_size=16, sampler=a.sampler)

        def engine(eng=eng, stats=stats):
            eng.run(reqs)
            stats.update(eng.stats)

        static = lambda ps, n: gen.generate(params, cfg, ps, max_new_tokens=n, temperature=1.0, rng=0,  # noqa: E731
                                            prompt_bucket=128)
        cases = {f"engine, {slots} slots": engine,
                 f"static, batches of {slots}": batched(static, slots),
                 "static, all requests at once": batched(static, len(prompts))}
        if hf is not None:
            cases[f"HF generate, batches of {slots}"] = batched(lambda ps, n: hf_generate(hf, ps, n, sample=True),
                                                                slots)
        t = alternate(cases, a.rounds)
        report(f"(b) variable: {a.requests} requests, prompts {lo}-{hi}, max_new {new_lo}-{new_hi} "
               f"({useful} tokens), t=1 sampling, {slots} slots; seconds per round", t,
               {k: useful for k in cases}, f"static, batches of {slots}", {f"engine, {slots} slots": engine_line(stats)})


def grouped(params, cfg, hf, a) -> None:
    P, K = a.prompts, a.samples
    new = 128 if not a.small else 24
    lo, hi = (48, 128) if not a.small else (16, 40)
    prompts = rng_prompts(P, np.random.default_rng(3).integers(lo, hi + 1, P), cfg.vocab_size, seed=4)
    slots = a.group_slots
    stats = {True: {}, False: {}}

    def engine(share):
        def run():
            out = rollout.generate(params, cfg, prompts, num_samples=K, max_new_tokens=new, temperature=1.0, rng=0,
                                   slots=slots, prefix_sharing=share, sampler=a.sampler)
            stats[share].update(out["stats"])
        return run

    rep = [p for p in prompts for _ in range(K)]
    cases = {"engine, prefix sharing": engine(True), "engine, no sharing": engine(False),
             f"static, batches of {slots}": lambda: [gen.generate(params, cfg, rep[s:s + slots], max_new_tokens=new,
                                                                  temperature=1.0, rng=0, prompt_bucket=128)
                                                     for s in range(0, len(rep), slots)]}
    if hf is not None:
        cases[f"HF generate, batches of {slots}"] = lambda: [hf_generate(hf, rep[s:s + slots], new, sample=True)
                                                             for s in range(0, len(rep), slots)]
    t = alternate(cases, a.rounds)
    line = lambda s: f"{engine_line(s)}, peak pages {s['pages_peak']}"  # noqa: E731
    report(f"(c) grouped: {P} prompts x {K} samples, prompts {lo}-{hi} tokens, {new} new tokens, {slots} slots",
           t, {k: P * K * new for k in cases}, "engine, no sharing",
           {"engine, prefix sharing": line(stats[True]), "engine, no sharing": line(stats[False])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", default="8,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--group-slots", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--small", action="store_true", help="short prompts and responses (a quick check)")
    ap.add_argument("--only", choices=["variable", "grouped"])
    ap.add_argument("--sampler", default="inverse_cdf", choices=["gumbel", "inverse_cdf"],
                    help="the engine's sampler (default inverse_cdf; gumbel: the static sampler's own draws)")
    a = ap.parse_args()
    params, cfg = tiny_llama(a.dtype)
    hf = None if a.no_hf else hf_twin(params, cfg)
    print(f"{machine_line()}; tiny-llama {a.dtype}; engine sampler {a.sampler}; "
          f"HF peer: {'yes' if hf is not None else ('off' if a.no_hf else 'no (transformers missing)')}")
    if a.only in (None, "variable"):
        variable(params, cfg, hf, a)
    if a.only in (None, "grouped"):
        grouped(params, cfg, hf, a)
    print(f"\n{machine_line()} (at the end)")


if __name__ == "__main__":
    main()
