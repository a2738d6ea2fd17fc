"""LoRA adapters to and from PEFT's adapter directories, and merged Hugging Face checkpoints.

    save_peft(adapters, lora_cfg, cfg, out_dir)                 # adapter_config.json + adapter_model.safetensors
    adapters, lora_cfg = load_peft(adapter_dir, cfg, mesh=mesh)  # a PEFT adapter (e.g. made by peft) -> ours
    save_merged_hf(base, adapters, lora_cfg, cfg, out_dir)      # full HF checkpoint with W + (alpha/r) A B

PEFT stores per layer and module (Llama, Mistral, Qwen2/3 names: ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``) ``base_model.model.model.layers.{i}.{module}.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r], with the HF flattening of multi-axis dims (q's out = heads * head_dim,
o's in = heads * head_dim), and applies ``(lora_alpha / r) * B A`` (``lora_alpha / sqrt(r)`` with
use_rslora). Ours: A [L, in..., r], B [L, r, out...]; so A_peft = A.reshape(-1, r).T and
B_peft = B.reshape(r, -1).T per layer. Variants that change the computation (DoRA, per-module ranks,
trained biases, modules_to_save, partial layers) are refused with the key that asks for them.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jalign.config import LoRAConfig, ModelConfig
from jalign.models.hf_io import HFCheckpointError, _write_header, save_hf
from jalign.models.safetensors_file import SafetensorsFile
from jalign.models.lora import TARGETS, declare_lora, lora_scale, merge_adapters, resolve_targets
from jalign.models.params import flatten, param_shardings, unflatten
from sharding.rules import DEFAULT_RULES

PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_OURS = {m.split(".")[1]: n for n, m in PEFT_MODULES.items()}  # "q_proj" -> "q"
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json keys whose non-default values change what the adapter computes.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "trained LoRA biases", "use_qalora": "QA-LoRA",
                "fan_in_fan_out": "Conv1D (fan_in_fan_out) layouts", "modules_to_save": "fully trained modules",
                "layers_to_transform": "adapters on a subset of layers", "rank_pattern": "per-module ranks",
                "alpha_pattern": "per-module alphas", "layer_replication": "layer replication",
                "alora_invocation_tokens": "activated LoRA", "trainable_token_indices": "trainable tokens",
                "target_parameters": "adapters on raw parameters", "use_bdlora": "BD-LoRA"}


def _host(x: jax.Array, layer: int) -> np.ndarray:
    """One layer of ``x`` on every process's host (a collective when x spans processes)."""
    x = x[layer]
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def peft_adapter_config(lora_cfg: LoRAConfig, base_model_name_or_path: Optional[str] = None) -> dict:
    targets, alpha = resolve_targets(lora_cfg), lora_cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": lora_cfg.rank, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
            "lora_dropout": lora_cfg.dropout,
            "target_modules": [PEFT_MODULES[n].split(".")[1] for n in targets], "bias": "none",
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": True, "revision": None}


def save_peft(adapters: dict, lora_cfg: LoRAConfig, cfg: ModelConfig, out_dir, *,
              base_model_name_or_path: Optional[str] = None, dtype=None) -> str:
    """Write a PEFT adapter directory ``peft.PeftModel.from_pretrained(hf_base, out_dir)`` loads.

    Call on every process (one layer gathered at a time); process 0 writes into a temp dir renamed
    into place. ``dtype`` casts on write (default: the adapters' dtype).
    """
    extra = sorted(k for k in adapters if k != "layers")
    if extra:
        raise ValueError(f"save_peft: adapters hold {extra} besides the LoRA layers; a PEFT adapter directory "
                         "carries LoRA weights only (export heads separately)")
    layers = adapters["layers"]
    targets = resolve_targets(lora_cfg)
    if sorted(layers) != sorted(targets):
        raise ValueError(f"save_peft: adapters target {sorted(layers)} but model.lora.targets is {list(targets)}")
    r = lora_cfg.rank
    entries = []  # (peft name, target, "a"/"b", layer, shape)
    for name in targets:
        a, b = layers[name]["a"], layers[name]["b"]
        if a.shape[-1] != r or b.shape[1] != r:
            raise ValueError(f"save_peft: adapters/layers/{name} have rank {a.shape[-1]}, model.lora.rank is {r}")
        n_in, n_out = math.prod(a.shape[1:-1]), math.prod(b.shape[2:])
        for i in range(cfg.layers):
            p = f"base_model.model.model.layers.{i}.{PEFT_MODULES[name]}"
            entries += [(f"{p}.lora_A.weight", name, "a", i, (r, n_in)),
                        (f"{p}.lora_B.weight", name, "b", i, (n_out, r))]
    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    dt0 = np.dtype(dtype or layers[targets[0]]["a"].dtype)
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    f = open(tmp / WEIGHTS, "wb") if writer else None
    try:
        if f:
            _write_header(f, [(e[0], e[4], dt0) for e in entries])
        for pname, name, ab, i, shape in entries:
            x = _host(layers[name][ab], i)
            arr = x.reshape(-1, r).T if ab == "a" else x.reshape(r, -1).T
            arr = np.ascontiguousarray(arr.astype(dt0))
            assert arr.shape == shape, (pname, arr.shape, shape)
            if f:
                f.write(arr.tobytes())
    finally:
        if f:
            f.close()
    if writer:
        (tmp / CONFIG).write_text(json.dumps(peft_adapter_config(lora_cfg, base_model_name_or_path), indent=2))
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jalign_save_peft:{out_dir}")
    return str(out_dir)


