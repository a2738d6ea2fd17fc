"""Typed run configuration: dataclass schemas, YAML (safe) + dotted key=value overrides, validation.

This module must not import JAX: configs are validated before any device work.

Every error names where the bad value came from: ``file:line`` for YAML, ``override 'k=v'`` for the
command line, plus the dotted key and, for a misspelt key, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the file:line (or override) and the key."""


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------
@dataclass
class RopeScalingConfig:
    """Llama-3 style frequency-dependent RoPE scaling (HF ``rope_scaling`` with rope_type=llama3)."""

    type: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    vocab_size: int = 384
    hidden: int = 128
    mlp: int = 384
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: Optional[int] = None  # default hidden // heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master params
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    attention: Literal["xla", "cudnn", "ring"] = "xla"  # "ring" is used whenever mesh.sequence > 1
    init_std: float = 0.02
    max_seq_len: int = 4096
    # Sliding-window attention (Mistral, Qwen2/3 use_sliding_window): query t sees key s only if
    # t - s < sliding_window, in layers [sliding_window_start_layer, layers); earlier layers attend
    # fully (Qwen2's max_window_layers). None = full causal attention everywhere.
    sliding_window: Optional[int] = None
    sliding_window_start_layer: int = 0
    # Where the weights come from. None: random init. A Hugging Face directory (config.json +
    # safetensors) via hf_path; a jalign run directory / checkpoint via init_from.
    hf_path: Optional[str] = None
    init_from: Optional[str] = None
    tokenizer: str = "byte"  # "byte" (built-in) or a path to tokenizer.json / an HF directory

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass
class MeshConfig:
    """Device mesh sizes; -1 means "all remaining devices" (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    # logical axis -> mesh axis / list of mesh axes / null; overrides sharding.rules.DEFAULT_RULES
    rules: dict[str, Optional[Union[str, list[str]]]] = field(default_factory=dict)


@dataclass
class DataConfig:
    # A JSONL path, or "builtin:NAME[:split]" for the generated tiny tasks (see jalign.data.tiny).
    train: str = "builtin:addition:train"
    eval: Optional[str] = "builtin:addition:eval"
    seq_len: int = 64
    packing: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"
    chat_template: str = "tiny"  # "tiny", "none", "hf" (from the tokenizer's config) or a jinja file
    shuffle: bool = True
    seed: int = 0
    skip_bad_lines: bool = False
    max_examples: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch: int = 64  # sequences (rows) per optimizer step, across all processes
    micro_batch: Optional[int] = None  # rows per accumulation step (global); None = global_batch
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    out_dir: str = "runs/default"
    resume: bool = True
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    export_hf: Optional[str] = None  # write a Hugging Face directory here at the end
    # Run at most this many steps in this invocation, then checkpoint and exit 0 (time-sliced or
    # preemptible queues: resubmit the same command to continue). None = run to train.steps.
    stop_after_steps: Optional[int] = None


@dataclass
class DistributedConfig:
    """Several processes (``jax.distributed``; see jalign.distributed and launch/README.md).

    Unset values come from the environment (JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES /
    JALIGN_PROCESS_ID, or jax's JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), else from
    a cluster jax detects (SLURM, Open MPI, Cloud TPU, Kubernetes). One process: nothing happens.
    """

    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list[int]] = None  # default: all local devices (env JAX_LOCAL_DEVICE_IDS)
    cluster_detection: str = "auto"  # "auto", "off", or a jax method: slurm, ompi, mpi4py, gketpu, gcetpu
    initialization_timeout: int = 300  # seconds to reach the coordinator and all peers at start
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a peer is declared dead
    shutdown_timeout: int = 300  # seconds a finishing process waits for the others at exit
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # cross-process collectives on CPU


# ---- algorithm configs: one dataclass per algorithm, chosen by ``algorithm.name`` ----------------
ALGORITHM_CONFIGS: dict[str, type] = {}


def register_algorithm_config(name: str):
    def deco(cls):
        ALGORITHM_CONFIGS[name] = cls
        return cls

    return deco


@register_algorithm_config("sft")
@dataclass
class SFTConfig:
    name: str = "sft"
    eval_generate: int = 64  # held-out prompts scored by greedy exact match at each eval (0 = off)
    max_new_tokens: int = 8


@register_algorithm_config("reward")
@dataclass
class RewardConfig:
    name: str = "reward"
    loss: Literal["bt", "bt_margin", "bt_scaled", "regression"] = "bt"
    num_attributes: int = 1
    margin_scale: float = 1.0  # bt_margin: m = scale * (R_c - R_r); bt_scaled: s = scale * (R_c - R_r) (data rewards)


@register_algorithm_config("dpo")
@dataclass
class DPOConfig:
    name: str = "dpo"
    loss: Literal["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    eta: float = 1.0  # RPO: delta* = eta * (R_chosen - R_rejected)
    length_normalize: bool = False
    sft_weight: float = 0.0
    reference: Literal["live", "precomputed"] = "live"  # precomputed: once, into RUN_DIR/reference_logps (zarr)
    eval_generate: int = 64
    max_new_tokens: int = 8


@dataclass
class _RLConfig:
    """What PPO, GRPO and RLOO share: rollout, reward, KL to the reference, minibatching, evaluation.

    One step = ``train.global_batch`` prompts x ``num_rollouts_per_prompt`` samples (the rollout
    batch), then ``ppo_epochs`` passes over it in minibatches of ``minibatch_size`` rows (None = the
    whole rollout), each split into accumulation steps of ``micro_batch_size`` rows (None = minibatch).
    """

    name: str = ""
    reward_model: Optional[str] = None  # a trained reward-model run dir, or ...
    reward_fn: Optional[str] = None  # ... a rule-based reward from jalign.rewards (e.g. exact_match)
    reward_attribute: int = 0  # which reward-model output is the reward
    num_rollouts_per_prompt: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 1
    minibatch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    kl_coef: float = 0.05
    truncated_response: Literal["keep", "mask", "penalize"] = "penalize"  # no EOS within max_new_tokens
    truncation_penalty: float = -1.0  # the reward of a truncated response under "penalize"
    eval_prompts: int = 64  # held-out prompts rolled out at each evaluation (0 = off)
    offload_frozen: bool = False  # park reference + reward model in pinned host memory outside scoring
    # Reward standardisation (NeMo-Aligner's reward_standardization): r <- clip((r - offset) / scale, +-clip),
    # applied to the raw reward before the truncation penalty and the KL term. Offset/scale are usually a
    # reward model's mean/std on held-out data (its eval reports reward_*_mean and reward_std).
    reward_offset: float = 0.0
    reward_scale: float = 1.0
    reward_clip: Optional[float] = None


@register_algorithm_config("ppo")
@dataclass
class PPOConfig(_RLConfig):
    name: str = "ppo"
    critic_init_from: Optional[str] = None  # default: the reward-model run, else model.init_from
    critic_lr: Optional[float] = None  # default optim.lr
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"  # per-token KL in the reward r_t
    kl_target: Optional[float] = None  # set for the adaptive KL coefficient (Ziegler et al. 2019)
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float = 0.2


@register_algorithm_config("grpo")
@dataclass
class GRPOConfig(_RLConfig):
    name: str = "grpo"
    num_rollouts_per_prompt: int = 4
    kl_coef: float = 0.04  # k3 KL to the reference, in the loss
    scale_advantages: bool = True  # False: Dr. GRPO (no division by the group std)
    loss_aggregation: Literal["token", "sequence"] = "token"  # global token mean, or per-sequence mean


@register_algorithm_config("rloo")
@dataclass
class RLOOConfig(_RLConfig):
    name: str = "rloo"
    num_rollouts_per_prompt: int = 4
    kl_in: Literal["reward", "loss"] = "reward"  # R - beta * sum_t k1, or + beta * k3 token mean in the loss


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    algorithm: Any = field(default_factory=SFTConfig)
    source: Optional[str] = None  # the YAML file this came from (informational)


# --------------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------------
def _node_to_python(node: yaml.Node, path: tuple, lines: dict, loader: yaml.SafeLoader):
    lines.setdefault(path, node.start_mark.line + 1)  # a key's own line wins over its value's
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _node_to_python(value_node, path + (key,), lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, path + (i,), lines, loader) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml_with_lines(path: str | Path) -> tuple[dict, dict]:
    """Safe-load a YAML mapping, returning (data, {key_path_tuple: line_number})."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict = {}
        data = _node_to_python(node, (), lines, loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections, got {type(data).__name__}")
    return data, lines


# --------------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------------
class _Where:
    """Where a value came from, for error messages."""

    def __init__(self, file: Optional[str], lines: dict, overrides: dict):
        self.file, self.lines, self.overrides = file, lines, overrides

    def __call__(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path)
        if path in self.overrides:
            return f"override '{self.overrides[path]}': {dotted}"
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.file}:{self.lines[path[:n]]}: {dotted}"
        return f"{self.file or '<config>'}: {dotted}"


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, path: tuple, where: _Where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where(path)}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where(path)}: must be {_type_name(tp)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)}: expected a mapping for section {_type_name(tp)}, got {value!r}")
        return _build_dataclass(tp, value, path, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where(path)}: expected a list, got {value!r}")
        return [_coerce(v, args[0], path + (i,), where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path)}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], path + (k,), where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where(path)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where(path)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where(path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where(path)}: expected a string, got {value!r}")
    raise ConfigError(f"{where(path)}: unsupported type {tp}")


