"""First-step compile time of each stage, per XLA program, with the persistent compilation cache off.

    python benchmarks/compile_time.py [--configs sft_tiny,dpo_tiny,...] [--steps 6] [--devices 1]
                                      [--json out.json] [-- key=value ...]

Each config runs ``--steps`` training steps in a fresh subprocess (``train.log_every=1``, so the loop reads
every step and the gaps between ``on_step`` callbacks are step times; evaluation and the checkpoint at the
last step), with ``jax_enable_compilation_cache`` off, as a new user's first run. JAX reports every XLA
compilation through ``jax.monitoring`` (``/jax/core/compile/backend_compile_duration``, with the program's
name) and logs its argument shapes and shardings (``jax_log_compiles``); the child records both. Printed per
config: the run's wall time, time to the first step's metrics, the first step (compile + run) against the
median later step, the compile seconds by phase (setup = before the loop; step 1; later steps, which is
where evaluation runs), and one row per program: times compiled, distinct argument signatures, seconds of
tracing / lowering / XLA compilation. Flags:

- RECOMPILED: a name compiled more than once, with how its argument signatures differ (shapes/dtypes,
  shardings): one function called with new shapes (a cache miss that fixed shapes or buckets could avoid),
  or several functions of the same name (JAX names a program by its function only; see their phases);
- IN LOOP: compiled after step 1, i.e. work the loop does again for every new shape (eval, generation);
- small helper programs: compiles of under 50 ms each (eager ``jnp`` ops on the host, tiny jits), counted
  with their total, since each one is a separate executable and a dispatch.

Figures only (the machine's load changes them; compare runs of one sitting).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("sft_tiny", "dpo_tiny", "rm_tiny", "kto_tiny", "grpo_tiny", "ppo_tiny")
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/jaxpr_to_mlir_module_duration":
          "lower", "/jax/core/compile/backend_compile_duration": "compile"}
SMALL_S = 0.05


# ---- the child: one run, instrumented --------------------------------------------------------------
class _Recorder(logging.Handler):
    """Collects jax's "Compiling NAME with global shapes and types ..." records (jax_log_compiles)."""

    def __init__(self, phase):
        super().__init__(logging.WARNING)
        self.phase, self.signatures = phase, defaultdict(list)

    def emit(self, record):
        if record.msg.startswith("Compiling %s with global shapes"):
            name, avals, shardings = record.args[:3]
            self.signatures[str(name)].append((str(avals), str(shardings)))


