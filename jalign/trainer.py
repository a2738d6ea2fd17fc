"""THE loop: restore-or-init, roles, step, log, evaluate, checkpoint, export, stop. It knows no algorithm.

    jalign train CONFIG.yaml key=value ...   ->   train(load_config(CONFIG, overrides))
    train(cfg, callbacks=[MyCallback()])      # hooks: jalign.callbacks (on_start, on_step, on_eval, on_end)

Step N+1 is dispatched before step N's metrics are read, so the host never waits for a step it does not
need to see; the loop waits only where it must decide something (logging, evaluation, checkpoint, the end).
"""
from __future__ import annotations

import signal
from pathlib import Path

import jax

from jalign import distributed
from jalign import callbacks as callbacks_lib
from jalign.algorithms.base import Runtime
from jalign.algorithms.registry import resolve
from jalign.checkpoint import Checkpointer
from jalign.config import Config, dump_config, to_dict, validate_for_devices
from jalign.evaluation import reduce_eval
from jalign.metrics import MetricsWriter
from jalign.models.architecture import resolve_architecture
from jalign.resume import check_resume_config
from jalign.roles import build_roles
from sharding.mesh import make_mesh
from sharding.rules import make_rules, use_rules


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row (or a run that ended in a non-finite streak); the last good
    checkpoint is kept."""


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


def setup(cfg: Config):
    """Mesh, rules, run directory, algorithm; validation happens before any device allocation."""
    distributed.initialize(cfg)
    resolve_architecture(cfg)
    sizes = validate_for_devices(cfg, jax.device_count())
    mesh = make_mesh(**sizes)
    rules = make_rules(cfg.mesh.rules)
    rt = Runtime(cfg=cfg, mesh=mesh, rules=rules, run_dir=Path(cfg.train.out_dir), log=_print_on_main)
    with use_rules(mesh, rules):
        algo = resolve(cfg.algorithm.name)(rt)
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


def evaluate(algo, state, roles, step: int) -> dict:
    """The algorithm's eval metrics (reduced from (sum, count) pairs) and the shared generation-based eval.
    With several named eval sets (``data.eval: {name: source}``) each set's metrics are ``NAME/metric`` and the
    generation-based eval (on the first set's prompts) is under the first name."""
    names = getattr(getattr(algo, "data", None), "eval_set_names", None) or [None]
    out = {}
    for name in names:
        if name is not None:
            algo.data.select_eval(name)
        out.update({_named(name, k): v for k, v in reduce_eval(algo, state, roles, algo.cfg.train.eval_batches).items()})
    if algo.generation_eval is not None:
        params, mcfg = algo.policy(state, roles)
        out.update({_named(names[0], k): v for k, v in algo.generation_eval(params, mcfg, roles, step).items()})
    return out


def _named(name, key: str) -> str:
    return key if name is None else f"{name}/{key}"


def train(cfg: Config, callbacks=()) -> dict:
    """Run (or resume) training; returns the last train and eval metrics. ``callbacks``:
    :class:`jalign.callbacks.Callback` objects, called at the start, every step, every evaluation and the end.

    On several processes an exception exits this process at once (``distributed.fail_fast``): a normal exit
    would wait in jax's shutdown barrier for peers that may be blocked waiting for it.
    """
    with distributed.fail_fast():
        return _train(cfg, callbacks)


def _train(cfg: Config, callbacks=()) -> dict:
    rt, algo = setup(cfg)
    t = cfg.train
    writer = None
    ckpt = Checkpointer(rt.run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
    with use_rules(rt.mesh, rt.rules), _StopSignal() as stop:
        try:
            train_iter = algo.train_batches()
            if t.resume:
                check_resume_config(rt.run_dir, cfg)  # a changed architecture / algorithm: one message
            roles = build_roles(cfg, algo.role_specs(), rt.mesh, rt.rules, log=rt.log)
            restored = ckpt.restore_latest(algo.abstract_state(), train_iter, log=rt.log) if t.resume else None
            if restored is not None:
                latest, state, _ = restored
                rt.log(f"resumed from {ckpt.directory}/{latest}")
            else:
                state = algo.init_state(roles)
            if jax.process_index() == 0:  # only once the run really starts: a failed start overwrites nothing
                rt.run_dir.mkdir(parents=True, exist_ok=True)
                dump_config(cfg, rt.run_dir / "config.yaml")
            start = int(jax.device_get(state.step))
            writer = run = callbacks_lib.Run(cfg, algo, roles, MetricsWriter(
                rt.run_dir, t.steps, t.tensorboard, t.progress, start_step=start, wandb=t.wandb, config=to_dict(cfg)),
                callbacks)  # the metrics writer, with the callbacks and the sample tables
            rt.log = writer.message
            algo.start(state, roles)
            progress = callbacks_lib.StepLog(writer, t, start, callbacks_lib.throughput_for(cfg, algo), run)
            last = progress.last
            counts = {f"data/{_split(cfg, spec)}_{k}": float(v) for spec, c in algo.data_counts().items()
                      for k, v in c.items()} | run.summary(state, rt.mesh)
            if counts:
                writer.write(start, counts)
                last.update(counts)
            run.started(state, start)
            if start == 0 and t.eval_every and cfg.eval.at_start:
                _log_eval(writer, 0, evaluate(algo, state, roles, 0), last)
            step, pending = start, None
            saved_config = to_dict(cfg)
            while step < t.steps:
                batch = next(train_iter)
                progress.saw(batch)
                state, metrics = algo.step(state, roles, batch)
                step += 1
                run.state, run.step = state, step
                ckpt.check()  # a failed background save stops the run at once, with one message
                if pending is not None:  # step N+1 is dispatched: now read step N
                    progress.read(*pending)
                pending = (step, metrics)
                eval_due = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
                ckpt_due = bool(t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps
                must_read = eval_due or ckpt_due or step % t.log_every == 0 or step == t.steps
                if must_read:
                    progress.read(*pending)
                    pending = None
                if progress.bad_in_a_row >= t.max_nonfinite:
                    raise TrainingDiverged(
                        f"{progress.bad_in_a_row} non-finite steps in a row (train.max_nonfinite={t.max_nonfinite}); "
                        f"stopping at step {step}; the last good checkpoint is kept in {ckpt.directory}")
                if eval_due:
                    _log_eval(writer, step, evaluate(algo, state, roles, step), last)
                # on several processes agreeing on a stop is a collective: only where the loop syncs anyway
                signalled = (must_read or jax.process_count() == 1) and _stop_everywhere(stop.requested)
                stopping = signalled or run.stop_requested or (t.stop_after_steps is not None
                                                               and step - start >= t.stop_after_steps)
                if stopping and pending is not None:
                    progress.read(*pending)
                    pending = None
                if (ckpt_due and not progress.bad_in_a_row) or stopping:  # keep the last good one in a bad streak
                    ckpt.save(step, state, train_iter, meta={"step": step, "config": saved_config}, force=True)
                if stopping:
                    writer.message(f"stopping early: checkpoint at step {step} written, exiting")
                    break
            if pending is not None:
                progress.read(*pending)
            if progress.bad_in_a_row:
                raise TrainingDiverged(
                    f"the run ended in {progress.bad_in_a_row} non-finite step(s) (updates skipped, no checkpoint "
                    f"written for them); the last good checkpoint is kept in {ckpt.directory}")
            ckpt.wait()
            run.ended(last)
            if t.export_hf and step == t.steps:
                algo.export(state, roles, t.export_hf)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
    last["step"] = step
    return last


def _log_eval(writer, step: int, ev: dict, last: dict) -> None:
    ev.update(writer.evaluated(step, ev))  # the callbacks' eval metrics; the new sample completions as a table
    writer.write(step, ev, prefix="eval/")
    writer.message(f"step {step}: " + ", ".join(f"eval/{k}={v:.4g}" for k, v in ev.items() if isinstance(v, float)))
    last.update({f"eval/{k}": v for k, v in ev.items()})


def _split(cfg: Config, spec: str) -> str:
    """The name of a data source in the logged counts: train / eval, or train_I / eval_NAME for several."""
    from jalign.config import eval_sources, train_sources

    train = [s.source for s in train_sources(cfg.data)]
    if spec in train:
        return "train" if len(train) == 1 else f"train_{train.index(spec)}"
    names = [n for n, s in eval_sources(cfg.data).items() if s.source == spec]
    return "eval" if not names or names[0] is None else f"eval_{names[0]}"
