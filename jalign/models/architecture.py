"""What the model *is* (architecture) versus where its weights come from.

With ``model.hf_path`` or ``model.init_from`` the architecture comes from the source (config.json, or the run's
config.yaml). A config may leave the architecture keys out; a key it sets explicitly must agree with the
source, otherwise one error names the key, both values and the fix. How the model runs (dtypes, remat,
attention backend, init_std) always comes from the config. ``max_seq_len`` may be set lower than the source's.
"""
from __future__ import annotations

import dataclasses

from jalign.config import Config, ConfigError, ModelConfig

ARCH_KEYS = ("vocab_size", "hidden", "mlp", "layers", "heads", "kv_heads", "head_dim", "rope_theta", "rope_scaling",
             "norm_eps", "qkv_bias", "qk_norm", "tie_embeddings", "sliding_window", "max_window_layers")


def arch_keys(cfg: ModelConfig) -> tuple[str, ...]:
    names = {f.name for f in dataclasses.fields(cfg)}
    return tuple(k for k in ARCH_KEYS if k in names)


def weights_spec(m: ModelConfig, where: str = "model") -> tuple[str, str]:
    """(config key, source spec) of the policy's starting weights, or ("", "") for random init."""
    if m.hf_path and m.init_from:
        raise ConfigError(f"{where}: set at most one of model.hf_path and model.init_from "
                          f"(got {m.hf_path!r} and {m.init_from!r})")
    if m.init_from:
        return "model.init_from", m.init_from
    if m.hf_path:
        return "model.hf_path", f"hf:{m.hf_path}" if ":" not in m.hf_path else m.hf_path
    return "", ""


def merge_architecture(m: ModelConfig, src: ModelConfig, explicit: frozenset, key: str, spec: str,
                       source_file: str = "<config>") -> ModelConfig:
    """``m`` with every architecture key not given explicitly taken from ``src``; conflicts are an error."""
    updates, conflicts = {}, []
    for k in arch_keys(m):
        mine, theirs = getattr(m, k), getattr(src, k, None)
        if f"model.{k}" in explicit:
            if mine != theirs:
                conflicts.append(f"model.{k}={mine!r} but the source has {theirs!r}")
        else:
            updates[k] = theirs
    if conflicts:
        raise ConfigError(f"{source_file}: {key}={spec}: the model section contradicts the weights' source: "
                          f"{'; '.join(conflicts)}. Leave the architecture keys out to take them from the "
                          "source, or point the key at weights of this architecture")
    if "model.max_seq_len" not in explicit:
        updates["max_seq_len"] = src.max_seq_len
    elif m.max_seq_len > src.max_seq_len:
        raise ConfigError(f"{source_file}: model.max_seq_len={m.max_seq_len} exceeds the source's "
                          f"{src.max_seq_len} ({key}={spec})")
    if "model.tokenizer" not in explicit:
        updates["tokenizer"] = src.tokenizer
    return dataclasses.replace(m, **updates)


def resolve_architecture(cfg: Config) -> None:
    """Fill ``cfg.model``'s architecture from the policy's weight source (in place); no-op for random init."""
    from jalign.models.load import parse_source, source_architecture

    key, spec = weights_spec(cfg.model, cfg.source or "model")
    if not key:
        return
    source = parse_source(spec, where=key)
    src = source_architecture(source, seq_len=cfg.data.seq_len, where=key)
    cfg.model = merge_architecture(cfg.model, source_with_tokenizer(src, source), cfg.explicit, key, spec,
                                   cfg.source or "<config>")


def source_with_tokenizer(src: ModelConfig, source) -> ModelConfig:
    """An HF directory carries its own tokenizer files: they are the model's tokenizer unless one is given."""
    from pathlib import Path

    if source.kind == "hf" and (Path(source.path) / "tokenizer.json").is_file():
        return dataclasses.replace(src, tokenizer=str(source.path))
    return src