def child(config: str, steps: int, overrides: list, result_path: str) -> None:
    """Runs in the parent's scratch directory: the stages' ``runs/sft_tiny`` (etc.) are the earlier children's."""
    sys.path.insert(0, str(ROOT))
    import jax

    import jalign.trainer as trainer_mod
    from jalign.callbacks import Callback
    from jalign.cli import setup_compilation_cache
    from jalign.config import load_config
    from jalign.trainer import train

    setup_compilation_cache(False)
    jax.config.update("jax_log_compiles", True)
    phase = {"name": "setup"}
    compiles, cpu = [], []  # (program, kind, wall seconds, phase); the process CPU seconds of each
    began = {}

    def on_start(event, value, **kw):  # jax records the start of each timed phase as a scalar
        if event in EVENTS:
            began[(event, kw.get("fun_name"))] = time.process_time()

    def on_duration(event, seconds, **kw):
        if event in EVENTS:
            name = str(kw.get("fun_name", "?"))
            c0 = began.pop((event, kw.get("fun_name")), None)
            if EVENTS[event] == "trace" and not name.startswith("jit("):
                name = f"jit({name})"  # the trace event names the function, the others the jit of it
            compiles.append((name, EVENTS[event], float(seconds), phase["name"]))
            cpu.append(time.process_time() - c0 if c0 is not None else float(seconds))

    jax.monitoring.register_scalar_listener(on_start)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    rec = _Recorder(phase)
    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
        lg = logging.getLogger(name)
        lg.addHandler(rec)
        lg.propagate = False  # jax_log_compiles would print every compile to stderr

    stamps = {"eval": []}
    evaluate = trainer_mod.evaluate

    def timed_evaluate(*args, **kw):  # the loop's evaluations get a phase of their own
        before, phase["name"] = phase["name"], "eval"
        t, c = time.perf_counter(), time.process_time()
        try:
            return evaluate(*args, **kw)
        finally:
            stamps["eval"].append((t, time.perf_counter()))
            stamps.setdefault("eval_cpu", []).append((c, time.process_time()))
            phase["name"] = before

    trainer_mod.evaluate = timed_evaluate

    class Timer(Callback):
        def on_start(self, run):
            stamps["start"], stamps["start_cpu"] = time.perf_counter(), time.process_time()
            phase["name"] = "step 1"

        def on_step(self, run, step, metrics):
            stamps.setdefault("steps", []).append(time.perf_counter())
            stamps.setdefault("steps_cpu", []).append(time.process_time())
            phase["name"] = "later steps"

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [
        f"train.out_dir=runs/{config}", f"train.steps={steps}", "train.log_every=1", f"train.checkpoint_every={steps}",
        f"train.eval_every={steps}", "train.progress=false", "train.tensorboard=false", *overrides])
    train(cfg, callbacks=[Timer()])
    wall, wall_cpu = time.perf_counter() - t0, time.process_time() - c0
    ticks, cticks = stamps.get("steps", []), stamps.get("steps_cpu", [])
    cgaps = [b - a for a, b in zip(cticks, cticks[1:])]
    evals_cpu = stamps.get("eval_cpu", [])
    begin_cpu = max([stamps.get("start_cpu", 0.0)] + [e for s, e in evals_cpu if cticks and e < cticks[0]])
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # The first step starts after the evaluation at step 0 (eval.at_start), if there is one.
    begin = max([stamps["start"]] + [e for s, e in stamps["eval"] if ticks and e < ticks[0]])
    Path(result_path).write_text(json.dumps(dict(
        config=config, wall=wall, to_first_step=ticks[0] - t0 if ticks else None,
        first_step=ticks[0] - begin if ticks else None,
        # the last gap holds the final evaluation and checkpoint: not a step
        steady_step=statistics.median(gaps[:-1]) if len(gaps) > 1 else None,
        eval_seconds=[e - s for s, e in stamps["eval"]],
        # CPU seconds of the process: unlike wall time, not inflated by other processes or by being paused
        wall_cpu=wall_cpu, first_step_cpu=cticks[0] - begin_cpu if cticks else None,
        steady_step_cpu=statistics.median(cgaps[:-1]) if len(cgaps) > 1 else None,
        eval_cpu=[e - s for s, e in evals_cpu], compiles_cpu=cpu,
        compiles=compiles, signatures=rec.signatures)))


# ---- the parent: run each config, report ------------------------------------------------------------
def summarise(r: dict) -> dict:
    """Per program: times compiled, CPU seconds by kind (and the wall seconds of XLA compiling), phases,
    distinct argument signatures; CPU seconds of compiling by phase."""
    progs = defaultdict(lambda: dict(count=0, trace=0.0, lower=0.0, compile=0.0, wall=0.0, phases=set()))
    by_phase = defaultdict(float)
    cpu = r.get("compiles_cpu") or [w for _, _, w, _ in r["compiles"]]
    for (name, kind, wall, ph), c in zip(r["compiles"], cpu):
        p = progs[name]
        p[kind] += c
        if kind == "compile":
            p["count"] += 1
            p["wall"] += wall
            p["phases"].add(ph)
            by_phase[ph] += c
    for name, p in progs.items():
        sigs = r["signatures"].get(name, [])
        p["signatures"] = len({tuple(s) for s in sigs})
        p["differs"] = _difference(sigs) if p["signatures"] > 1 else ""
    return dict(programs={k: v for k, v in progs.items() if v["count"]}, by_phase=dict(by_phase))


