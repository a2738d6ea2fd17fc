"""The plans of the shipped real-size configs (README table), each `jalign plan CONFIG --devices N --device-memory 80`
in its own process on N simulated CPU devices, and optionally the 2/4-layer extrapolation (``--layers auto``) checked against a
full-depth compile of one config.

    python benchmarks/plan.py                          # every real-size config: per-program peaks per device
    python benchmarks/plan.py --only sft_llama3_8b     # one of them
    python benchmarks/plan.py --check-depth sft_llama3_8b   # also --layers full, and the ratio of the two peaks

Prints figures only (no assertion): the plans are compiled on XLA:CPU, an estimate of an accelerator's buffers.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
GiB = 2**30
CONFIGS = {"sft_llama3_8b": 8, "dpo_llama3_8b": 8, "grpo_llama3_8b": 8, "ppo_qwen2_5_7b": 16, "dpo_llama3_70b": 64}


def plan(name: str, devices: int, *extra: str) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jalign", "plan", f"configs/{name}.yaml", "--devices", str(devices),
                            "--device-memory", "80", "--no-knobs", "--json", str(out), *extra], cwd=ROOT,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not out.exists():
            raise SystemExit(f"{name}: jalign plan failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        return json.loads(out.read_text()), wall


def row(name: str, result: dict, wall: float) -> str:
    m = result["mesh"]
    progs = ", ".join(f"{q['name']} {q['peak'] / GiB:.1f}" for q in result["programs"] if not q["plan_only"])
    return (f"| {name} | {result['devices']} (data {m['data']} x fsdp {m['fsdp']} x tensor {m['tensor']}) | {progs} | "
            f"{result['peak'] / GiB:.1f} in {result['peak_program']} | {'fits' if result['fits'] else 'DOES NOT FIT'} "
            f"| {wall:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(CONFIGS))
    ap.add_argument("--check-depth", choices=sorted(CONFIGS))
    a = ap.parse_args()
    print("| config | devices | peak per program, GiB per device | run peak, GiB | 80 GB | plan wall time |")
    print("|---|---|---|---|---|---|")
    for name, n in CONFIGS.items():
        if a.only and name != a.only:
            continue
        print(row(name, *plan(name, n)), flush=True)
    if a.check_depth:
        n = CONFIGS[a.check_depth]
        auto, _ = plan(a.check_depth, n, "--layers", "auto")
        full, wall = plan(a.check_depth, n, "--layers", "full")
        for qa, qf in zip(auto["programs"], full["programs"]):
            print(f"{a.check_depth} {qa['name']}: extrapolated {qa['peak'] / GiB:.2f} GiB, full depth "
                  f"{qf['peak'] / GiB:.2f} GiB (ratio {qa['peak'] / max(qf['peak'], 1):.3f})")
        print(f"(full-depth plan: {wall:.0f} s; the machine may be shared: wall times are indicative only)")


if __name__ == "__main__":
    main()
