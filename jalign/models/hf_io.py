"""Hugging Face checkpoints in and out (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3).

    cfg = model_config_from_hf(hf_dir)                          # config.json -> ModelConfig
    params = load_hf_params(hf_dir, cfg, mesh=mesh)             # safetensors -> sharded params pytree
    save_hf(params, cfg, out_dir, tokenizer_dir=hf_dir)         # params -> HF directory (any process count)

Loading never materialises a full tensor on a device that holds only a shard of it: every parameter is
built with ``jax.make_array_from_callback`` and each callback reads just its slice from a memory-mapped
safetensors file (per-layer HF tensors are stacked into our ``[L, ...]`` layout slice by slice).
Every file is validated before any tensor is read (``jalign.models.safetensors_file``: the
``safetensors`` library's own checks, and a message naming the file and tensor). Saving gathers one
(per-layer) tensor at a time with ``process_allgather`` and only process 0 writes, into a temp dir
renamed into place at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.config import ModelConfig, RopeScalingConfig
from jalign.errors import HFCheckpointError  # noqa: F401  (re-exported: jalign.models.hf_io.HFCheckpointError)
from jalign.models.params import flatten, param_shardings, unflatten
from jalign.models.safetensors_file import ST_NAMES, SafetensorsFile, open_weights  # noqa: F401  (re-exported)
from jalign.models.transformer import declare_params
from sharding.rules import DEFAULT_RULES


ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ---- config.json <-> ModelConfig ------------------------------------------------------------------
def read_hf_config(hf_dir) -> dict:
    d = Path(hf_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise HFCheckpointError(f"{d}: no such directory (expected a Hugging Face model directory)")
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing config.json (not a Hugging Face model directory)")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HFCheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(c, dict):
        raise HFCheckpointError(f"{path}: invalid config: expected a JSON object, got {type(c).__name__}")
    archs = c.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise HFCheckpointError(f"{path}: architectures={archs!r}: expected a list of class names")
    return c


# the numeric keys model_config_from_hf reads
_HF_INT_KEYS = ("hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_hidden_layers")
_HF_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_HF_FLOAT_KEYS = ("rope_theta", "rms_norm_eps")
_ROPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",)}


def check_hf_config(c: dict, where: str) -> None:
    """Every key ``model_config_from_hf`` reads is present (when required) with a usable value, so
    a bad config.json is one message naming the key rather than a KeyError / TypeError later."""
    def positive_int(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise HFCheckpointError(f"{where}: {key}={value!r}: expected a positive integer")

    for key in _HF_INT_KEYS:
        if c.get(key) is None:
            raise HFCheckpointError(f"{where}: missing key {key!r}")
        positive_int(key, c[key])
    for key in _HF_OPTIONAL_INT_KEYS:
        if c.get(key) is not None:
            positive_int(key, c[key])
    for key in _HF_FLOAT_KEYS:
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                              or not math.isfinite(v)):
            raise HFCheckpointError(f"{where}: {key}={v!r}: expected a positive number")
    for block in ("rope_scaling", "rope_parameters"):
        scaling = c.get(block)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise HFCheckpointError(f"{where}: {block}={scaling!r}: expected an object")
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        for key in _ROPE_KEYS.get(rtype, ()):
            v = scaling.get(key)
            if v is None:
                raise HFCheckpointError(f"{where}: {block}.{key}: missing (needed for rope_type {rtype!r})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise HFCheckpointError(f"{where}: {block}.{key}={v!r}: expected a positive number")


def model_config_from_hf(hf_dir, *, seq_len: Optional[int] = None, **overrides) -> ModelConfig:
    """ModelConfig for a Llama/Mistral/Qwen2/Qwen3 directory (transformers 4.x or 5.x config.json).

    Sliding windows follow transformers (see :func:`_sliding_window`). ``seq_len`` (the data's row
    length) must fit ``max_position_embeddings``.
    """
    c = read_hf_config(hf_dir)
    where = f"{Path(hf_dir) / 'config.json'}"
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise HFCheckpointError(f"{where}: unsupported architecture {archs or c.get('model_type')!r}; "
                                f"supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    check_hf_config(c, where)
    try:
        D, H = int(c["hidden_size"]), int(c["num_attention_heads"])
        kw = dict(vocab_size=int(c["vocab_size"]), hidden=D, mlp=int(c["intermediate_size"]),
                  layers=int(c["num_hidden_layers"]), heads=H, kv_heads=int(c.get("num_key_value_heads") or H))
    except KeyError as e:
        raise HFCheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    head_dim = c.get("head_dim")
    if head_dim and int(head_dim) != D // H:
        kw["head_dim"] = int(head_dim)
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise HFCheckpointError(f"{where}: hidden_act={c['hidden_act']!r} is not supported (only silu)")
    if c.get("mlp_bias"):
        raise HFCheckpointError(f"{where}: mlp_bias=true is not supported")
    if family in ("llama", "mistral", "qwen3") and c.get("attention_bias"):
        raise HFCheckpointError(f"{where}: attention_bias=true (with an o_proj bias) is not supported for {arch}")
    rope = dict(c.get("rope_parameters") or {})  # transformers 5
    legacy = c.get("rope_scaling") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in (legacy or rope).items() if k != "rope_theta"}
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype == "llama3":
        kw["rope_scaling"] = RopeScalingConfig(
            type="llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    elif rtype == "linear":
        kw["rope_scaling"] = RopeScalingConfig(type="linear", factor=float(scaling["factor"]))
    elif rtype != "default":
        raise HFCheckpointError(f"{where}: rope scaling type {rtype!r} is not supported (default, linear, llama3)")
    max_len = int(c.get("max_position_embeddings") or 4096)
    if seq_len is not None and seq_len > max_len:
        raise HFCheckpointError(f"{where}: data.seq_len={seq_len} is longer than max_position_embeddings={max_len}")
    kw["sliding_window"], kw["sliding_window_start_layer"] = _sliding_window(c, family, kw["layers"], where)
    kw.update(rope_theta=float(theta), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
              qkv_bias=family == "qwen2" or bool(c.get("attention_bias")), qk_norm=family == "qwen3",
              tie_embeddings=bool(c.get("tie_word_embeddings", False)), max_seq_len=max_len, hf_path=str(hf_dir))
    kw.update(overrides)
    return ModelConfig(**kw)


def _sliding_window(c: dict, family: str, layers: int, where: str) -> tuple[Optional[int], int]:
    """``(sliding_window, sliding_window_start_layer)`` as transformers (5.x) runs the config.

    Mistral: ``sliding_window`` (null = none) in every layer (MistralForCausalLM ignores ``layer_types``).
    Qwen2/Qwen3: a window only with ``use_sliding_window``, in the layers ``layer_types`` marks
    ``sliding_attention`` (default: layers >= ``max_window_layers``); when that leaves no layer
    (``max_window_layers >= num_hidden_layers``) the model is full attention. Llama: none.
    """
    if family == "mistral":
        w = c.get("sliding_window")
        return (None if w is None else int(w)), 0
    if family not in ("qwen2", "qwen3") or not c.get("use_sliding_window") or c.get("sliding_window") is None:
        return None, 0
    types = c.get("layer_types")
    if types is None:
        start = int(c.get("max_window_layers", 28))  # the transformers default
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise HFCheckpointError(f"{where}: layer_types must list full_attention / sliding_attention for each of "
                                f"the {layers} layers, got {types}")
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None, 0
    start = sliding.index(True)
    if not all(sliding[start:]):
        raise HFCheckpointError(f"{where}: layer_types {types} mixes full and sliding-window layers after layer "
                                f"{start}; jalign supports full-attention layers followed by sliding-window ones")
    return int(c["sliding_window"]), start


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32", special: Optional[dict] = None) -> dict:
    """config.json for ``cfg``: Qwen3 when qk_norm, Qwen2 when qkv_bias, else Mistral with a sliding
    window and Llama without.

    Writes both the transformers-5 ``rope_parameters`` and the legacy ``rope_theta``/``rope_scaling``;
    a window as Mistral's ``sliding_window`` or Qwen's ``use_sliding_window`` + ``max_window_layers``
    + ``layer_types``.
    """
    window = cfg.sliding_window is not None and cfg.sliding_window_start_layer < cfg.layers
    arch, mtype = ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else (
        ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else (
            ("MistralForCausalLM", "mistral") if window else ("LlamaForCausalLM", "llama")))
    if mtype == "mistral" and cfg.sliding_window_start_layer > 0:
        raise ValueError(f"save_hf: model.sliding_window_start_layer={cfg.sliding_window_start_layer} > 0 has no "
                         "Hugging Face architecture without qkv_bias (Mistral windows every layer)")
    s = cfg.rope_scaling
    scaling = None
    if s is not None and s.type == "llama3":
        scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                       high_freq_factor=s.high_freq_factor,
                       original_max_position_embeddings=s.original_max_position_embeddings)
    elif s is not None:
        scaling = dict(rope_type="linear", factor=s.factor)
    out = {"architectures": [arch], "model_type": mtype, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
           "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
           "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
           "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
           "use_cache": True, "torch_dtype": dtype, "dtype": dtype}
    if mtype == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif mtype != "llama" and window:
        start = cfg.sliding_window_start_layer
        out.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=start,
                   layer_types=["full_attention" if i < start else "sliding_attention" for i in range(cfg.layers)])
    elif mtype != "llama":
        out.update(use_sliding_window=False, sliding_window=None)
    out.update(special or {})
    return out


# ---- the name / layout mapping --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Map:
    hf_name: str  # "{i}" replaced by the layer index for stacked params
    hf_shape: tuple
    to_ours: Callable  # HF array (view) -> our per-layer layout (a view where possible)
    to_hf: Callable  # our per-layer array -> HF array


def _ident(x):
    return x


def _hf_layout(cfg: ModelConfig) -> dict[str, _Map]:
    D, F, V = cfg.hidden, cfg.mlp, cfg.vocab_size
    H, KV, hd = cfg.heads, cfg.kv_heads, cfg.resolved_head_dim
    T = np.transpose
    lp = "model.layers.{i}."

    def proj(n):  # HF [n*hd, D] <-> ours [D, n, hd]
        return (lambda w: T(w.reshape(n, hd, D), (2, 0, 1)), lambda a: T(a, (1, 2, 0)).reshape(n * hd, D))

    m = {"embed": _Map("model.embed_tokens.weight", (V, D), _ident, _ident),
         "final_norm": _Map("model.norm.weight", (D,), _ident, _ident),
         "layers/attn_norm": _Map(lp + "input_layernorm.weight", (D,), _ident, _ident),
         "layers/mlp_norm": _Map(lp + "post_attention_layernorm.weight", (D,), _ident, _ident),
         "layers/q": _Map(lp + "self_attn.q_proj.weight", (H * hd, D), *proj(H)),
         "layers/k": _Map(lp + "self_attn.k_proj.weight", (KV * hd, D), *proj(KV)),
         "layers/v": _Map(lp + "self_attn.v_proj.weight", (KV * hd, D), *proj(KV)),
         "layers/o": _Map(lp + "self_attn.o_proj.weight", (D, H * hd),
                          lambda w: T(w.reshape(D, H, hd), (1, 2, 0)), lambda a: T(a, (2, 0, 1)).reshape(D, H * hd)),
         "layers/gate": _Map(lp + "mlp.gate_proj.weight", (F, D), T, T),
         "layers/up": _Map(lp + "mlp.up_proj.weight", (F, D), T, T),
         "layers/down": _Map(lp + "mlp.down_proj.weight", (D, F), T, T)}
    if cfg.qkv_bias:
        for n, k in (("q", H), ("k", KV), ("v", KV)):
            m[f"layers/{n}_bias"] = _Map(lp + f"self_attn.{n}_proj.bias", (k * hd,),
                                         (lambda k: lambda w: w.reshape(k, hd))(k), lambda a: a.reshape(-1))
    if cfg.qk_norm:
        m["layers/q_norm"] = _Map(lp + "self_attn.q_norm.weight", (hd,), _ident, _ident)
        m["layers/k_norm"] = _Map(lp + "self_attn.k_norm.weight", (hd,), _ident, _ident)
    if not cfg.tie_embeddings:
        m["lm_head"] = _Map("lm_head.weight", (V, D), T, T)
    return m


def load_hf_params(hf_dir, cfg: ModelConfig, mesh=None, rules=DEFAULT_RULES, dtype=jnp.float32) -> dict:
    """The params pytree (structure of ``declare_params(cfg)``) from a Hugging Face directory.

    With ``mesh``, each leaf has ``param_shardings(decls, mesh, rules)``; without, it lives on the first
    device. Host memory stays around one tensor slice; every device receives only its own shard.
    """
    weights = open_weights(hf_dir)
    decls = declare_params(cfg)
    flat = flatten(decls)
    layout = _hf_layout(cfg)
    from jalign.checkpoint import spread_sharding

    shardings = flatten(param_shardings(decls, mesh, rules)) if mesh is not None else None
    # Validate every tensor before touching a device.
    problems = []
    for path, decl in flat.items():
        m = layout[path]
        names = [m.hf_name.format(i=i) for i in range(cfg.layers)] if path.startswith("layers/") else [m.hf_name]
        for name in names:
            if name not in weights:
                problems.append(f"missing tensor {name} (for {path})")
            elif weights[name].dtype_problem(name):
                problems.append(weights[name].dtype_problem(name))
            elif weights[name].shape(name) != m.hf_shape:
                problems.append(f"{weights[name].path.name}: tensor {name} has shape {list(weights[name].shape(name))}"
                                f", expected {list(m.hf_shape)} from config.json")
    if problems:
        raise HFCheckpointError(f"{hf_dir}: " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    np_dtype = np.dtype(dtype)
    out = {}
    for path, decl in flat.items():
        m = layout[path]
        sharding = shardings[path] if shardings else spread_sharding(tuple(decl.shape))  # no mesh: over local devices
        if path.startswith("layers/"):
            views = [m.to_ours(weights[n].array(n)) for n in (m.hf_name.format(i=i) for i in range(cfg.layers))]

            def cb(idx, views=views):
                return np.stack([np.asarray(v[idx[1:]], np_dtype) for v in views[idx[0]]])
        else:
            view = m.to_ours(weights[m.hf_name].array(m.hf_name))

            def cb(idx, view=view):
                return np.asarray(view[idx], np_dtype)
        out[path] = jax.make_array_from_callback(decl.shape, sharding, cb)
    return unflatten(out)


# ---- saving ---------------------------------------------------------------------------------------
def _gather(x: jax.Array, layer: Optional[int]) -> np.ndarray:
    """The full (layer of the) array on every process's host; collective, so all processes call it."""
    if not isinstance(x, jax.Array):  # host arrays (e.g. jax.device_get of the params)
        x = np.asarray(x)
        return x if layer is None else x[layer]
    if layer is not None:
        x = jax.lax.dynamic_index_in_dim(x, jnp.int32(layer), 0, keepdims=False)
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_header(f, entries: list[tuple[str, tuple, np.dtype]]) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dt in entries:
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)


