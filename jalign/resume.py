"""Resuming a run only with the model and algorithm its checkpoints were written with.

    check_resume_config(run_dir, cfg)   # before restoring: one ConfigError naming every changed key

The saved side is the newest readable ``meta["config"]`` of the run's checkpoints (the loop passes
``meta={"step": step, "config": to_dict(cfg)}`` to ``Checkpointer.save``; a checkpoint's copy cannot be
overwritten by a later failing invocation), else ``RUN_DIR/config.yaml``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import orbax.checkpoint as ocp

from jalign.checkpoint import _quiet_orbax, _read_manager

RESUME_KEYS = (
    "model.vocab_size", "model.hidden", "model.mlp", "model.layers", "model.heads", "model.kv_heads",
    "model.head_dim", "model.qkv_bias", "model.qk_norm", "model.tie_embeddings", "model.rope_theta",
    "model.rope_scaling", "model.norm_eps", "model.sliding_window", "model.sliding_window_start_layer",
    "model.hf_path", "model.init_from", "algorithm.name", "algorithm.num_attributes",
)
_PATH_KEYS = ("model.hf_path", "model.init_from")


def _saved_run_config(run_dir: Path) -> tuple[Optional[dict], str]:
    """The config a run's checkpoints were written with: the newest readable ``meta["config"]``
    (saved with the checkpoint, so it cannot be overwritten), else ``RUN_DIR/config.yaml``."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return None, ""
    _quiet_orbax()
    mgr = _read_manager(directory)
    try:
        steps = sorted(mgr.all_steps(), reverse=True)
        if not steps:
            return None, ""
        for s in steps:
            try:
                meta = mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # noqa: BLE001 - a damaged step: try the next (restore_latest will say so)
                continue
            if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
                return meta["config"], f"{directory}/{s} (meta)"
    finally:
        mgr.close()
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            return None, ""
        return (data if isinstance(data, dict) else None), str(path)
    return None, ""


def _lookup(cfg, key: str):
    section, name = key.split(".")
    obj = cfg.get(section, {}) if isinstance(cfg, dict) else getattr(cfg, section, None)
    if isinstance(obj, dict):
        value = obj.get(name)
    else:
        value = getattr(obj, name, None)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        value = dataclasses.asdict(value)
    return value


def _resolved(cfg, key: str):
    value = _lookup(cfg, key)
    if key == "model.head_dim" and value is None:  # None means hidden // heads
        hidden, heads = _lookup(cfg, "model.hidden"), _lookup(cfg, "model.heads")
        return hidden // heads if hidden and heads else None
    if key in _PATH_KEYS and value:
        return os.path.normpath(os.path.abspath(os.path.expanduser(str(value))))
    return value


def check_resume_config(run_dir, cfg) -> None:
    """Raise one ConfigError if ``cfg`` cannot resume the checkpoints in ``run_dir``: a different
    architecture (shapes or the model's function), algorithm or model source (``hf_path``,
    ``init_from``), naming every changed key with both values (see :data:`RESUME_KEYS`). Nothing to
    compare (no checkpoint, or no saved config) is fine. Call after ``model.hf_path`` is resolved
    (the saved config holds the resolved architecture) and before restoring.
    """
    from jalign.config import ConfigError

    run_dir = Path(run_dir)
    saved, source = _saved_run_config(run_dir)
    if saved is None:
        return
    changed = []
    for key in RESUME_KEYS:
        old, new = _resolved(saved, key), _resolved(cfg, key)
        if old != new and not (key == "algorithm.num_attributes" and (old is None or new is None)):
            changed.append(f"{key}: {old!r} in the checkpoints, {new!r} now")
    if changed:
        raise ConfigError(f"{run_dir}: cannot resume this run with a different model or algorithm ("
                          + "; ".join(changed) + f"; saved config: {source}). Use a new train.out_dir for a "
                          "new run, or restore the old values to continue this one.")
