"""Hooks into the loop (``train(cfg, callbacks=[...])``) and the host-side bookkeeping of each run.

    class PrintLoss(Callback):
        def on_step(self, run, step, metrics):
            if step % 10 == 0:
                run.log(f"step {step}: loss {metrics['loss']:.3f}")

        def on_eval(self, run, step, metrics):
            params, model_cfg = run.policy()          # the trained policy (LoRA: adapters applied)
            return {"my_metric": my_eval(params, model_cfg, run.tokenizer)}   # logged as eval/my_metric

    train(load_config("configs/sft_tiny.yaml"), callbacks=[PrintLoss()])

When each hook runs (on process 0 and every other process alike, so a hook may run collectives):

* ``on_start(run)``: the state exists (fresh or resumed, ``run.step``), before the first step and evaluation.
* ``on_step(run, step, metrics)``: once for every step, when the loop reads its metrics (host floats). The loop
  dispatches step N+1 before it reads step N, so ``run.state`` may already be one step ahead of ``step``.
* ``on_eval(run, step, metrics)``: after each evaluation (``train.eval_every``, the end, and step 0 with
  ``eval.at_start``), with the eval metrics; ``run.state`` is the state at ``step``. A dict returned is logged
  with the evaluation (``eval/NAME``) and returned by ``train``.
* ``on_end(run, metrics)``: after the last step (or an early stop), before the export; the final metrics.

``run.request_stop()`` makes the loop checkpoint after the current step and return (like SIGTERM).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import jax

from jalign.metrics import to_host


class Callback:
    """Base class: override any of the hooks (see the module docstring)."""

    def on_start(self, run: "Run") -> None:
        pass

    def on_step(self, run: "Run", step: int, metrics: dict) -> None:
        pass

    def on_eval(self, run: "Run", step: int, metrics: dict) -> Optional[dict]:
        return None

    def on_end(self, run: "Run", metrics: dict) -> None:
        pass


class Run:
    """What a callback sees of the run: ``cfg``, ``algo``, ``roles``, ``state``, ``step``, ``run_dir``,
    ``tokenizer``, ``policy()``, ``log(text)``, ``request_stop()``.

    For the loop it is also the run's writer: :class:`jalign.metrics.MetricsWriter` (``writer``) with the
    callbacks' hooks and the sample-completion tables of each evaluation."""

    def __init__(self, cfg, algo, roles, writer, callbacks: Sequence[Callback] = ()):
        self.cfg, self.algo, self.roles, self.writer = cfg, algo, roles, writer
        self.callbacks = list(callbacks)
        self.run_dir = Path(cfg.train.out_dir)
        self.state, self.step = None, 0
        self.stop_requested = False
        self._samples_at = samples_offset(self.run_dir)  # completions of earlier invocations were logged then
        for name in ("write", "message", "progress", "show", "table", "close"):
            setattr(self, name, getattr(writer, name))

    def summary(self, state, mesh) -> dict:
        """Prints the start-of-run line; returns its figures (parameter counts) for the first metrics row."""
        text, figures = run_summary(self.cfg, self.algo, state, self.roles, mesh)
        self.message(text)
        return figures

    @property
    def tokenizer(self):
        return self.algo.tokenizer

    def policy(self):
        """(params, model config) of the trained policy, as generation uses it."""
        return self.algo.policy(self.state, self.roles)

    def log(self, text: str) -> None:
        self.writer.message(text)

    def request_stop(self) -> None:
        self.stop_requested = True

    # ---- called by the loop ----
    def started(self, state, step: int) -> None:
        self.state, self.step = state, step
        for c in self.callbacks:
            c.on_start(self)

    def stepped(self, step: int, metrics: dict) -> None:
        for c in self.callbacks:
            c.on_step(self, step, metrics)

    def evaluated(self, step: int, metrics: dict) -> dict:
        """Extra metrics from the callbacks' ``on_eval`` (to be logged with the evaluation); the completions
        the evaluation wrote to samples.jsonl go to TensorBoard / W&B as the table ``eval/samples``."""
        rows = new_samples(self.run_dir, self._samples_at)
        self._samples_at = samples_offset(self.run_dir)
        self.table("eval/samples", [{k: v for k, v in r.items() if k != "step"} for r in rows], step)
        extra = {}
        for c in self.callbacks:
            out = c.on_eval(self, step, dict(metrics, **extra))
            if out:
                extra.update({k: float(v) if isinstance(v, (int, float)) else v for k, v in to_host(out).items()})
        return extra

    def ended(self, metrics: dict) -> None:
        for c in self.callbacks:
            c.on_end(self, metrics)


