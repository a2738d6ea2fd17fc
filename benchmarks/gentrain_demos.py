"""The generate-then-train algorithms on the tiny task against their baselines, from each seed's finished tiny
pipeline, scored by the pipeline's own held-out evaluation:

    python benchmarks/gentrain_demos.py --pipelines 'runs/seeds/d1_s{seed}' --seeds 0,1,2 --out runs/gentrain

Per seed S (``jalign pipeline --seed S --out DIR``: its SFT policy, reward model and DPO policy), one
``jalign train`` subprocess per run (1 CPU device unless XLA_FLAGS says otherwise), ``train.seed``/``data.seed``
= S, each from the seed's SFT run:

- rejection sampling (``configs/rs_tiny.yaml``, best of 8 by the rule reward, exact match) against the same run
  with ``select: random`` (SFT on unfiltered samples: the same generation and training compute);
- online DPO (``configs/online_dpo_tiny.yaml``, pairs of on-policy samples ranked by the rule) against the
  pipeline's offline DPO (the same preference data's prompts, labelled pairs); the configs' comments give the
  seed-0 figures of both ranked by the reward model instead, which exploit it;
- SPIN (``configs/spin_tiny.yaml``, gold answers against the previous iterate's generations, + the NLL of the
  gold answers) against plain SFT continued on the same gold data, steps, batch and learning rate
  (``configs/sft_tiny.yaml`` with overrides);
- on-policy distillation (``configs/opd_tiny.yaml``, reverse KL to the seed's DPO policy as the teacher, on the
  student's own samples), whose baseline is the student before (SFT) and whose ceiling is the teacher (DPO);
- Constitutional AI: the tiny critic/judge (``configs/cai_critic_tiny.yaml``, SFT on generated critiques,
  revisions and judgements), the supervised stage (``configs/cai_sl_tiny.yaml``: the policy answers red-team
  carry prompts, the critic critiques and revises, SFT on the revisions) against the policy before (SFT), and
  RL from AI feedback (``configs/cai_rlaif_tiny.yaml``: pairs judged by the critic, DPO) against the SL stage.

Every policy is scored by ``jalign.pipeline.evaluate_policies`` (512 held-out prompts, greedy and sampled exact
match, reward-model score, KL to SFT). A run that stops because its filter kept nothing for several steps
(``jalign.errors.NothingToTrain``, exit 2) is a result: recorded as stopped with its message, not evaluated.
A finished run is not rerun. Writes OUT/gentrain.md and OUT/gentrain.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demos import CONFIGS, finished, jalign, spread  # noqa: E402  (the same subprocess runner as the demonstrations)

QUIET = ["train.progress=false", "train.tensorboard=false"]
# SFT continued on SPIN's data with SPIN's optimisation (the baseline SPIN must beat)
SFT_ON_GOLD = ["data.train=builtin:addition:feedback", "data.eval=builtin:addition:eval", "data.seq_len=16",
               "data.packing=false", "train.steps=60", "train.global_batch=32", "train.eval_every=60",
               "train.checkpoint_every=60", "optim.lr=1e-4", "optim.warmup_steps=10", "optim.weight_decay=0.0"]
ROWS = ("SFT", "RS (best of 8, rule)", "RS baseline (random of 8)", "online DPO (rule-ranked pairs)",
        "DPO (offline, pipeline)", "SPIN", "SFT on SPIN's gold data", "on-policy distillation (teacher DPO)",
        "CAI supervised (critique + revision)", "CAI RLAIF (judge-labelled DPO, from CAI SL)")
PAIRS = (("RS (best of 8, rule)", "RS baseline (random of 8)"), ("online DPO (rule-ranked pairs)", "DPO (offline, pipeline)"),
         ("SPIN", "SFT on SPIN's gold data"), ("on-policy distillation (teacher DPO)", "SFT"),
         ("CAI supervised (critique + revision)", "SFT"),
         ("CAI RLAIF (judge-labelled DPO, from CAI SL)", "CAI supervised (critique + revision)"))  # (algorithm, baseline)


def runs_for(pipe: Path, out: Path) -> dict:
    """label -> (config, run directory, overrides) of the runs this script trains, in order (the rest come from
    the pipeline). Labels starting with ``_`` are helper runs that are not evaluated (the CAI critic)."""
    dpo = f"roles.teacher=run:{pipe / 'dpo'}"
    critic, cai_sl = out / "cai_critic", out / "cai_sl"
    return {"RS (best of 8, rule)": ("rs_tiny.yaml", out / "rs", []),
            "RS baseline (random of 8)": ("rs_tiny.yaml", out / "rs_random", ["algorithm.select=random"]),
            "online DPO (rule-ranked pairs)": ("online_dpo_tiny.yaml", out / "online_dpo", []),
            "SPIN": ("spin_tiny.yaml", out / "spin", []),
            "SFT on SPIN's gold data": ("sft_tiny.yaml", out / "sft_gold", SFT_ON_GOLD),
            "on-policy distillation (teacher DPO)": ("opd_tiny.yaml", out / "opd", [dpo]),
            "_critic": ("cai_critic_tiny.yaml", critic, []),
            "CAI supervised (critique + revision)": ("cai_sl_tiny.yaml", cai_sl, [f"roles.critic=run:{critic}"]),
            "CAI RLAIF (judge-labelled DPO, from CAI SL)": (
                "cai_rlaif_tiny.yaml", out / "cai_rlaif", [f"model.init_from=run:{cai_sl}", f"roles.judge=run:{critic}"])}


def run_seed(pipe: Path, seed: int, out: Path, log=print) -> dict:
    from jalign.pipeline import evaluate_policies

    base = [f"model.init_from=run:{pipe / 'sft'}", f"train.seed={seed}", f"data.seed={seed}", *QUIET]
    policies = {"SFT": pipe / "sft", "DPO (offline, pipeline)": pipe / "dpo"}
    walls, stopped = {}, {}
    for label, (config, run, extra) in runs_for(pipe, out).items():
        overrides = [*base, *extra, f"train.out_dir={run}"]  # a later init_from (CAI RLAIF) wins over base's
        if not finished(run, config, overrides):
            log(f"  {label.lstrip('_')}: jalign train {config} ...")
            t0 = time.time()
            try:
                jalign(["train", CONFIGS / config, *overrides], out / f"{run.name}.log")
            except RuntimeError as err:  # a run that trained on nothing stops (exit 2): a result, not a crash
                if "trained on nothing" not in str(err):
                    raise
                log(f"  {label}: {err}")
                stopped[label] = str(err).split("error: ", 1)[-1]
            walls[label] = round(time.time() - t0)
        if not label.startswith("_") and label not in stopped:
            policies[label] = run
    log("  evaluating on the pipeline's held-out prompts ...")
    ev = evaluate_policies(pipe, policies, CONFIGS, fast=False, log=lambda *_: None, seed=seed)
    fig = {p: {k: ev[p][k] for k in ("exact_match", "sampled_exact_match", "greedy_reward", "kl")} for p in policies}
    for p, w in walls.items():
        fig.setdefault(p, {})["wall"] = w
    for p, why in stopped.items():
        fig.setdefault(p, {})["stopped"] = why
    return fig


def table(figs: dict) -> str:
    seeds = sorted(figs)
    md = [f"Seeds {', '.join(map(str, seeds))}: mean [min, max].", "",
          "| policy | greedy exact match | per seed | sampled exact match | greedy RM reward | KL to SFT | wall (s) |",
          "|---|---|---|---|---|---|---|"]
    for p in ROWS:
        g = lambda k: [figs[s].get(p, {}).get(k) for s in seeds]  # noqa: E731
        em = g("exact_match")
        per_seed = " / ".join("stopped" if x is None else f"{x:.3f}" for x in em)
        md.append(f"| {p} | {spread(em)} | {per_seed} | {spread(g('sampled_exact_match'))} | "
                  f"{spread(g('greedy_reward'))} | {spread(g('kl'))} | {spread(g('wall'), '{:.0f}')} |")
    gain = lambda s, a, b: (f"{figs[s][a]['exact_match'] - figs[s][b]['exact_match']:+.3f}"  # noqa: E731
                            if "exact_match" in figs[s].get(a, {}) and "exact_match" in figs[s].get(b, {}) else "n/a")
    md += ["", "Gain in greedy exact match over the baseline, per seed: " + "; ".join(
        f"{a} vs {b}: " + " / ".join(gain(s, a, b) for s in seeds) for a, b in PAIRS)]
    stops = [f"{p} (seed {s}): {figs[s][p]['stopped']}" for s in seeds for p in ROWS if "stopped" in figs[s].get(p, {})]
    if stops:
        md += ["", "Stopped because they trained on nothing: " + "; ".join(stops)]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", required=True, help="pipeline directory per seed, with {seed} in it")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out).absolute()
    figs = {}
    for s in [int(x) for x in a.seeds.split(",") if x.strip()]:
        pipe = Path(a.pipelines.format(seed=s)).absolute()
        if not (pipe / "results.json").is_file():
            print(f"gentrain_demos: {pipe} is not a finished pipeline (no results.json); run `jalign pipeline "
                  f"--seed {s} --out {pipe}` first")
            return 2
        done = out / f"s{s}" / "figures.json"
        if done.is_file():
            figs[s] = json.loads(done.read_text())
            continue
        print(f"seed {s} (pipeline {pipe}):", flush=True)
        t0 = time.time()
        figs[s] = run_seed(pipe, s, out / f"s{s}", log=lambda m: print(m, flush=True))
        figs[s]["_total_s"] = round(time.time() - t0)
        done.write_text(json.dumps(figs[s], indent=1))
    md = table(figs)
    (out / "gentrain.md").write_text(md)
    (out / "gentrain.json").write_text(json.dumps({str(k): v for k, v in figs.items()}, indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
