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
  of the sloppy SFT data with it (the seed's order), then configs/steerlm_tiny.yaml, evaluated with chosen
  attribute values, against ``steer_plain``: SFT on the same annotated responses without attributes (the
  unconditioned baseline, SteerLM's schedule, the same final-answer rule on the same prompts); its figures
  also give the RM's held-out MAE per attribute and the annotation against the ground truth (right/wrong
  final answer, terse/worked: ``annotation_histogram``);
- ``kd``: configs/distill_tiny.yaml, a 2-layer student (half the teacher's depth) from scratch taught by the
  seed's 4-layer DPO policy (top-8 forward KL + NLL, 400 steps), and ``kd_baseline``: the same student, data
  and steps with ``kd_weight=0`` (plain SFT on the sloppy demonstrations).

KTO, SimPO and ORPO are scored by the pipeline's own held-out evaluation (``jalign.pipeline.evaluate_policies``:
the same 512 held-out prompts as the pipeline table, greedy and sampled, RM reward, KL to SFT) next to the
seed's SFT and DPO. SteerLM and the KD students are scored by their runs' final evaluation on the same
held-out prompts (``eval.prompts=512``): SteerLM's final-answer correctness and response length per attribute
setting; the students' exact match and their KL to the teacher. A finished run (its ``metrics.jsonl`` has
the last step, and its stamp says it was made with the same config and overrides: ``finished``) is not rerun. Writes OUT/demos.md and OUT/demos.json.
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
STEER_SETTINGS = ("correctness=4,verbosity=0", "correctness=0,verbosity=0", "correctness=4,verbosity=4",
                  "correctness=0,verbosity=4")  # algorithm.eval_attributes of configs/steerlm_tiny.yaml
STEER_PLAIN = ["data.eval=builtin:addition:eval",  # the prompts and gold answers of addition_steer:eval
               "data.seq_len=96", "train.eval_every=200",
               "eval.max_new_tokens=40", "eval.reward=jalign.data.tiny_steer:answer_correct"]


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
        last = (log_file.read_text().strip().splitlines() or [""])[-1]
        raise RuntimeError(f"`jalign {' '.join(map(str, args))}` failed (exit {proc.returncode}): {last} (see {log_file})")
    return time.time() - t0


def last_row(run: Path) -> dict:
    """The last metrics row that has evaluation keys, merged with the last training row's step."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return evals[-1] if evals else {}


def finished(run: Path, config: str, overrides: list) -> bool:
    """Whether ``run`` is a finished ``jalign train CONFIG OVERRIDES`` (its metrics have the last step).

    The config file's text and the overrides are stamped beside the run (``RUN.args.json``) when it is first
    started; a run directory made by another configuration (or by an older script, without a stamp) stops the
    script with its path named instead of being reused or resumed under a different schedule, and is never
    deleted: the user decides."""
    from jalign.config import load_config

    stamp = run.parent / f"{run.name}.args.json"
    want = {"config": str(config), "config_text": (CONFIGS / config).read_text(), "overrides": list(map(str, overrides))}
    if stamp.is_file():
        if json.loads(stamp.read_text()) != want:
            raise SystemExit(f"{run}: made by another configuration than this script now asks for (see {stamp}); "
                             "delete it (and the stamp) or pass another --out")
    elif run.exists() and any(run.iterdir()):
        raise SystemExit(f"{run}: exists but was not started by this script (no {stamp.name}); delete it or pass "
                         "another --out")
    else:
        run.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(want, indent=1))
        return False
    steps = load_config(CONFIGS / config, overrides).train.steps
    p = run / "metrics.jsonl"
    return p.is_file() and any(json.loads(x).get("step") == steps for x in p.read_text().splitlines() if x.strip())


def train(name: str, config: str, overrides: list, out: Path, times: dict, log=print) -> Path:
    run = out / name
    if not finished(run, config, overrides):
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
                                          "--output", annotated, "--seed", seed], out / "annotate.log"))
    steer = train("steerlm", "steerlm_tiny.yaml", [*sft, f"data.train={annotated}"], out, times, log)
    # the unconditioned baseline: SFT on the same annotated responses without their attributes, SteerLM's
    # schedule (sft_tiny's lr, steps and batch are steerlm_tiny's), scored by the same rule on the same prompts
    plain = train("steer_plain", "sft_tiny.yaml", [*sft, f"data.train={annotated}", *STEER_PLAIN], out, times, log)
    teacher = [f"roles.teacher=run:{pipe / 'dpo'}", *seeds]
    kd = train("kd", "distill_tiny.yaml", teacher, out, times, log)
    kd_base = train("kd_baseline", "distill_tiny.yaml", [*teacher, "algorithm.kd_weight=0"], out, times, log)

    log("  evaluating SFT, DPO, KTO, SimPO, ORPO on the pipeline's held-out prompts ...")
    policies = {"SFT": pipe / "sft", "DPO": pipe / "dpo", "KTO": kto, "SimPO (+NLL)": simpo, "ORPO": orpo}
    res = evaluate_policies(pipe, policies, CONFIGS, fast=False, log=lambda *_: None, seed=seed)
    fig = {p: {k: res[p][k] for k in ("exact_match", "sampled_exact_match", "greedy_reward", "kl")} for p in policies}
    fig.update(steer_figures(rm, annotated, steer))
    r = last_row(plain)
    fig["steer_plain"] = {"correct": r.get("eval/greedy_reward"), "length": r.get("eval/greedy_response_length")}
    for name, run in (("kd", kd), ("kd_baseline", kd_base)):
        r = last_row(run)
        fig[name] = {"exact_match": r.get("eval/exact_match"), "kl_to_teacher": r.get("eval/kd_loss")}
    fig["_times"] = times
    return fig


def steer_figures(rm: Path, annotated: Path, steer: Path) -> dict:
    """SteerLM's figures: the attribute RM's held-out MAE per attribute, the annotation against the ground
    truth, and per setting the steered policy's final-answer correctness and response length."""
    r = last_row(rm)
    fig = {"steer_rm": {k[len("eval/mae_"):]: v for k, v in r.items() if k.startswith("eval/mae_")},
           "steer_annotation": annotation_histogram(annotated), "steerlm": {}}
    s = last_row(steer)
    for setting in STEER_SETTINGS:
        prefix = "steer_" + setting.replace("=", "").replace(",", "_") + "/"  # steerlm.setting_name
        keys = {k: v for k, v in s.items() if prefix in k}
        fig["steerlm"][setting] = {"correct": _pick(keys, "greedy_reward"),
                                   "length": _pick(keys, "greedy_response_length")}
    return fig


