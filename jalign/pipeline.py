"""``jalign pipeline [--out DIR] [--seed S] [--fast]``: the classic tiny RLHF pipeline end to end, in one process.

    SFT (configs/sft_tiny.yaml)
     ├── reward model (configs/rm_tiny.yaml, from SFT)
     │     └── PPO (configs/ppo_tiny.yaml: actor/reference from SFT, critic and reward from the RM)
     ├── DPO (configs/dpo_tiny.yaml, from SFT)
     └── GRPO (configs/grpo_tiny.yaml, from SFT, rule-based exact-match reward)

Each stage is ``jalign train`` of its config with the previous stage's run passed as overrides
(``model.init_from=DIR/sft``, ``algorithm.reward_model=DIR/rm``). Then every policy is evaluated the
same way on held-out prompts (reward-model score of sampled answers, greedy exact match, KL to the SFT
policy per sequence) and the table is printed and written to ``DIR/results.md``; ``DIR/curves.png``
holds the training curves. Finished stages are not retrained when the command is run again
(``train.resume``). ``--fast`` is a smoke version with a few steps per stage. ``--seed S`` sets
``train.seed`` (init, sampling) and ``data.seed`` (which examples, in which order) of every stage and of
the final evaluation; ``benchmarks/pipeline_seeds.py`` runs one pipeline per seed and device count.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from jalign.errors import JalignError

STAGES = ("sft", "rm", "ppo", "dpo", "grpo")
CONFIG_FILES = {"sft": "sft_tiny.yaml", "rm": "rm_tiny.yaml", "ppo": "ppo_tiny.yaml", "dpo": "dpo_tiny.yaml",
                "grpo": "grpo_tiny.yaml"}
QUIET = ["train.progress=false", "train.tensorboard=false"]

# Full run: the configs as shipped (the SFT stage learns the sloppy demonstrations, so the later stages
# have a flaw to fix: see jalign/data/tiny.py).
FULL = {
    "sft": [],
    "rm": [],
    "ppo": [],
    "dpo": [],
    "grpo": [],
}
# Smoke run (tests): a few steps each, small evaluations.
FAST = {
    # a smaller model too (the later stages take the architecture from the SFT run): a smoke run, not a result
    "sft": ["train.steps=30", "train.eval_every=30", "train.checkpoint_every=30", "eval.prompts=16",
            "model.hidden=64", "model.mlp=192", "model.layers=2"],
    "rm": ["train.steps=10", "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=10"],
    "ppo": ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.global_batch=8",
            "algorithm.minibatch_size=16", "eval.prompts=16"],
    "dpo": ["train.steps=10", "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=10",
            "eval.prompts=16"],
    "grpo": ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.global_batch=8",
             "algorithm.num_rollouts_per_prompt=4", "algorithm.minibatch_size=16", "eval.prompts=16"],
}


def default_config_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


class PipelineStopped(JalignError):
    """A stage ended before its last step; the pipeline stops there (rerunning continues it)."""

    exit_code = 1


def seed_overrides(seed: Optional[int]) -> list[str]:
    """``train.seed`` and ``data.seed`` for a stage (none: the configs' own seeds)."""
    return [] if seed is None else [f"train.seed={seed}", f"data.seed={seed}"]


def stage_overrides(stage: str, out: Path, fast: bool, extra: Optional[dict] = None,
                    seed: Optional[int] = None) -> list[str]:
    o = [f"train.out_dir={out / stage}", *QUIET, *seed_overrides(seed)]
    if stage != "sft":  # the architecture comes from the SFT run itself
        o.append(f"model.init_from=run:{out / 'sft'}")
    if stage == "ppo":
        o.append(f"roles.reward=run:{out / 'rm'}")
    o += (FAST if fast else FULL)[stage]
    return o + list((extra or {}).get(stage, []))


def evaluate_policies(out: Path, runs: dict[str, Path], config_dir: Path, fast: bool, log=print,
                      seed: Optional[int] = None) -> dict:
    """The same held-out evaluation for every policy (``jalign.evaluation.GenerationEval``): greedy and sampled
    answers to the eval prompts, scored by the reward model, exact match, KL to the SFT policy.

    ``runs``: label -> a jalign run directory, or a source string ``hf:DIR`` / ``run:DIR[@STEP]`` (a LoRA run's
    checkpoints hold its adapters only: evaluate its ``train.export_hf`` directory)."""
    from jalign.config import load_config
    from jalign.models import load
    from jalign.models import params as params_lib
    from jalign.trainer import setup
    from jalign.roles import build_roles
    from sharding.rules import use_rules

    rm = out / "rm"
    reward = [f"roles.reward=run:{rm}", "algorithm.reward_fn=null"] if (rm / "checkpoints").is_dir() else []
    cfg = load_config(config_dir / CONFIG_FILES["grpo"], [
        f"model.init_from=run:{out / 'sft'}", f"train.out_dir={out / 'eval'}", *reward,
        f"eval.prompts={32 if fast else 512}", "eval.greedy=true", "eval.sampled=true", "eval.log_samples=0",
        "train.global_batch=8", "algorithm.num_rollouts_per_prompt=8", "algorithm.minibatch_size=16",
        *seed_overrides(seed)])
    rt, evaluator = setup(cfg)
    rt.log = lambda *_: None
    results = {}
    with use_rules(rt.mesh, rt.rules):
        roles = build_roles(cfg, evaluator.role_specs(), rt.mesh, rt.rules, log=rt.log)
        for label, run in runs.items():
            spec = run if str(run).startswith(("hf:", "run:")) else f"run:{run}"  # a bare path is a jalign run
            params = load.load_params(load.parse_source(spec, where=label), evaluator.decls, mesh=rt.mesh,
                                      rules=rt.rules, dtype=params_lib.DTYPES[cfg.model.param_dtype], log=rt.log)
            ev = evaluator.generation_eval(params, cfg.model, roles)
            nan = float("nan")
            results[label] = {"reward": ev.get("reward", nan), "greedy_reward": ev.get("greedy_reward", nan),
                              "sampled_exact_match": ev.get("sampled_exact_match", nan),
                              "exact_match": ev.get("exact_match", nan), "kl": ev.get("kl", nan)}
            log(f"eval {label}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[label].items()))
    results["_reward_source"] = "reward model" if reward else "exact_match rule"
    return results


def results_table(results: dict) -> str:
    src = results.get("_reward_source", "reward")
    lines = [f"| policy | held-out reward ({src}): sampled | greedy | exact match: sampled | greedy "
             "| KL to SFT (nats/seq) |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        if label.startswith("_"):
            continue
        lines.append(f"| {label} | {r['reward']:.3f} | {r['greedy_reward']:.3f} | {r['sampled_exact_match']:.3f} | "
                     f"{r['exact_match']:.3f} | {r['kl']:.3f} |")
    return "\n".join(lines)


def run_pipeline(out: Path, fast: bool = False, config_dir: Optional[Path] = None, stages=STAGES,
                 extra: Optional[dict] = None, log=print, seed: Optional[int] = None) -> dict:
    from jalign.config import ConfigError, load_config
    from jalign.plot import plot_runs
    from jalign.trainer import train

    config_dir = Path(config_dir or default_config_dir())
    if not (config_dir / CONFIG_FILES["sft"]).is_file():
        raise ConfigError(f"{config_dir}: no {CONFIG_FILES['sft']} here; pass --configs DIR (the repository's "
                          f"configs/ directory; a non-editable install does not carry it)")
    out.mkdir(parents=True, exist_ok=True)
    timings, runs, skipped = {}, {}, []
    t_all = time.time()
    for stage in stages:
        path = config_dir / CONFIG_FILES[stage]
        needs = {"rm": "sft", "ppo": "rm", "dpo": "sft", "grpo": "sft"}.get(stage)
        if not path.is_file() or (needs and needs not in runs):
            skipped.append(stage)
            log(f"== {stage}: skipped ({'no ' + str(path) if not path.is_file() else 'needs ' + needs})")
            continue
        t0 = time.time()
        overrides = stage_overrides(stage, out, fast, extra, seed)
        log(f"== {stage}: jalign train {path} " + " ".join(overrides))
        stage_cfg = load_config(path, overrides)
        ended = train(stage_cfg)
        if ended.get("step", stage_cfg.train.steps) < stage_cfg.train.steps:
            # stopped by a signal (or train.stop_after_steps): a later stage must not start from a half-trained one
            raise PipelineStopped(f"stage {stage} stopped at step {ended['step']} of "
                                  f"{stage_cfg.train.steps} (checkpoint written); run the same command again to "
                                  "continue where it stopped")
        timings[stage] = time.time() - t0
        runs[stage] = out / stage
        log(f"== {stage}: done in {timings[stage]:.0f}s")
    t0 = time.time()
    policies = {label: runs[s] for label, s in (("SFT", "sft"), ("PPO (RM reward)", "ppo"), ("DPO", "dpo"),
                                                ("GRPO (rule reward)", "grpo")) if s in runs}
    results = evaluate_policies(out, policies, config_dir, fast, log, seed) if "sft" in runs else {}
    timings["final_eval"] = time.time() - t0
    table = results_table(results) if results else "(no policy to evaluate)"
    curves = plot_runs(dict(runs), out / "curves.png",
                       keys=["loss", "eval/exact_match", "eval/sampled_exact_match", "eval/reward", "eval/kl",
                             "eval/accuracy", "reward_mean", "kl", "value_loss"], title="jalign tiny pipeline",
                       # SFT's 500 steps would squeeze the others' 30-100; GRPO's rule reward is not in RM
                       # units (it is its sampled exact match, plotted next door)
                       skip={"sft": ["eval/exact_match"], "grpo": ["eval/reward", "reward_mean"]})
    timings["total"] = time.time() - t_all
    md = ["# jalign tiny pipeline" + (" (--fast)" if fast else ""), "", table, "",
          "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    if skipped:
        md.append(f"Skipped stages: {', '.join(skipped)}")
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "timings": timings, "skipped": skipped,
                                                  "seed": seed}, indent=1))
    log("\n" + table)
    log(f"\nwall time {timings['total']:.0f}s; wrote {out / 'results.md'} and {curves}")
    return {"results": results, "timings": timings, "skipped": skipped}


def pipeline_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="jalign pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/pipeline", help="output directory (one run dir per stage)")
    ap.add_argument("--fast", action="store_true", help="a few steps per stage (smoke test)")
    ap.add_argument("--configs", help="directory holding the *_tiny.yaml configs (default: the repo's configs/)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--seed", type=int, help="train.seed and data.seed of every stage and of the final evaluation "
                                             "(default: the configs' own)")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"jalign pipeline: unknown stage(s) {bad}; choose from {STAGES}")
        return 2
    from jalign.config import ConfigError
    from jalign.data.formats import DataError

    try:
        run_pipeline(Path(a.out), a.fast, Path(a.configs) if a.configs else None, stages, seed=a.seed)
    except (ConfigError, DataError) as e:
        print(f"error: {e}")
        return 2
    return 0
