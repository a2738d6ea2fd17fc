"""Where the time of a jitted program goes on XLA:CPU: per-op (thunk) time shares from the JAX profiler.

    from _profile import op_shares, print_op_shares
    shares = op_shares(lambda: step(state, batch), reps=3, compiled=step.lower(state, batch).compile())
    print_op_shares(shares, top=15)

The profiler records one event per executed thunk (a dot, a fusion, a copy, a while loop...) named after
its HLO instruction; summing the events' durations by name over ``reps`` calls gives each op's share of the
program's busy time. Shares (not seconds) are what to read on a loaded machine: another process slows every
op alike. With ``compiled`` (a ``jax.stages.Compiled``), each op is labelled with the first line of its
instruction in the optimised HLO (what it computes, shapes included).
"""
from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import tempfile

import jax

# events that are scheduling / waiting, not work
_SKIP = re.compile(r"ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|PjitFunction|^\$|end: |wait|Await")


def op_shares(fn, reps: int = 3, compiled=None) -> list[tuple[str, float, int, str]]:
    """[(op name, seconds over ``reps`` calls, count, HLO description)], largest first."""
    from jax._src import profiler as P

    fn()  # warm up (compile) outside the trace
    d = tempfile.mkdtemp(prefix="jalign_prof_")
    try:
        with jax.profiler.trace(d):
            for _ in range(reps):
                jax.block_until_ready(fn())
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = P.ProfileData.from_serialized_xspace(open(path, "rb").read())
    finally:
        shutil.rmtree(d, ignore_errors=True)
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                if not _SKIP.search(e.name):
                    total[e.name] += e.duration_ns * 1e-9
                    count[e.name] += 1
    hlo = _hlo_lines(compiled) if compiled is not None else {}
    return [(k, v, count[k], hlo.get(k, "")) for k, v in total.most_common()]


def _hlo_lines(compiled) -> dict:
    out = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if m:
            out.setdefault(m.group(1), m.group(2)[:150])
    return out


def print_op_shares(shares, top: int = 20, title: str = "") -> None:
    # nested events (a while loop contains its body's ops) would count twice: shares are of the leaf ops
    leaf = [s for s in shares if not s[3].startswith(("while", "call", "conditional"))]
    busy = sum(s[1] for s in leaf) or 1.0
    print(f"\n{title} op time shares (profiler, {busy:.3f} s busy over the traced calls)")
    for name, sec, n, desc in leaf[:top]:
        print(f"  {100 * sec / busy:5.1f}%  {sec * 1e3 / max(n, 1):8.2f} ms x{n:<4d} {name:28s} {desc}")
