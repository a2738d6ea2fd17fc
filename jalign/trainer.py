"""THE loop: restore-or-init, step, log, eval, checkpoint, stop. It knows no algorithm.

    jalign train CONFIG.yaml key=value ...   ->   train(load_config(CONFIG, overrides))
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import jax

from jalign import distributed
from jalign.algorithms.base import Runtime, get_algorithm
from jalign.checkpoint import Checkpointer
from jalign.config import Config, dump_config, validate_for_devices
from jalign.metrics import MetricsWriter, to_host
from sharding.mesh import make_mesh
from sharding.rules import make_rules, use_rules


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def resolve_model(cfg: Config) -> None:
    """With ``model.hf_path`` the architecture comes from the checkpoint's config.json; the YAML keeps
    only how to run it (dtypes, remat, attention backend) and where weights/tokenizer come from."""
    m = cfg.model
    if not m.hf_path:
        return
    from jalign.models.hf_io import model_config_from_hf

    keep = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention,
                hf_path=m.hf_path, init_from=m.init_from,
                tokenizer=m.hf_path if m.tokenizer == "byte" else m.tokenizer)
    cfg.model = model_config_from_hf(m.hf_path, seq_len=cfg.data.seq_len, **keep)


def setup(cfg: Config):
    """Mesh, rules, run directory, algorithm; validation happens before any device allocation."""
    distributed.initialize(cfg)
    resolve_model(cfg)
    sizes = validate_for_devices(cfg, jax.device_count())
    mesh = make_mesh(**sizes)
    rules = make_rules(cfg.mesh.rules)
    run_dir = Path(cfg.train.out_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    rt = Runtime(cfg=cfg, mesh=mesh, rules=rules, run_dir=run_dir, log=_print_on_main)
    algo = get_algorithm(cfg.algorithm.name)(rt)
    return rt, algo


def _print_on_main(text: str) -> None:
    """The log before the metrics writer exists (data loading, init): process 0 only, like the writer."""
    if jax.process_index() == 0:
        print(text, flush=True)


def _stop_everywhere(flag: bool) -> bool:
    """All processes agree to stop if any received SIGTERM (else some would hang in a collective)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jax.numpy.asarray(int(flag))).max())


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the last train and eval metrics.

    On several processes an exception exits this process at once (``distributed.fail_fast``): a
    normal exit would wait in jax's shutdown barrier for peers that may be blocked waiting for it.
    """
    with distributed.fail_fast():
        return _train(cfg)


def _train(cfg: Config) -> dict:
    rt, algo = setup(cfg)
    t = cfg.train
    writer = None
    ckpt = Checkpointer(rt.run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    last: dict = {}
    with use_rules(rt.mesh, rt.rules), _StopSignal() as stop:
        train_iter = algo.batches("train")
        latest = ckpt.latest_step() if t.resume else None
        if latest is not None:
            state, meta = ckpt.restore(latest, algo.abstract_state(), train_iter)
            rt.log(f"resumed from {ckpt.directory}/{latest}")
        else:
            state = algo.init(jax.random.key(t.seed))
        start = int(jax.device_get(state["step"]))
        writer = MetricsWriter(rt.run_dir, t.steps, t.tensorboard, t.progress, start_step=start)
        rt.log = writer.message
        if hasattr(algo, "on_start"):
            last.update(_prefixed(algo.on_start(state, writer), ""))
        bad_in_a_row, step = 0, start
        window_tokens, window_start = 0.0, time.time()
        try:
            while step < t.steps:
                batch = next(train_iter)
                state, metrics = algo.step(state, batch)
                step += 1
                metrics = to_host(metrics)
                bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped", 0) else 0
                window_tokens += metrics.get("num_tokens", 0.0)
                if step % t.log_every == 0 or step == t.steps or bad_in_a_row:
                    elapsed = max(time.time() - window_start, 1e-9)
                    metrics["tokens_per_s"] = window_tokens / elapsed
                    window_tokens, window_start = 0.0, time.time()
                    writer.write(step, metrics)
                writer.progress(step, metrics)
                last.update(metrics)
                if bad_in_a_row >= t.max_nonfinite:
                    raise TrainingDiverged(
                        f"{bad_in_a_row} non-finite steps in a row (train.max_nonfinite={t.max_nonfinite}); "
                        f"stopping at step {step}; the last good checkpoint is kept in {ckpt.directory}")
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    ev = to_host(algo.evaluate(state))
                    writer.write(step, ev, prefix="eval/")
                    writer.message(f"step {step}: " + ", ".join(f"eval/{k}={v:.4g}" for k, v in ev.items()
                                                                  if isinstance(v, float)))
                    last.update(_prefixed(ev, "eval/"))
                sliced = t.stop_after_steps is not None and step - start >= t.stop_after_steps
                stopping = _stop_everywhere(stop.requested) or sliced
                due = (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps
                if (due and not bad_in_a_row) or stopping:  # keep the last good checkpoint during a bad streak
                    ckpt.save(step, state, train_iter, meta={"step": step}, force=True)
                if stopping:
                    writer.message(f"stopping early: checkpoint at step {step} written, exiting")
                    break
            ckpt.wait()
            if t.export_hf and step == t.steps:
                algo.export(state, t.export_hf)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
    last["step"] = step
    return last


def _prefixed(d: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in (d or {}).items()}