class StepLog:
    """The loop's reading of step metrics: the non-finite streak, throughput at log steps, progress, callbacks."""

    def __init__(self, writer, t, start: int, throughput, run: Run):
        self.writer, self.t, self.throughput, self.run = writer, t, throughput, run
        self.bad_in_a_row, self.last_good = 0, start
        self.last: dict = {}

    def saw(self, batch) -> None:
        self.throughput.saw(batch)

    def read(self, step: int, metrics: dict) -> None:
        t = self.t
        metrics = to_host(metrics)
        skipped = bool(metrics.get("skipped", 0))
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0
        if not skipped:
            self.last_good = step
        self.throughput.read(metrics)
        if step % t.log_every == 0 or step == t.steps or skipped:
            metrics.update(self.throughput.figures(step))
            self.writer.write(step, metrics)
        self.writer.show(metrics)
        self.writer.progress(step, metrics)
        self.last.update(metrics)
        self.run.stepped(step, metrics)


# ---- the start of a run ---------------------------------------------------------------------------
def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def _device_bytes(tree, device) -> int:
    """Bytes of the tree's arrays on ``device``, each array once (roles that alias the LoRA base share it)."""
    total = 0
    for x in {id(leaf): leaf for leaf in jax.tree.leaves(tree)}.values():
        for shard in getattr(x, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def run_summary(cfg, algo, state, roles, mesh) -> tuple[str, dict]:
    """The start-of-run line (parameters, trainable, weight source, mesh, per-device memory) and its figures."""
    from jalign.roles import policy_source

    trainable = _count(state.params)
    summary = getattr(getattr(algo, "trainable", None), "summary", None)
    total = summary()["total_params"] if summary is not None else trainable
    _, source = policy_source(cfg)
    device = jax.local_devices()[0]
    state_bytes, roles_bytes = _device_bytes(state, device), _device_bytes(getattr(roles, "params", {}), device)
    sizes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    text = (f"run: {cfg.algorithm.name}, {_params(total)} parameters ({_params(trainable)} trainable), weights "
            f"{source}, mesh {sizes} ({mesh.devices.size} {device.platform} devices); per device: train state "
            f"{_mib(state_bytes)}, frozen roles {_mib(roles_bytes)}")
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_in_use" in stats:
        limit = stats.get("bytes_limit")
        text += f", in use {_mib(stats['bytes_in_use'])}" + (f" of {_mib(limit)}" if limit else "")
    roles_text = ", ".join(f"{name} {_params(_count(p))}" for name, p in getattr(roles, "params", {}).items())
    if roles_text:
        text += f"; roles: {roles_text}"
    return text, {"model/params": float(total), "model/trainable_params": float(trainable)}


def throughput_for(cfg, algo):
    """The :class:`jalign.throughput.Throughput` of a run (FLOPs per token of its policy, its peak, its data)."""
    from jalign import throughput as tp

    trainable = getattr(algo, "trainable", None)
    flops = None
    try:
        if trainable is not None and trainable.is_lora:
            flops = tp.train_flops_per_token(cfg.model, cfg.data.seq_len, trainable.base_decls, trainable.decls)
        else:
            flops = tp.train_flops_per_token(cfg.model, cfg.data.seq_len)
    except (AttributeError, KeyError, TypeError):  # a model the declarations do not describe
        flops = None
    t = cfg.train
    peak = t.peak_tflops * 1e12 if t.peak_tflops else tp.measured_peak_flops(cfg.model.dtype)
    return tp.Throughput(flops_per_token=flops, peak_flops=peak, num_devices=jax.device_count(),
                         dataset_size=tp.train_size(algo), process_count=jax.process_count())


# ---- sample completions ---------------------------------------------------------------------------
def samples_offset(run_dir) -> int:
    path = Path(run_dir) / "samples.jsonl"
    return path.stat().st_size if path.is_file() else 0


def new_samples(run_dir, offset: int) -> list[dict]:
    """The completions the generation-based evaluation appended to ``RUN_DIR/samples.jsonl`` since ``offset``."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