def _build_dataclass(cls, data: dict, path: tuple, where: _Where):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join(map(str, path + (close[0],)))!r}?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"{where(path + (key,))}: unknown key{hint} (valid keys: {valid})")
        kwargs[key] = _coerce(value, hints[key], path + (key,), where)
    return cls(**kwargs)


def _algorithm_class(data: dict, where: _Where):
    name = data.get("algorithm", {}).get("name", "sft") if isinstance(data.get("algorithm", {}), dict) else None
    if name not in ALGORITHM_CONFIGS:
        close = difflib.get_close_matches(str(name), list(ALGORITHM_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where(('algorithm', 'name'))}: unknown algorithm {name!r}{hint} "
            f"(known: {', '.join(sorted(ALGORITHM_CONFIGS))})"
        )
    return ALGORITHM_CONFIGS[name]


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------
def _set_dotted(data: dict, path: tuple, value, override_text: str):
    node = data
    for p in path[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{override_text}': {'.'.join(path)}: {p} is not a section")
        node = nxt
    node[path[-1]] = value


def parse_override(text: str) -> tuple[tuple, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.split(".")), value


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or defaults when path is None), apply overrides, validate types and values."""
    data, lines = load_yaml_with_lines(path) if path is not None else ({}, {})
    override_where = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, text)
        override_where[key] = text
    where = _Where(str(path) if path else None, lines, override_where)
    algo_cls = _algorithm_class(data, where)
    hints = dict(typing.get_type_hints(Config))
    hints["algorithm"] = algo_cls
    names = [f.name for f in dataclasses.fields(Config) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where((key,))}: unknown section{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], (key,), where)
    if "algorithm" not in kwargs:
        kwargs["algorithm"] = algo_cls()
    cfg = Config(**kwargs)
    cfg.source = str(path) if path else None
    validate_static(cfg, where)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def validate_static(cfg: Config, where: Optional[_Where] = None) -> None:
    """Checks that need no device information."""
    where = where or _Where(cfg.source, {}, {})
    m = cfg.model
    if m.hidden % m.heads and m.head_dim is None:
        raise ConfigError(f"{where(('model', 'heads'))}: hidden={m.hidden} is not divisible by heads={m.heads}; set model.head_dim")
    if m.heads % m.kv_heads:
        raise ConfigError(f"{where(('model', 'kv_heads'))}: heads={m.heads} is not divisible by kv_heads={m.kv_heads}")
    for key in ("data", "fsdp", "tensor", "sequence"):
        v = getattr(cfg.mesh, key)
        if v == 0 or v < -1:
            raise ConfigError(f"{where(('mesh', key))}: must be a positive size or -1, got {v}")
    if sum(getattr(cfg.mesh, k) == -1 for k in ("data", "fsdp", "tensor", "sequence")) > 1:
        raise ConfigError(f"{where(('mesh',))}: at most one mesh axis may be -1")
    t = cfg.train
    mb = t.micro_batch or t.global_batch
    if t.global_batch <= 0 or mb <= 0:
        raise ConfigError(f"{where(('train', 'global_batch'))}: batch sizes must be positive")
    if t.global_batch % mb:
        raise ConfigError(
            f"{where(('train', 'micro_batch'))}: global_batch={t.global_batch} is not divisible by micro_batch={mb}"
        )
    if cfg.data.seq_len < 2:
        raise ConfigError(f"{where(('data', 'seq_len'))}: must be at least 2")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int, where: str = "mesh") -> dict[str, int]:
    sizes = {k: getattr(mesh, k) for k in ("data", "fsdp", "tensor", "sequence")}
    known = 1
    for v in sizes.values():
        if v != -1:
            known *= v
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(
                f"{where}: the fixed mesh axes multiply to {known}, which does not divide the {num_devices} devices"
            )
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    product = sizes["data"] * sizes["fsdp"] * sizes["tensor"] * sizes["sequence"]
    if product != num_devices:
        raise ConfigError(
            f"{where}: mesh data*fsdp*tensor*sequence = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}*"
            f"{sizes['sequence']} = {product} but there are {num_devices} devices"
        )
    return sizes


def validate_for_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Checks that need the device count; returns the resolved mesh shape."""
    src = cfg.source or "<config>"
    sizes = resolve_mesh_shape(cfg.mesh, num_devices, where=f"{src}: mesh")
    dp = sizes["data"] * sizes["fsdp"]
    mb = cfg.train.micro_batch or cfg.train.global_batch
    if mb % dp:
        raise ConfigError(
            f"{src}: train.micro_batch={mb} (per accumulation step) is not divisible by the data-parallel size "
            f"mesh.data*mesh.fsdp = {dp}"
        )
    m, tp = cfg.model, sizes["tensor"]
    for key, val in (("heads", m.heads), ("kv_heads", m.kv_heads), ("mlp", m.mlp), ("vocab_size", m.vocab_size)):
        if val % tp:
            raise ConfigError(f"{src}: model.{key}={val} is not divisible by mesh.tensor={tp}")
    if m.hidden % sizes["fsdp"]:
        raise ConfigError(f"{src}: model.hidden={m.hidden} is not divisible by mesh.fsdp={sizes['fsdp']}")
    sp = sizes["sequence"]
    if sp > 1:
        # mesh.sequence > 1 runs ring attention (the model picks it from the mesh); its zigzag layout
        # splits each row into 2*sequence chunks.
        if cfg.data.seq_len % (2 * sp):
            raise ConfigError(f"{src}: data.seq_len={cfg.data.seq_len} must be divisible by 2*mesh.sequence={2 * sp} "
                              "(ring attention's zigzag layout)")
    return sizes


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    data = to_dict(cfg)
    data.pop("source", None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
