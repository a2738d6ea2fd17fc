"""The demonstrations of KTO, reference-free preference losses, SteerLM and knowledge distillation on the
tiny task, from finished tiny pipelines (one per seed), with the spread over seeds:

    python benchmarks/demos.py --pipelines 'runs/seeds/d1_s{seed}' --seeds 0,1,2 --out runs/demos

Each seed's pipeline (``jalign pipeline --seed S --out DIR``, e.g. the runs of benchmarks/pipeline_seeds.py)
gives the SFT policy, the reward model and the DPO policy; this script then runs, each as ``jalign train``
in its own subprocess (1 CPU device unless XLA_FLAGS says otherwise) with ``train.seed``/``data.seed`` = S:

- ``kto``: configs/kto_tiny.yaml from the SFT run (the feedback split's pairs as unpaired labels);
- ``simpo`` / ``orpo``: configs/dpo_tiny.yaml with ``algorithm.loss`` simpo (beta 2, gamma 1, + NLL) and orpo
  (lambda 0.1, its own NLL term): reference-free, no reference model is built;
- ``steerlm``: the attribute regression RM on labelled data (correctness, verbosity), ``jalign annotate``
  of the sloppy SFT data with it, then configs/steerlm_tiny.yaml, evaluated with chosen attribute values;
- ``kd``: configs/distill_tiny.yaml, a 2-layer student (half the teacher's depth) from scratch taught by the
  seed's 4-layer DPO policy (top-8 forward KL + NLL, 400 steps), and ``kd_baseline``: the same student, data
  and steps with ``kd_weight=0`` (plain SFT on the sloppy demonstrations).

KTO, SimPO and ORPO are scored by the pipeline's own held-out evaluation (``jalign.pipeline.evaluate_policies``:
the same 512 held-out prompts as the pipeline table, greedy and sampled, RM reward, KL to SFT) next to the
seed's SFT and DPO. SteerLM and the KD students are scored by their runs' final evaluation on the same
held-out prompts (``eval.prompts=512``): SteerLM's final-answer correctness and response length per attribute
setting; the students' exact match and their KL to the teacher. A finished run (its ``metrics.jsonl`` has
the last step) is not rerun. Writes OUT/demos.md and OUT/demos.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
QUIET = ["train.progress=false", "train.tensorboard=false", "eval.prompts=512"]
STEER_SETTINGS = ("correctness=4,verbosity=0", "correctness=0,verbosity=0", "correctness=4,verbosity=4")


def jalign(args: list, log_file: Path) -> float:
    """``python -m jalign ARGS`` in a subprocess (output in LOG_FILE); its wall time. Fails loudly."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "jalign", *map(str, args)], env=env, cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"`jalign {' '.join(map(str, args))}` failed (exit {proc.returncode}); see {log_file}")
    return time.time() - t0


def last_row(run: Path) -> dict:
    """The last metrics row that has evaluation keys, merged with the last training row's step."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return evals[-1] if evals else {}


def finished(run: Path, steps: int) -> bool:
    p = run / "metrics.jsonl"
    return p.is_file() and any(json.loads(x).get("step") == steps for x in p.read_text().splitlines() if x.strip())


def train(name: str, config: str, overrides: list, out: Path, times: dict, log=print) -> Path:
    from jalign.config import load_config

    run = out / name
    steps = load_config(CONFIGS / config, overrides).train.steps
    if not finished(run, steps):
        log(f"  {name}: jalign train {config} ...")
        times[name] = round(jalign(["train", CONFIGS / config, f"train.out_dir={run}", *QUIET, *overrides],
                                   out / f"{name}.log"))
    return run


def run_seed(pipe: Path, seed: int, out: Path, log=print) -> dict:
    """Every demonstration for one seed's pipeline; returns its figures."""
    from jalign.pipeline import evaluate_policies

    seeds = [f"train.seed={seed}", f"data.seed={seed}"]
    sft = [f"model.init_from=run:{pipe / 'sft'}", *seeds]
    times: dict = {}
    kto = train("kto", "kto_tiny.yaml", sft, out, times, log)
    simpo = train("simpo", "dpo_tiny.yaml", [*sft, "algorithm.loss=simpo", "algorithm.beta=2.0",
                                             "algorithm.gamma=1.0"], out, times, log)
    orpo = train("orpo", "dpo_tiny.yaml", [*sft, "algorithm.loss=orpo", "algorithm.beta=0.1",
                                           "algorithm.sft_weight=0"], out, times, log)
    # SteerLM: regression RM -> annotate -> attribute-conditioned SFT
    rm = train("steer_rm", "rm_tiny.yaml", [*sft, "algorithm.loss=regression", "algorithm.num_attributes=2",
                                            "data.train=builtin:addition_steer_rm:feedback",
                                            "data.eval=builtin:addition_steer_rm:eval", "data.seq_len=48",
                                            "train.steps=300"], out, times, log)
    annotated = out / "steer_sft.jsonl"
    if not annotated.is_file():
        log("  annotate ...")
        times["annotate"] = round(jalign(["annotate", "--model", rm, "--input", "builtin:addition_steer_sloppy:train",
                                          "--output", annotated], out / "annotate.log"))
    steer = train("steerlm", "steerlm_tiny.yaml", [*sft, f"data.train={annotated}"], out, times, log)
    teacher = [f"roles.teacher=run:{pipe / 'dpo'}", *seeds]
    kd = train("kd", "distill_tiny.yaml", teacher, out, times, log)
    kd_base = train("kd_baseline", "distill_tiny.yaml", [*teacher, "algorithm.kd_weight=0"], out, times, log)

    log("  evaluating SFT, DPO, KTO, SimPO, ORPO on the pipeline's held-out prompts ...")
    policies = {"SFT": pipe / "sft", "DPO": pipe / "dpo", "KTO": kto, "SimPO (+NLL)": simpo, "ORPO": orpo}
    res = evaluate_policies(pipe, policies, CONFIGS, fast=False, log=lambda *_: None, seed=seed)
    fig = {p: {k: res[p][k] for k in ("exact_match", "sampled_exact_match", "greedy_reward", "kl")} for p in policies}
    s = last_row(steer)
    fig["steerlm"] = {}
    for setting in STEER_SETTINGS:
        prefix = "steer_" + setting.replace("=", "").replace(",", "_") + "/"  # steerlm.setting_name
        keys = {k: v for k, v in s.items() if prefix in k}
        fig["steerlm"][setting] = {"correct": _pick(keys, "greedy_reward"),
                                   "length": _pick(keys, "greedy_response_length")}
    for name, run in (("kd", kd), ("kd_baseline", kd_base)):
        r = last_row(run)
        fig[name] = {"exact_match": r.get("eval/exact_match"), "kl_to_teacher": r.get("eval/kd_loss")}
    fig["_times"] = times
    return fig


