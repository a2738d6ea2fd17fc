"""THE weight loader: every role's parameters from a Hugging Face directory, a jalign run or random init.

    source = parse_source("run:runs/sft@500", where="model.init_from")
    params = load_params(source, decls, mesh=mesh, rules=rules, dtype=jnp.float32, seed=0,
                         allow_fresh=("score", "score_bias"), role="reward model", where="model.init_from")

Strict: every declared tensor must be in the source with exactly the declared shape; only tensors whose path
starts with one of ``allow_fresh`` (the score head a new reward model or critic lacks) may start fresh, and
the log names them. Tensors the source has and the declarations do not need are ignored. Non-finite weights
are an error naming the tensor.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.config import ConfigError, ModelConfig
from jalign.models import params as params_lib


class LoadError(ConfigError):
    """The weights a config names cannot be loaded as declared; the message names source, key and tensors."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
    kind: Literal["hf", "run", "random"]
    path: Optional[str] = None
    step: Optional[int] = None

    def __str__(self) -> str:
        if self.kind == "random":
            return "random init"
        return f"{self.kind}:{self.path}" + (f"@{self.step}" if self.step is not None else "")


def parse_source(spec: Optional[str], *, where: str) -> WeightSource:
    """``hf:DIR``, ``run:DIR[@STEP]``, ``random`` / None, or a bare directory (config.json -> hf; config.yaml,
    checkpoints/ or params/ -> run)."""
    if spec is None or spec == "random":
        return WeightSource("random")
    if not isinstance(spec, str) or not spec:
        raise LoadError(f"{where}: expected hf:DIR, run:DIR[@STEP] or a directory, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("hf", "run"):
        path = rest
    else:
        kind, path = None, spec
    step = None
    if kind in (None, "run") and "@" in path:
        path, _, s = path.rpartition("@")
        try:
            step = int(s)
        except ValueError:
            raise LoadError(f"{where}: {spec!r}: the step after '@' must be an integer") from None
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{where}: {p} does not exist")
    if kind is None:
        if (p / "config.json").is_file():
            kind = "hf"
        elif (p / "config.yaml").is_file() or (p / "checkpoints").is_dir() or (p / "params").is_dir():
            kind = "run"
        else:
            raise LoadError(f"{where}: {p} is neither a Hugging Face directory (config.json) nor a jalign run "
                            "(config.yaml, checkpoints/)")
    if kind == "hf" and not (p / "config.json").is_file():
        raise LoadError(f"{where}: {p / 'config.json'}: missing config.json (not a Hugging Face model directory)")
    return WeightSource(kind, str(p), step)


def source_architecture(source: WeightSource) -> Optional[ModelConfig]:
    """The model section the source was saved with (None for random init)."""
    if source.kind == "random":
        return None
    if source.kind == "hf":
        from jalign.models.hf_io import model_config_from_hf

        cfg = model_config_from_hf(source.path)
        tok = source.path if (Path(source.path) / "tokenizer.json").is_file() else cfg.tokenizer
        return dataclasses.replace(cfg, tokenizer=tok)
    path = Path(source.path) / "config.yaml"
    if not path.is_file():
        raise LoadError(f"{source}: not a jalign run directory (no config.yaml describing its model)")
    from jalign.config import load_config

    return load_config(path).model


def _check_shapes(flat_src_shapes: dict, decls: dict, allow_fresh: Sequence[str], source, where: str):
    fresh, bad = [], []
    for path, d in params_lib.flatten_decls(decls).items():
        if path not in flat_src_shapes:
            if any(path == a or path.startswith(a + "/") for a in allow_fresh):
                fresh.append(path)
            else:
                bad.append(f"{path}: missing")
        elif tuple(flat_src_shapes[path]) != tuple(d.shape):
            bad.append(f"{path}: {list(flat_src_shapes[path])} in the source, {list(d.shape)} in the config")
    if bad:
        raise LoadError(f"{where}={source}: the weights do not match the declared model ({len(bad)} tensors): "
                        f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Set the model: section to the "
                        "source's architecture, or leave the architecture keys out to take them from the source")
    return fresh


def _run_params(source: WeightSource):
    from jalign.models.hf_io import load_params_checkpoint

    if source.step is not None:
        from jalign.checkpoint import load_params as ckpt_load

        return ckpt_load(source.path, step=source.step)
    arch = source_architecture(source)
    return load_params_checkpoint(source.path, arch)


def load_params(source: WeightSource, decls: dict, *, mesh, rules, dtype=jnp.float32, seed: int = 0,
                allow_fresh: Sequence[str] = (), role: str = "policy", where: str = "model", log=print) -> dict:
    """Params for ``decls`` on ``param_shardings(decls, mesh, rules)`` from ``source`` (see the module doc)."""
    shardings = params_lib.flatten(params_lib.param_shardings(decls, mesh, rules))
    if source.kind == "random":
        return params_lib.init_params(decls, seed, dtype, params_lib.unflatten(shardings))
    if source.kind == "hf":
        from jalign.models.hf_io import load_hf_params

        arch = source_architecture(source)
        src = params_lib.flatten(load_hf_params(source.path, arch, mesh=mesh, rules=rules, dtype=dtype))
    else:
        src = params_lib.flatten(_run_params(source))
    fresh = _check_shapes({k: v.shape for k, v in src.items()}, decls, allow_fresh, source, where)
    out = {}
    flat_decls = params_lib.flatten_decls(decls)
    for path, d in flat_decls.items():
        if path in fresh:
            out[path] = params_lib.init_params({"x": d}, seed, dtype, {"x": shardings[path]})["x"]
            continue
        value = src[path]
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            out[path] = jax.device_put(value.astype(dtype), shardings[path])
        else:
            out[path] = jax.device_put(np.asarray(jax.device_get(value)).astype(np.dtype(dtype)), shardings[path])
    del src
    check_finite(out, source, where)
    if fresh:
        log(f"{role}: initialised fresh (not in {source}): {', '.join(fresh)}")
    return params_lib.unflatten(out)


def check_finite(flat: dict, source, where: str) -> None:
    """One reduction per tensor on its devices; NaN/inf anywhere is a LoadError naming the tensors."""
    finite = jax.device_get({k: jnp.isfinite(v).all() for k, v in flat.items()})
    bad = [k for k, ok in finite.items() if not bool(ok)]
    if bad:
        raise LoadError(f"{where}={source}: non-finite values (NaN/inf) in {', '.join(bad[:6])}"
                        f"{' ...' if len(bad) > 6 else ''}")


def param_bytes(decls, dtype=jnp.float32) -> int:
    return sum(math.prod(d.shape) for d in params_lib.flatten_decls(decls).values()) * jnp.dtype(dtype).itemsize
