"""LoRA against full fine-tuning on the tiny task: the pipeline's DPO and GRPO stages, same data, steps and
evaluation, from each seed's finished tiny pipeline:

    python benchmarks/lora_quality.py --pipelines 'runs/seeds/d1_s{seed}' --seeds 0,1,2 --out runs/lora_quality
        [--rank 16 --alpha 32 --lr-scale 10]

Per seed S (``jalign pipeline --seed S --out DIR``, e.g. the runs of benchmarks/pipeline_seeds.py, gives the SFT
policy), ``configs/dpo_tiny.yaml`` and ``configs/grpo_tiny.yaml`` are each run twice from that SFT run, one
``jalign train`` subprocess each (1 CPU device unless XLA_FLAGS says otherwise), ``train.seed``/``data.seed`` = S:
full fine-tuning as shipped, and LoRA (``model.lora`` rank/alpha on all linear layers, the learning rate times
``--lr-scale``: adapters start at zero and usually want a larger step; the reference is then the base with the
adapters off). The two variants alternate (full first on even seeds, LoRA first on odd ones) so machine load
hits them alike. Each run exports a Hugging Face directory (``train.export_hf``: a LoRA run's merged weights),
and every policy is scored by the pipeline's own held-out evaluation (``jalign.pipeline.evaluate_policies``:
512 prompts, greedy and sampled exact match, KL to SFT). Printed and written to OUT/lora_quality.md / .json:
those figures, trainable parameters and wall time per run (start-up and compiles included). Figures only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demos import CONFIGS, finished, jalign, spread  # noqa: E402  (the same subprocess runner as the demonstrations)

STAGES = {"DPO": "dpo_tiny.yaml", "GRPO": "grpo_tiny.yaml"}
QUIET = ["train.progress=false", "train.tensorboard=false"]


def lora_overrides(rank: int, alpha: float, lr: float) -> list:
    return [f"model.lora.rank={rank}", f"model.lora.alpha={alpha}", "model.lora.targets=all-linear", f"optim.lr={lr}"]


def one_run(config: str, overrides: list, run: Path, log) -> dict:
    wall = None
    if not finished(run, config, overrides):
        log(f"  jalign train {config} {' '.join(o for o in overrides if o.startswith(('model.lora.rank', 'optim.lr')))}")
        wall = jalign(["train", CONFIGS / config, *overrides], run.parent / f"{run.name}.log")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    trainable = next((r["model/trainable_params"] for r in rows if "model/trainable_params" in r), None)
    return {"wall": wall, "trainable": trainable}


def run_seed(pipe: Path, seed: int, out: Path, rank: int, alpha: float, lr_scale: float, log=print) -> dict:
    from jalign.config import load_config
    from jalign.pipeline import evaluate_policies

    base = [f"model.init_from=run:{pipe / 'sft'}", f"train.seed={seed}", f"data.seed={seed}", *QUIET]
    fig, policies = {}, {"SFT": pipe / "sft"}
    for stage, config in STAGES.items():
        lr = load_config(CONFIGS / config).optim.lr
        variants = {"full": [], f"LoRA r{rank}": lora_overrides(rank, alpha, lr * lr_scale)}
        order = list(variants) if seed % 2 == 0 else list(variants)[::-1]
        for v in order:
            run = out / f"{stage.lower()}_{v.split()[0].lower()}"
            res = one_run(config, [*base, *variants[v], f"train.out_dir={run}", f"train.export_hf={run / 'hf'}"], run,
                          log)
            label = f"{stage} {v}"
            fig[label] = res
            policies[label] = f"hf:{run / 'hf'}"
    log("  evaluating on the pipeline's held-out prompts ...")
    ev = evaluate_policies(pipe, policies, CONFIGS, fast=False, log=lambda *_: None, seed=seed)
    for label in policies:
        fig.setdefault(label, {}).update({k: ev[label][k] for k in ("exact_match", "sampled_exact_match", "kl")})
    return fig


def table(figs: dict) -> str:
    seeds = sorted(figs)
    labels = list(figs[seeds[0]])
    md = [f"Seeds {', '.join(map(str, seeds))}: mean [min, max].", "",
          "| policy | greedy exact match | per seed | sampled exact match | KL to SFT (nats/seq) | trainable params "
          "| wall (s) |", "|---|---|---|---|---|---|---|"]
    for p in labels:
        g = lambda k: [figs[s][p].get(k) for s in seeds]  # noqa: E731
        em = g("exact_match")
        tr = g("trainable")
        md.append(f"| {p} | {spread(em)} | {' / '.join(f'{x:.3f}' for x in em)} | {spread(g('sampled_exact_match'))} | "
                  f"{spread(g('kl'))} | {f'{tr[0]:,.0f}' if tr[0] else ''} | {spread(g('wall'), '{:.0f}')} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", required=True, help="pipeline directory per seed, with {seed} in it")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr-scale", type=float, default=10.0, help="LoRA learning rate = the config's lr x this")
    a = ap.parse_args(argv)
    out = Path(a.out).absolute()
    figs = {}
    for s in [int(x) for x in a.seeds.split(",") if x.strip()]:
        pipe = Path(a.pipelines.format(seed=s)).absolute()
        if not (pipe / "sft" / "checkpoints").is_dir():
            print(f"lora_quality: {pipe} has no finished SFT run; run `jalign pipeline --seed {s} --out {pipe}` first")
            return 2
        done = out / f"s{s}" / "figures.json"
        if done.is_file():
            figs[s] = json.loads(done.read_text())
            continue
        print(f"seed {s} (pipeline {pipe}):", flush=True)
        figs[s] = run_seed(pipe, s, out / f"s{s}", a.rank, a.alpha, a.lr_scale, log=lambda m: print(m, flush=True))
        done.write_text(json.dumps(figs[s], indent=1))
    md = table(figs)
    (out / "lora_quality.md").write_text(md)
    (out / "lora_quality.json").write_text(json.dumps({str(k): v for k, v in figs.items()}, indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