def annotation_histogram(path: Path) -> dict:
    """``{attribute: {group: {annotated value: count}}}`` of an annotated tiny-task file against the ground truth
    of ``jalign.data.tiny_steer.true_attributes``: correctness by right/wrong final answer and terse/worked
    form (``"right worked"``, ...), verbosity by form (``"terse"``, ``"worked"``)."""
    from jalign.data.tiny_steer import true_attributes

    hist: dict = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        truth = true_attributes(row["prompt"], row["response"])
        form = "worked" if truth["verbosity"] > 0 else "terse"
        groups = {"correctness": f"{'right' if truth['correctness'] > 0 else 'wrong'} {form}", "verbosity": form}
        for name, value in row["attributes"].items():
            cell = hist.setdefault(name, {}).setdefault(groups.get(name, str(truth.get(name))), {})
            cell[str(value)] = cell.get(str(value), 0) + 1
    return {n: {g: dict(sorted(c.items())) for g, c in sorted(h.items())} for n, h in hist.items()}


def _pick(keys: dict, suffix: str):
    hits = [v for k, v in keys.items() if k.endswith("/" + suffix)]
    if len(hits) != 1:
        raise KeyError(f"expected one metric ending in /{suffix} among {sorted(keys)}")
    return hits[0]


def spread(xs: list, fmt: str = "{:.3f}") -> str:
    """``mean [min, max]`` of the values that exist (one value: itself; none: n/a)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]"


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
    md += steer_rows(g)
    md += ["", "| 2-layer student | greedy exact match | KL to the teacher (top-8) |", "|---|---|---|",
           f"| KD from the DPO policy | {spread(g('kd', 'exact_match'))} | {spread(g('kd', 'kl_to_teacher'))} |",
           f"| SFT on the same data (kd_weight=0) | {spread(g('kd_baseline', 'exact_match'))} | "
           f"{spread(g('kd_baseline', 'kl_to_teacher'))} |",
           f"| the teacher (4-layer DPO policy, pipeline evaluation) | {spread(g('DPO', 'exact_match'))} | 0 |"]
    return "\n".join(md) + "\n"


def steer_rows(g) -> list:
    """The SteerLM table rows after its header: each setting, then the unconditioned SFT policy on the same
    held-out prompts (the pipeline's, plain prompts), then the attribute RM and its annotation."""
    md = [f"| `{s}` | {spread(g('steerlm', s, 'correct'))} | {spread(g('steerlm', s, 'length'))} |"
          for s in STEER_SETTINGS]
    md.append(f"| no attributes: SFT on the same annotated data, same schedule | {spread(g('steer_plain', 'correct'))} | "
              f"{spread(g('steer_plain', 'length'))} |")
    md.append(f"| the pipeline's SFT policy (terse data; exact match, plain prompts) | {spread(g('SFT', 'exact_match'))} | |")
    maes = ", ".join(f"{a} {spread(g('steer_rm', a))}" for a in ("correctness", "verbosity"))
    md += ["", f"Attribute RM, held-out MAE (0-4 scale): {maes}.", "",
           "| annotated correctness of the sloppy SFT data (seed-wise counts) | 0 | 1 | 2 | 3 | 4 |",
           "|---|---|---|---|---|---|"]
    for group in ("right terse", "wrong terse", "right worked", "wrong worked"):
        per_seed = [figs.get(group, {}) for figs in g("steer_annotation", "correctness")]
        cells = [" / ".join(str(h.get(str(v), 0)) for h in per_seed) for v in range(5)]
        md.append(f"| {group} | " + " | ".join(cells) + " |")
    return md


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
