"""``jalign plot RUN_DIR [RUN_DIR ...]``: metrics.jsonl curves -> one PNG (matplotlib, Agg backend).

One panel per metric key, one line per run (labelled by the run directory's name). Default keys: the
common training/eval metrics present in the runs; ``--keys a,b,c`` picks them explicitly.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

PREFERRED = ("loss", "eval/loss", "eval/exact_match", "eval/accuracy", "reward_mean", "eval/reward", "kl",
             "eval/kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
             "response_length", "accuracy", "grad_norm")


def read_series(run_dir: str | Path) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} from a run's metrics.jsonl (numeric, finite values only)."""
    series: dict[str, tuple[list, list]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = row.get("step")
        for k, v in row.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(step)
            ys.append(v)
    return series


def plot_runs(runs: dict[str, str | Path], out_png: str | Path, keys: Optional[Sequence[str]] = None,
              title: Optional[str] = None, max_panels: int = 12,
              skip: Optional[dict[str, Sequence[str]]] = None) -> Path:
    """Plot ``{label: run_dir}`` into ``out_png``; returns the path. ``skip``: {label: keys} left out of
    those panels (e.g. a 500-step run that would squeeze 50-step curves sharing its x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_series(d) for label, d in runs.items()}
    present = set().union(*[set(s) for s in data.values()]) if data else set()
    if keys is None:
        keys = [k for k in PREFERRED if k in present][:max_panels]
    keys = [k for k in keys if k in present] or sorted(present)[:max_panels]
    cols = min(3, max(len(keys), 1))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(data)}  # one colour per run in every panel
    for ax, key in zip(axes.flat, keys):
        for label, series in data.items():
            if key in series and key not in (skip or {}).get(label, ()):
                xs, ys = series[key]
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=label,
                        color=colors[label])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="jalign plot", description="Plot metrics.jsonl curves of runs to a PNG.")
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", help="PNG path (default: FIRST_RUN/curves.png)")
    ap.add_argument("--keys", help="comma-separated metric keys (default: the common ones present)")
    a = ap.parse_args(argv)
    missing = [r for r in a.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"jalign plot: no metrics.jsonl in {', '.join(missing)}")
        return 2
    runs = {Path(r).name or str(r): r for r in a.runs}
    out = plot_runs(runs, a.out or Path(a.runs[0]) / "curves.png", a.keys.split(",") if a.keys else None)
    print(f"wrote {out}")
    return 0