def _pick(keys: dict, suffix: str):
    hits = [v for k, v in keys.items() if k.endswith("/" + suffix)]
    if len(hits) != 1:
        raise KeyError(f"expected one metric ending in /{suffix} among {sorted(keys)}")
    return hits[0]


def spread(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def table(figs: dict) -> str:
    seeds = sorted(figs)
    g = lambda *path: [_get(figs[s], path) for s in seeds]  # noqa: E731
    md = [f"Seeds {', '.join(map(str, seeds))}: mean [min, max].", "",
          "| policy | greedy exact match | per seed | sampled exact match | greedy RM reward | KL to SFT |",
          "|---|---|---|---|---|---|"]
    for p in ("SFT", "DPO", "KTO", "SimPO (+NLL)", "ORPO"):
        em = g(p, "exact_match")
        md.append(f"| {p} | {spread(em)} | {' / '.join(f'{x:.3f}' for x in em)} | {spread(g(p, 'sampled_exact_match'))}"
                  f" | {spread(g(p, 'greedy_reward'))} | {spread(g(p, 'kl'))} |")
    gains = {p: min(a - b for a, b in zip(g(p, "exact_match"), g("SFT", "exact_match"))) for p in ("KTO", "SimPO (+NLL)", "ORPO")}
    md += ["", "Worst-seed gain over SFT: " + ", ".join(f"{p} {v:+.3f}" for p, v in gains.items()), "",
           "| SteerLM, asked for | final answer right (greedy) | response length (tokens) |", "|---|---|---|"]
    for setting in STEER_SETTINGS:
        md.append(f"| `{setting}` | {spread(g('steerlm', setting, 'correct'))} | {spread(g('steerlm', setting, 'length'))} |")
    md += ["", "| 2-layer student | greedy exact match | KL to the teacher (top-8) |", "|---|---|---|",
           f"| KD from the DPO policy | {spread(g('kd', 'exact_match'))} | {spread(g('kd', 'kl_to_teacher'))} |",
           f"| SFT on the same data (kd_weight=0) | {spread(g('kd_baseline', 'exact_match'))} | "
           f"{spread(g('kd_baseline', 'kl_to_teacher'))} |",
           f"| the teacher (4-layer DPO policy, pipeline evaluation) | {spread(g('DPO', 'exact_match'))} | 0 |"]
    return "\n".join(md) + "\n"


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", required=True, help="pipeline directory per seed, with {seed} in it")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = Path(a.out)
    figs = {}
    for s in seeds:
        pipe = Path(a.pipelines.format(seed=s))
        if not (pipe / "results.json").is_file():
            print(f"demos: {pipe} is not a finished pipeline (no results.json); run `jalign pipeline --seed {s} "
                  f"--out {pipe}` first")
            return 2
        done = out / f"s{s}" / "figures.json"
        if done.is_file():
            figs[s] = json.loads(done.read_text())
            continue
        print(f"seed {s} (pipeline {pipe}):")
        t0 = time.time()
        figs[s] = run_seed(pipe, s, out / f"s{s}")
        figs[s]["_times"]["total"] = round(time.time() - t0)
        done.write_text(json.dumps(figs[s], indent=1))
    md = table(figs)
    (out / "demos.md").write_text(md)
    (out / "demos.json").write_text(json.dumps({str(k): v for k, v in figs.items()}, indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
