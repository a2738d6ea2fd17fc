"""The tiny pipeline over seeds and device counts: is the README's story true for every seed?

    python benchmarks/pipeline_seeds.py --seeds 0,1,2,3,4 --devices 1,8 --out runs/seeds

Runs ``jalign pipeline --seed S --out OUT/dD_sS`` once per (seed S, device count D), each in its own
subprocess so that ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` is set before jax is imported
(``--xla-flags`` adds flags, e.g. tests/conftest.py's opt-level-0 ones, to look at float noise). A
(seed, devices) whose ``results.json`` exists is not rerun (and the pipeline itself skips finished
stages), so an interrupted sweep continues where it stopped. Then it writes ``OUT/seeds.md`` (and
``OUT/seeds.json``) and prints them: per device count, each policy's metrics as mean [min, max] over
seeds, the worst-seed margin of each aligned policy over SFT in held-out greedy exact match, and the
wall time per stage.
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
METRICS = (("exact_match", "greedy exact match"), ("sampled_exact_match", "sampled exact match"),
           ("greedy_reward", "greedy reward"), ("reward", "sampled reward"), ("kl", "KL to SFT (nats/seq)"))
BASELINE = "SFT"


def run_dir(out: Path, seed: int, devices: int) -> Path:
    return out / f"d{devices}_s{seed}"


def run_one(out: Path, seed: int, devices: int, xla_flags: str, fast: bool, log=print) -> dict:
    """One pipeline in a subprocess (its stdout/stderr in RUN/pipeline.log); returns its results.json
    with the wall time of the whole subprocess added."""
    d = run_dir(out, seed, devices)
    done = d / "results.json"
    if done.is_file():
        log(f"seed {seed}, {devices} device(s): {done} exists, not rerun")
        return json.loads(done.read_text())
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # simulated devices are threads: on a loaded machine one may reach a collective > 40 s late, and XLA
    # would abort the run, so it waits longer
    patient = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
               " --xla_cpu_collective_call_terminate_timeout_seconds=600")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {patient} {xla_flags}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "jalign", "pipeline", "--seed", str(seed), "--out", str(d), *(["--fast"] if fast else [])]
    log(f"seed {seed}, {devices} device(s): {' '.join(cmd)}  (log: {d / 'pipeline.log'})")
    t0 = time.time()
    with open(d / "pipeline.log", "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0 or not done.is_file():
        raise RuntimeError(f"seed {seed}, {devices} device(s): pipeline failed (exit {proc.returncode}); "
                           f"see {d / 'pipeline.log'}")
    res = json.loads(done.read_text())
    res["subprocess_wall"] = wall
    done.write_text(json.dumps(res, indent=1))
    log(f"seed {seed}, {devices} device(s): done in {wall:.0f}s")
    return res


def spread(values: list[float], digits: int = 3) -> str:
    """``mean [min, max]`` (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def policies_of(runs: list[dict]) -> list[str]:
    return [p for p in runs[0]["results"] if not p.startswith("_")]


def margins(runs: list[dict], metric: str = "exact_match") -> dict[str, list[float]]:
    """Per aligned policy: its ``metric`` minus SFT's, one value per run (seed)."""
    return {p: [r["results"][p][metric] - r["results"][BASELINE][metric] for r in runs]
            for p in policies_of(runs) if p != BASELINE}


def table(by_devices: dict[int, dict[int, dict]]) -> str:
    """The markdown report: per device count, a policy x metric table, worst-seed margins, wall times."""
    md = []
    for devices, by_seed in by_devices.items():
        seeds = sorted(by_seed)
        runs = [by_seed[s] for s in seeds]
        md += [f"### {devices} device{'s' if devices > 1 else ''}, seeds {','.join(map(str, seeds))} "
               f"(mean [min, max] over seeds; held-out prompts)", "",
               "| policy | " + " | ".join(name for _, name in METRICS) + " |",
               "|---" * (len(METRICS) + 1) + "|"]
        for p in policies_of(runs):
            md.append(f"| {p} | " + " | ".join(spread([r["results"][p][k] for r in runs]) for k, _ in METRICS) + " |")
        md += ["", "| aligned policy | greedy exact match minus SFT's: worst seed | mean | per seed |", "|---|---|---|---|"]
        for p, m in margins(runs).items():
            md.append(f"| {p} | {min(m):+.3f} | {statistics.fmean(m):+.3f} | "
                      + ", ".join(f"{s}: {v:+.3f}" for s, v in zip(seeds, m)) + " |")
        stages = [k for k in runs[0]["timings"] if k != "total"]
        md += ["", "| wall time (s) | " + " | ".join(stages) + " | pipeline | subprocess |",
               "|---" * (len(stages) + 3) + "|"]
        for s, r in zip(seeds, runs):
            t = r["timings"]
            md.append(f"| seed {s} | " + " | ".join(f"{t.get(k, float('nan')):.0f}" for k in stages)
                      + f" | {t['total']:.0f} | {r.get('subprocess_wall', float('nan')):.0f} |")
        md.append("")
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    ap.add_argument("--devices", default="1,8", help="comma-separated simulated CPU device counts")
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for every run")
    ap.add_argument("--fast", action="store_true", help="jalign pipeline --fast (a smoke test of this script)")
    a = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        devices = [int(d) for d in a.devices.split(",") if d.strip()]
    except ValueError:
        print(f"pipeline_seeds: --seeds and --devices take comma-separated integers, got {a.seeds!r} / {a.devices!r}")
        return 2
    if not seeds or not devices or min(devices) < 1:
        print("pipeline_seeds: need at least one seed and device counts >= 1")
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    by_devices: dict[int, dict[int, dict]] = {}
    for d in devices:
        for s in seeds:
            by_devices.setdefault(d, {})[s] = run_one(out, s, d, a.xla_flags, a.fast)
    md = table(by_devices)
    (out / "seeds.md").write_text(md)
    (out / "seeds.json").write_text(json.dumps({str(d): {str(s): r for s, r in v.items()}
                                                for d, v in by_devices.items()}, indent=1))
    print("\n" + md)
    print(f"wrote {out / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