def save_hf(params: dict, cfg: ModelConfig, out_dir, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3,
            dtype=None, generation_config: Optional[dict] = None, special_ids: Optional[dict] = None) -> str:
    """Write a Hugging Face directory loadable by ``AutoModelForCausalLM.from_pretrained``.

    config.json, ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
    generation_config.json, and the tokenizer files of ``tokenizer_dir`` (if given). ``dtype`` (e.g.
    "bfloat16") casts on write; default: the params' dtype. Call it on every process; only process 0
    writes, one tensor gathered at a time. The directory appears atomically (temp dir + rename).
    ``special_ids`` (``bos_token_id``/``eos_token_id``/``pad_token_id`` of the tokenizer the model was
    trained with) fill the ids the tokenizer directory's config files do not give: a directory holding
    only tokenizer files would otherwise export a model without them.
    """
    out_dir = Path(out_dir)
    layout, flat = _hf_layout(cfg), flatten(params)
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("save_hf: qk_norm with qkv_bias has no Hugging Face architecture (Qwen3's "
                         "attention_bias also adds an o_proj bias)")
    missing = sorted(set(layout) - set(flat))
    if missing:
        raise ValueError(f"save_hf: params lack {missing} required by the config")
    entries = []  # (hf name, our path, layer or None, hf shape, dtype)
    for path, m in layout.items():
        dt = np.dtype(dtype or flat[path].dtype)
        if path.startswith("layers/"):
            entries += [(m.hf_name.format(i=i), path, i, m.hf_shape, dt) for i in range(cfg.layers)]
        else:
            entries.append((m.hf_name, path, None, m.hf_shape, dt))
    shards, cur, size = [], [], 0
    for e in entries:
        n = math.prod(e[3]) * e[4].itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    writer = jax.process_index() == 0
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        f = open(tmp / fname, "wb") if writer else None
        try:
            if f:
                _write_header(f, [(e[0], e[3], e[4]) for e in shard])
            for name, path, layer, shape, dt in shard:
                arr = np.ascontiguousarray(layout[path].to_hf(_gather(flat[path], layer)).astype(dt))
                if arr.shape != tuple(shape):
                    raise ValueError(f"save_hf: {path} gives {name} of shape {arr.shape}, expected {shape}")
                if f:
                    f.write(arr.tobytes())
                weight_map[name], total = fname, total + arr.nbytes
        finally:
            if f:
                f.close()
    if writer:
        given = {k: v for k, v in (special_ids or {}).items() if v is not None}
        special = {**given, **_special_tokens(tokenizer_dir)}
        gen = dict(generation_config or {})
        if not gen and tokenizer_dir and (Path(tokenizer_dir) / "generation_config.json").is_file():
            gen = json.loads((Path(tokenizer_dir) / "generation_config.json").read_text())
        gen = {**special, **gen}
        (tmp / "config.json").write_text(json.dumps(
            hf_config_dict(cfg, str(np.dtype(dtype or entries[0][4])), special), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen or {"_from_model_config": True}, indent=2))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jalign_save_hf:{out_dir}")
    return str(out_dir)