def read_peft_config(adapter_dir) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, raw adapter_config.json) with every unsupported variant refused by its key."""
    path = Path(adapter_dir) / CONFIG
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing {CONFIG} (not a PEFT adapter directory)")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: invalid JSON ({e})") from None
    if c.get("peft_type") != "LORA":
        raise HFCheckpointError(f"{path}: peft_type={c.get('peft_type')!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if c.get(key):
            raise HFCheckpointError(f"{path}: {key}={c[key]!r} is not supported ({what})")
    if c.get("bias", "none") != "none":
        raise HFCheckpointError(f"{path}: bias={c['bias']!r}: trained biases are not supported (need 'none')")
    try:
        r, alpha = int(c["r"]), float(c["lora_alpha"])
    except KeyError as e:
        raise HFCheckpointError(f"{path}: missing key {e.args[0]!r}") from None
    # rsLoRA scales by alpha / sqrt(r); the same scale is alpha' / r with alpha' = alpha * sqrt(r).
    if c.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    return LoRAConfig(rank=r, alpha=alpha, dropout=float(c.get("lora_dropout") or 0.0)), c


def load_peft(adapter_dir, cfg: ModelConfig, *, mesh=None, rules=DEFAULT_RULES, dtype=jnp.float32):
    """(adapters, lora_cfg) from a PEFT adapter directory, ready to continue training.

    The targets are the modules that carry tensors (every layer must have them); shapes are checked
    against ``cfg``. With ``mesh``, adapters get the shardings of their declarations.
    """
    d = Path(adapter_dir)
    lora_cfg, _ = read_peft_config(d)
    wpath = d / WEIGHTS
    if not wpath.is_file():
        other = sorted(p.name for p in d.glob("adapter_model*"))
        raise HFCheckpointError(f"{d}: missing {WEIGHTS}" + (f" (found {', '.join(other)}; only safetensors "
                                                             "are supported)" if other else ""))
    st = SafetensorsFile(wpath)
    found: dict = {}  # (target, "a"/"b") -> {layer: tensor name}
    for key in st.header:
        m = _KEY.match(key)
        if not m or m.group(3) not in _OURS or PEFT_MODULES[_OURS[m.group(3)]] != f"{m.group(2)}.{m.group(3)}":
            raise HFCheckpointError(f"{wpath}: tensor {key} is not a LoRA weight of a supported module "
                                    f"({', '.join(PEFT_MODULES.values())})")
        layer, name, ab = int(m.group(1)), _OURS[m.group(3)], m.group(4).lower()
        if layer >= cfg.layers:
            raise HFCheckpointError(f"{wpath}: tensor {key}: layer {layer} but the model has {cfg.layers} layers")
        found.setdefault((name, ab), {})[layer] = key
    targets = [n for n in TARGETS if (n, "a") in found or (n, "b") in found]
    if not targets:
        raise HFCheckpointError(f"{wpath}: no LoRA tensors")
    lora_cfg = LoRAConfig(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, targets=targets)
    decls = declare_lora(cfg, lora_cfg)
    flat_d = flatten(decls)
    shardings = flatten(param_shardings(decls, mesh, rules)) if mesh is not None else {}
    np_dtype = np.dtype(dtype)
    out = {}
    for name in targets:
        for ab in ("a", "b"):
            decl = flat_d[f"layers/{name}/{ab}"]
            keys = found.get((name, ab), {})
            missing = [i for i in range(cfg.layers) if i not in keys]
            if missing:
                raise HFCheckpointError(f"{wpath}: no lora_{ab.upper()} for {PEFT_MODULES[name]} in layers {missing} "
                                        "(adapters on a subset of layers are not supported)")
            per_layer = decl.shape[1:]
            r = lora_cfg.rank
            want = (r, math.prod(per_layer[:-1])) if ab == "a" else (math.prod(per_layer[1:]), r)
            views = []
            for i in range(cfg.layers):
                if st.shape(keys[i]) != want:
                    raise HFCheckpointError(f"{wpath}: tensor {keys[i]} has shape {list(st.shape(keys[i]))}, expected "
                                            f"{list(want)} (r={lora_cfg.rank} from {CONFIG} and the model config)")
                t = st.array(keys[i]).T  # [in, r] or [r, out]
                views.append(t.reshape(per_layer))
            sharding = shardings.get(f"layers/{name}/{ab}") or SingleDeviceSharding(jax.devices()[0])

            def cb(idx, views=views):
                return np.stack([np.asarray(v[idx[1:]], np_dtype) for v in views[idx[0]]])

            out[f"layers/{name}/{ab}"] = jax.make_array_from_callback(decl.shape, sharding, cb)
    lora_scale(lora_cfg)
    return unflatten(out), lora_cfg


def save_merged_hf(base: dict, adapters: dict, lora_cfg: LoRAConfig, cfg: ModelConfig, out_dir, **save_hf_kw) -> str:
    """A full Hugging Face checkpoint of the merged weights W + (alpha / r) A B (``hf_io.save_hf``)."""
    extra = sorted(k for k in adapters if k != "layers")
    if extra:
        raise ValueError(f"save_merged_hf: adapters hold {extra}; a causal-LM checkpoint has no such weights")
    return save_hf(merge_adapters(base, adapters, lora_cfg), cfg, out_dir, **save_hf_kw)
