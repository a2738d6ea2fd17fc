"""The RL objectives side by side on the tiny addition task, from the same SFT model, alternated in one sitting.

    python benchmarks/rl_objectives.py --sft runs/sft_tiny --out runs/objectives [--seeds 0 1] [--steps 30]
        [--only ppo,grpo,...] [key=value ...]
    python benchmarks/rl_objectives.py --sft 'runs/seeds/d1_s{seed}/sft' ...   # each seed's own SFT run

Every run is ``jalign train configs/grpo_tiny.yaml`` (16 prompts x 8 samples per step, 2 epochs x 2 minibatches,
lr 5e-5, rule reward exact_match, kl_coef 0.04, the same held-out evaluation) with one objective swapped in by
config (``OBJECTIVES``), one subprocess per run, the objectives alternated within each seed so machine load
hits them alike. ``--sft`` with ``{seed}`` in it starts each seed from its own SFT run (e.g. the pipelines of
benchmarks/pipeline_seeds.py); the evaluation is the pipeline's size (``eval.prompts=512``). Prints (and writes ``OUT/table.md``) the held-out greedy / sampled exact match and KL to the
SFT policy (nats per sequence) before and after, the extra rollouts of dynamic sampling and the wall time of
each run (start-up and compiles included). Figures only; no asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> overrides of configs/grpo_tiny.yaml (shipped presets where one exists)
OBJECTIVES = {
    "PPO (GAE, critic from SFT)": ["algorithm.name=ppo", "algorithm.critic_lr=1e-4"],  # k1 KL in the reward
    "GRPO": ["algorithm.name=grpo"],
    "DAPO": ["algorithm.name=dapo"],
    "GSPO": ["algorithm.name=gspo"],
    "CISPO": ["algorithm.name=grpo", "algorithm.policy_loss=cispo", "algorithm.clip_eps_low=1.0",
              "algorithm.clip_eps_high=0.28"],
    "RLOO": ["algorithm.name=rloo"],
    "REINFORCE++": ["algorithm.name=reinforce_pp"],
}
KEYS = {"greedy": "eval/exact_match", "sampled": "eval/sampled_exact_match", "kl": "eval/kl"}


def run(label: str, overrides: list, out: Path, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "jalign", "train", str(ROOT / "configs/grpo_tiny.yaml"), *overrides,
           f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false"]
    t = time.time()
    with open(out / "stdout.log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    wall = time.time() - t
    if rc:
        log(f"{label}: failed (exit {rc}), see {out / 'stdout.log'}")
        return {"wall": wall, "failed": True}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if KEYS["greedy"] in r]
    extra = sum(r.get("dynamic_sampling/extra_rollouts", 0.0) for r in rows)
    res = {"wall": wall, "before": {k: evals[0].get(v) for k, v in KEYS.items()},
           "after": {k: evals[-1].get(v) for k, v in KEYS.items()}, "extra_rollouts": extra,
           "steps": evals[-1]["step"], "curve": [(r["step"], r[KEYS["greedy"]]) for r in evals]}
    log(f"{label}: greedy {res['before']['greedy']:.3f} -> {res['after']['greedy']:.3f}, sampled "
        f"{res['before']['sampled']:.3f} -> {res['after']['sampled']:.3f}, KL {res['after']['kl']:.3f}, "
        f"{wall:.0f} s")
    return res


def table(results: dict, seeds: list) -> str:
    def cell(vals, fmt="{:.3f}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        if len(vals) == 1:
            return fmt.format(vals[0])
        return fmt.format(sum(vals) / len(vals)) + " (" + ", ".join(fmt.format(v) for v in vals) + ")"

    lines = ["| objective | greedy exact match | sampled exact match | KL to SFT (nats/seq) | extra rollouts | "
             "wall time (s) |", "|---|---|---|---|---|---|"]
    for label, per_seed in results.items():
        ok = [r for r in per_seed if not r.get("failed")]
        if not ok:
            lines.append(f"| {label} | failed | | | | |")
            continue
        lines.append(f"| {label} | {cell([r['after']['greedy'] for r in ok])} | "
                     f"{cell([r['after']['sampled'] for r in ok])} | {cell([r['after']['kl'] for r in ok])} | "
                     f"{cell([r['extra_rollouts'] for r in ok], '{:.0f}')} | {cell([r['wall'] for r in ok], '{:.0f}')} |")
    befores = {}
    for rs in results.values():
        for i, r in enumerate(rs):
            if not r.get("failed"):
                befores.setdefault(i, r["before"])
    lines.append(f"| SFT (before) | {cell([b['greedy'] for b in befores.values()])} | "
                 f"{cell([b['sampled'] for b in befores.values()])} | 0 | | |")
    lines.append("")
    lines.append(f"seeds {seeds}; mean (per seed) where several")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", required=True, help="the SFT run every objective starts from (and its reference)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default="", help="comma-separated subset of the objective labels' first words")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    out = Path(a.out).absolute()
    chosen = {k: v for k, v in OBJECTIVES.items()
              if not a.only or k.split()[0].lower() in a.only.lower().split(",")}
    results = {k: [] for k in chosen}
    log = lambda s: print(s, flush=True)  # noqa: E731
    common = [f"train.steps={a.steps}", f"train.eval_every={a.steps}", f"train.checkpoint_every={a.steps}",
              "eval.prompts=512"]
    for seed in a.seeds:
        sft = Path(a.sft.format(seed=seed)).absolute()
        for label, ov in chosen.items():
            name = label.split()[0].lower().replace("+", "p")
            results[label].append(run(label, [f"model.init_from=run:{sft}", *common, *ov, f"train.seed={seed}", f"data.seed={seed}", *a.overrides],
                                      out / f"{name}_s{seed}", log))
    text = table(results, a.seeds)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