def _special_tokens(tokenizer_dir) -> dict:
    """bos/eos/pad ids from the tokenizer directory's config.json or generation_config.json, if any."""
    out = {}
    for name in ("generation_config.json", "config.json"):
        p = Path(tokenizer_dir) / name if tokenizer_dir else None
        if p is not None and p.is_file():
            c = json.loads(p.read_text())
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if c.get(k) is not None and k not in out:
                    out[k] = c[k]
    return out


# ---- CLI: jalign convert --------------------------------------------------------------------------
def _abstract(cfg: ModelConfig):
    from jalign.checkpoint import spread_sharding

    decls = declare_params(cfg)  # each leaf split over this process's devices, never whole on one
    return jax.tree.map(lambda d: jax.ShapeDtypeStruct(d.shape, jnp.float32, sharding=spread_sharding(tuple(d.shape))),
                        decls, is_leaf=lambda x: hasattr(x, "axes"))


def load_params_checkpoint(ckpt_dir, cfg: ModelConfig) -> dict:
    """Params from ``jalign convert --out`` (``CKPT/params``, or any dir written by
    ``ocp.StandardCheckpointer().save(path, params)``), else from a training run directory via
    ``jalign.checkpoint.load_params``: its newest step, or the step of ``RUN/checkpoints/N``."""
    import orbax.checkpoint as ocp

    from jalign.checkpoint import load_params

    path = Path(ckpt_dir).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
    if path.name.isdigit() and (path / "state").is_dir():  # one step of a run: RUN/checkpoints/N
        return load_params(path.parent, step=int(path.name))
    if (path / "params").is_dir():
        path = path / "params"
    if not (path / "_CHECKPOINT_METADATA").exists() or (path / "state").is_dir():
        return load_params(ckpt_dir)
    target = _abstract(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def checkpoint_config_path(ckpt_dir) -> Optional[Path]:
    """The config.yaml describing a checkpoint: ``CKPT/config.yaml`` (a `jalign convert --out` dir or a
    run dir), else the run's for ``RUN/checkpoints/N`` or ``RUN/checkpoints``."""
    p = Path(ckpt_dir)
    for cand in (p / "config.yaml", p.parent.parent / "config.yaml", p.parent / "config.yaml"):
        if cand.is_file():
            return cand
    return None


def _tokenizer_dir(model: ModelConfig) -> Optional[str]:
    """Where the tokenizer files of a model config live (None for the built-in byte tokenizer)."""
    if model.tokenizer and model.tokenizer != "byte":
        t = Path(model.tokenizer)
        return str(t if t.is_dir() else t.parent)
    return model.hf_path


def convert_main(argv: list[str]) -> int:
    """``jalign convert --hf DIR --out CKPT_DIR`` or ``jalign convert --from-checkpoint CKPT --to-hf DIR``.

    Bad input raises a :class:`jalign.errors.JalignError` (or ``OSError``) that ``jalign.cli`` prints
    as one line.
    """
    ap = argparse.ArgumentParser(prog="jalign convert", description=__doc__.split("\n")[0])
    ap.add_argument("--hf", help="Hugging Face model directory to read")
    ap.add_argument("--out", help="jalign checkpoint directory to write (params/ + config.yaml)")
    ap.add_argument("--from-checkpoint", dest="ckpt", help="jalign checkpoint to read: a run directory (its "
                    "newest step), one step RUN/checkpoints/N, or a `jalign convert --out` directory")
    ap.add_argument("--config", help="jalign YAML config whose model: section describes the checkpoint "
                                     "(default: CKPT/config.yaml, or RUN/config.yaml for RUN/checkpoints/N)")
    ap.add_argument("--to-hf", dest="to_hf", help="Hugging Face directory to write")
    ap.add_argument("--tokenizer", help="directory whose tokenizer files are copied into --to-hf")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="dtype of the written tensors (default: float32 from HF, the params' from a checkpoint)")
    ap.add_argument("--max-shard-gb", type=float, default=2.0)
    a = ap.parse_args(argv)
    from jalign.config import Config, ConfigError, dump_config, load_config

    if a.hf and a.out:
        import orbax.checkpoint as ocp

        cfg = model_config_from_hf(a.hf)
        out = Path(a.out).absolute()
        if (out / "params").exists():
            raise ConfigError(f"--out {a.out}: {out / 'params'} already exists; choose a new directory")
        params = load_hf_params(a.hf, cfg, dtype=jnp.dtype(a.dtype or "float32"))
        out.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(out / "params", params)
        tok = a.hf if (Path(a.hf) / "tokenizer.json").is_file() else cfg.tokenizer
        dump_config(Config(model=dataclasses.replace(cfg, hf_path=None, init_from=str(out), tokenizer=tok)),
                    out / "config.yaml")
        print(f"wrote {out}/params and {out}/config.yaml ({cfg.layers} layers, vocab {cfg.vocab_size})")
        return 0
    if a.ckpt and a.to_hf:
        cfg_path = a.config or checkpoint_config_path(a.ckpt)
        if cfg_path is None:
            raise ConfigError(f"--from-checkpoint {a.ckpt}: no config.yaml beside it or in its run directory; "
                              "pass --config RUN/config.yaml")
        cfg = load_config(cfg_path).model
        params = load_params_checkpoint(a.ckpt, cfg)
        try:
            save_hf(params, cfg, a.to_hf, tokenizer_dir=a.tokenizer or _tokenizer_dir(cfg), dtype=a.dtype,
                    max_shard_bytes=int(a.max_shard_gb * 1024**3))
        except ValueError as e:  # params that do not fit the config / have no HF architecture
            raise HFCheckpointError(f"{a.ckpt} (config {cfg_path}): cannot write a Hugging Face model: {e}") from e
        print(f"wrote {a.to_hf} (from {a.ckpt}, config {cfg_path})")
        return 0
    ap.print_usage(sys.stderr)
    print("jalign convert: need either --hf DIR --out CKPT_DIR or --from-checkpoint CKPT_DIR --to-hf OUT_DIR",
          file=sys.stderr)
    return 2