def _difference(sigs: list) -> str:
    parts = []
    for what, i in (("shape/dtype", 0), ("sharding", 1)):
        n = len({s[i] for s in sigs})
        if n > 1:
            parts.append(f"{n} {what} signatures")
    return ", ".join(parts)


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def report(r: dict) -> None:
    s = summarise(r)
    progs = s["programs"]
    n = sum(p["count"] for p in progs.values())
    total, wall = sum(p["compile"] for p in progs.values()), sum(p["wall"] for p in progs.values())
    tl = sum(p["trace"] + p["lower"] for p in progs.values())
    print(f"\n== {r['config']}: process CPU {_s(r.get('wall_cpu'))} (wall {_s(r['wall'])}); first step "
          f"{_s(r.get('first_step_cpu'))} CPU vs steady step {_s(r.get('steady_step_cpu'))} CPU (wall "
          f"{_s(r['first_step'])} vs {_s(r['steady_step'])}); evaluations "
          + (", ".join(f"{x:.1f} s" for x in r.get("eval_cpu", [])) or "none") + " CPU")
    print(f"   {n} XLA compilations: {total:.2f} s CPU compiling ({wall:.2f} s wall) + {tl:.2f} s CPU tracing/"
          "lowering; compiling by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(s["by_phase"].items())))
    print(f"   {'program':<40} {'n':>3} {'sigs':>4} {'trace+lower':>11} {'compile':>7} {'(wall)':>7}  phases / flags")
    small = {k for k, p in progs.items() if p["compile"] / p["count"] < SMALL_S}
    for name, p in sorted(progs.items(), key=lambda kv: -kv[1]["compile"]):
        if name in small:
            continue
        flags = []
        if p["count"] > 1:
            flags.append("RECOMPILED" + (f" ({p['differs']})" if p["differs"] else ""))
        if "later steps" in p["phases"]:
            flags.append("IN LOOP")
        print(f"   {name[:40]:<40} {p['count']:>3} {p['signatures']:>4} {p['trace'] + p['lower']:>11.2f} "
              f"{p['compile']:>7.2f} {p['wall']:>7.2f}  {', '.join(sorted(p['phases']))}"
              + (f"  <- {'; '.join(flags)}" if flags else ""))
    if small:
        sp = [progs[k] for k in small]
        print(f"   + small helper programs (< {SMALL_S * 1e3:.0f} ms CPU each): {len(small)} programs, "
              f"{sum(p['count'] for p in sp)} compilations, {sum(p['compile'] for p in sp):.2f} s: "
              + ", ".join(sorted(small))[:400])


def with_prerequisites(names: list) -> list:
    """``names`` with the stages their configs start from (``runs/sft_tiny``, ``run:runs/rm_tiny``) run first."""
    out = []

    def add(name, seen=()):
        if name in out:
            return
        text = "\n".join(line.split("#")[0] for line in (ROOT / "configs" / f"{name}.yaml").read_text().splitlines())
        for dep in re.findall(r"runs/(\w+)", text):
            if dep != name and dep not in seen and (ROOT / "configs" / f"{dep}.yaml").is_file():
                add(dep, (*seen, name))
        out.append(name)

    for n in names:
        add(n)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="names under configs/ (without .yaml)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--devices", type=int, default=1, help="simulated CPU devices of the child (XLA_FLAGS)")
    ap.add_argument("--json", help="write the raw records here")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "STEPS", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    a = ap.parse_args(argv)
    if a.child:
        config, steps, result = a.child
        return child(config, int(steps), a.overrides, result)
    if a.steps < 3:
        ap.error("--steps must be at least 3 (a first step, a steady one, and the last with eval and checkpoint)")
    names = [c for c in a.configs.split(",") if c]
    missing = [c for c in names if not (ROOT / "configs" / f"{c}.yaml").is_file()]
    if missing:
        ap.error(f"--configs: no configs/{missing[0]}.yaml")
    names = with_prerequisites(names)
    env = dict(os.environ, JALIGN_COMPILATION_CACHE="off",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in names:
            res = Path(tmp) / f"{c}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", c, str(a.steps), str(res), *a.overrides]
            proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
            if proc.returncode or not res.is_file():
                print(f"\n== {c}: the run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(res.read_text())
            results.append(r)
            report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    print("\n(persistent compilation cache off; "
          f"{a.devices} CPU device(s); one run each; CPU seconds are the process's own, wall seconds include "
          "waiting for a loaded machine)")


if __name__ == "__main__":
    main()
