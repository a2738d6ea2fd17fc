"""Typed run configuration: dataclass schemas, YAML (safe) + dotted key=value overrides, validation.

This module must not import JAX: configs are validated before any device work.

Every error names where the bad value came from: ``file:line`` for YAML, ``override 'k=v'`` for the
command line, plus the dotted key and, for a misspelt key, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from jalign.config_values import MESH_AXES, validate_rules, validate_values
from jalign.errors import ConfigError  # noqa: F401  (re-exported: jalign.config.ConfigError)


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------
@dataclass
class RopeScalingConfig:
    """Llama-3 style frequency-dependent RoPE scaling (HF ``rope_scaling`` with rope_type=llama3)."""

    type: Literal["llama3", "linear"] = "llama3"  # llama3: frequency-dependent (Llama 3.1+); linear: positions / factor
    factor: float = 8.0  # how much longer the context is than the one the model was trained on
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are scaled by 1 / factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are left as they are
    original_max_position_embeddings: int = 8192  # the context length before scaling


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) on the layers' linear weights.

    y = x W + (alpha / rank) * dropout(x) A B, with W frozen, A [in, rank] and B [rank, out] trained
    (B = 0 at init, so training starts from the base). ``targets``: projection names or "all-linear".
    """

    rank: int = 8  # inner dimension of A [in, rank] and B [rank, out]
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter input (training only)
    # which projections get adapters: "all-linear" or a list of q, k, v, o, gate, up, down
    targets: Union[Literal["all-linear"], list[Literal["q", "k", "v", "o", "gate", "up", "down"]]] = "all-linear"


@dataclass
class ModelConfig:
    """The policy's architecture, dtypes and weight source. With ``hf_path`` / ``init_from`` the architecture
    keys come from the source and may be left out (a key given explicitly must agree with it)."""

    vocab_size: int = 384  # embedding rows (>= the tokenizer's id range; may be padded beyond it)
    hidden: int = 128  # model width d_model
    mlp: int = 384  # feed-forward inner width (SwiGLU)
    layers: int = 2  # transformer blocks
    heads: int = 4  # query heads
    kv_heads: int = 2  # key/value heads (grouped-query attention; heads % kv_heads == 0)
    head_dim: Optional[int] = None  # default hidden // heads
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: Optional[RopeScalingConfig] = None  # long-context RoPE scaling (HF rope_scaling); null = none
    norm_eps: float = 1e-6  # RMSNorm epsilon
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    tie_embeddings: bool = False  # the LM head is the transposed embedding
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of the forward and backward
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the master params (and optimizer state)
    # activation rematerialisation per layer (jax.checkpoint policy): less memory for more compute
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    attention: Literal["xla", "cudnn", "pallas", "ring"] = "xla"  # "ring" is used whenever mesh.sequence > 1
    init_std: float = 0.02  # std of the normal init of weights under random init
    # LoRA: train adapters on a frozen base (None: train every parameter). quantize_base stores the
    # frozen base weights quantised (QLoRA): per-channel int8, NF4 blocks of 64, or NF4 with its
    # block scales quantised again ("double quantisation").
    lora: Optional[LoRAConfig] = None
    quantize_base: Optional[Literal["int8", "nf4", "nf4_dq"]] = None  # QLoRA: store the frozen base quantised
    # Run the layers' linear matmuls (q, k, v, o, gate, up, down) in fp8 with per-tensor current scaling:
    # e4m3 weights and activations, e5m2 output gradients, f32 accumulation (jalign.models.fp8). Fast on
    # GPUs with fp8 tensor cores (Hopper, Ada); on CPU an emulation (same numbers, slower). Embedding, LM
    # head, attention scores and the loss stay in model.dtype. Not with model.quantize_base.
    matmul_fp8: bool = False
    max_seq_len: int = 4096  # longest sequence the model is run on (RoPE tables, checks of data.seq_len)
    # Sliding-window attention (Mistral, Qwen2/3 use_sliding_window): query t sees key s only if
    # t - s < sliding_window, in layers [sliding_window_start_layer, layers); earlier layers attend
    # fully (Qwen2's max_window_layers). None = full causal attention everywhere.
    sliding_window: Optional[int] = None
    sliding_window_start_layer: int = 0  # first layer with the sliding window (Qwen2's max_window_layers)
    # Where the weights come from (both null: random init). hf_path: a Hugging Face directory (config.json +
    # safetensors) or a Hub name org/name[@revision] (resolved through huggingface_hub's cache).
    hf_path: Optional[str] = None
    init_from: Optional[str] = None  # a jalign run (run:DIR[@STEP]) or a `jalign convert --out` directory
    # "byte" (built-in), a tokenizer.json, a directory holding one, or a Hub name org/name[@revision]
    tokenizer: str = "byte"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass
class MeshConfig:
    """Device mesh sizes; -1 means "all remaining devices" (at most one axis)."""

    data: int = -1  # data-parallel replicas
    fsdp: int = 1  # parameters and optimizer state sharded over this axis (ZeRO-3 style), batch too
    tensor: int = 1  # tensor (Megatron) parallelism: heads, mlp and vocab split
    sequence: int = 1  # sequence parallelism: ring attention over this axis when > 1
    # logical axis -> mesh axis / list of mesh axes / null; overrides sharding.rules.DEFAULT_RULES
    rules: dict[str, Optional[Union[str, list[str]]]] = field(default_factory=dict)


@dataclass
class DataSourceConfig:
    """One source of a mixture (``data.train: [{source, weight}, ...]``) or one named eval set."""

    source: str = ""  # a data spec, as data.train takes it (JSONL, Parquet, Arrow, JSON, Hub dataset, builtin:)
    weight: float = 1.0  # mixture weight (normalised over the sources); unused for eval sets
    fields: dict[str, str] = field(default_factory=dict)  # column mapping for this source (overrides data.fields)


@dataclass
class DataConfig:
    # a source: a JSONL file; a Parquet / Arrow / JSON file or a saved dataset directory (needs `datasets`);
    # a Hub dataset org/name[@revision][:split]; "builtin:NAME[:split]" (the tiny tasks, jalign.data.tiny).
    # Or a weighted mixture: a list of {source, weight, fields}
    train: Union[str, list[Union[str, DataSourceConfig]]] = "builtin:addition:train"
    # held-out data as a source, or several named sets {name: source or {source, fields}}, each logged as
    # eval/NAME/...; null: no evaluation data
    eval: Optional[Union[str, dict[str, Union[str, DataSourceConfig]]]] = "builtin:addition:eval"
    # column mapping {jalign field: column}, e.g. {prompt: question, response: answer}
    fields: dict[str, str] = field(default_factory=dict)
    seq_len: int = 64  # tokens per row (packed or padded)
    packing: bool = True  # several SFT examples per row (segment ids keep them apart)
    # several whole preference pairs (reward, dpo), KTO rows or scored sequences (reward, loss: regression)
    # per row, segment ids keeping every sequence apart: a row of 2 * seq_len tokens (the positions of one
    # unpacked pair) holds as many as fit, and train.global_batch counts these rows; the losses normalise by
    # the pairs (examples) each batch holds
    pack_pairs: bool = False
    pack_max_pairs: int = 16  # with pack_pairs: the most pairs one packed row holds
    overlong: Literal["truncate", "drop"] = "truncate"  # what happens to an example longer than seq_len
    # "auto" (the tokenizer's own template if it has one, "tiny" for the byte tokenizer, else "none"),
    # "tiny", "none", "hf" (from the tokenizer's config) or a jinja file; see jalign.data.chat
    chat_template: str = "auto"
    shuffle: bool = True  # shuffle the training data (a new order every epoch)
    seed: int = 0  # shuffling and builtin-task generation seed
    skip_bad_lines: bool = False  # skip (and count) bad or degenerate lines instead of failing on the first
    max_examples: Optional[int] = None  # read at most this many training examples (per source)


@dataclass
class OptimConfig:
    """AdamW with a warmup + decay learning-rate schedule and global-norm gradient clipping."""

    lr: float = 1e-3  # peak learning rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 20  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    # clip the global gradient norm to this (null: no clipping)
    grad_clip: Optional[float] = 1.0
    # Keep the optimizer state (Adam's moments) in host memory between steps (memory_kind="pinned_host"),
    # copied to the devices for the update only: frees 2x the f32 params per device for the forward/backward.
    offload_state: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases logging (needs the ``wandb`` package; never required otherwise)."""

    project: Optional[str] = None  # W&B project (default: wandb's own, from WANDB_PROJECT)
    name: Optional[str] = None  # run name (default: the run directory's name)
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under RUN_DIR/wandb, `wandb sync` later
    entity: Optional[str] = None  # W&B team or user (default: wandb's own)
    tags: list[str] = field(default_factory=list)  # run tags


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps in total
    global_batch: int = 64  # sequences (rows) per optimizer step, across all processes
    micro_batch: Optional[int] = None  # rows per accumulation step (global); None = global_batch
    eval_every: int = 100  # evaluate every N steps (and at the end)
    eval_batches: int = 4  # eval batches per evaluation (0 = the whole eval set)
    log_every: int = 10  # write metrics every N steps
    checkpoint_every: int = 100  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    async_checkpointing: bool = True  # write checkpoints in the background while training continues
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    out_dir: str = "runs/default"  # the run directory: checkpoints, metrics.jsonl, config.yaml, samples
    resume: bool = True  # continue from the newest checkpoint in out_dir
    seed: int = 0  # parameter init and per-step randomness (dropout, sampling)
    progress: bool = True  # a progress bar on a terminal
    tensorboard: bool = True  # TensorBoard events in RUN_DIR/tensorboard
    wandb: Optional[WandbConfig] = None  # Weights & Biases logging, e.g. {project: my-project, mode: offline}
    # per-device peak FLOP/s in TFLOP/s for the MFU figure (e.g. 989 for an H100 in bf16); null: measured at
    # the start with a matmul in the compute dtype
    peak_tflops: Optional[float] = None
    export_hf: Optional[str] = None  # write a Hugging Face directory here at the end
    # Run at most this many steps in this invocation, then checkpoint and exit 0 (time-sliced or
    # preemptible queues: resubmit the same command to continue). None = run to train.steps.
    stop_after_steps: Optional[int] = None
    timing: bool = False  # block on each phase of a step to time it (RL: rollout/score/train); slows the loop


@dataclass
class DistributedConfig:
    """Several processes (``jax.distributed``; see jalign.distributed and launch/README.md).

    Unset values come from the environment (JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES /
    JALIGN_PROCESS_ID, or jax's JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), else from
    a cluster jax detects (SLURM, Open MPI, Cloud TPU, Kubernetes). One process: nothing happens.
    """

    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: Optional[int] = None  # processes in the job
    process_id: Optional[int] = None  # this process's index in [0, num_processes)
    local_device_ids: Optional[list[int]] = None  # default: all local devices (env JAX_LOCAL_DEVICE_IDS)
    cluster_detection: str = "auto"  # "auto", "off", or a jax method: slurm, ompi, mpi4py, gketpu, gcetpu
    initialization_timeout: int = 300  # seconds to reach the coordinator and all peers at start
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a peer is declared dead
    shutdown_timeout: int = 300  # seconds a finishing process waits for the others at exit
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # cross-process collectives on CPU


@dataclass
class RoleConfig:
    """A frozen model an algorithm uses (reference, reward, teacher, judge, opponent, ...).

    ``source``: ``policy-init`` (the weights the policy starts from), ``run:DIR[@STEP]`` (a jalign run or
    ``jalign convert`` directory), ``hf:DIR`` (a Hugging Face directory), or a bare directory (detected).
    """

    source: str = "policy-init"  # policy-init, run:DIR[@STEP], hf:DIR, a Hub name org/name[@revision], or a directory
    offload: bool = False  # park in pinned host memory between uses (copied to the devices for each use)


@dataclass
class RolloutConfig:
    """How every sampler of the run decodes (RL rollouts, generate-then-train, generation-based evaluation)."""

    engine: bool = True  # the continuous-batching engine with a paged KV cache (jalign.rollout); false: one static batch
    slots: Optional[int] = None  # concurrent sequences (default: the rows per data-parallel shard, at most 64)
    page_size: int = 16  # tokens per KV-cache page
    steps_per_call: int = 32  # decode steps per device call between refills
    prefix_sharing: bool = True  # the samples of one prompt share its prefilled pages
    sampler: Literal["inverse_cdf", "gumbel"] = "inverse_cdf"  # gumbel: the same draws as the static sampler


@dataclass
class EvalConfig:
    """Generation-based evaluation on held-out prompts (``data.eval``), run by the loop at every evaluation
    (``train.eval_every``) and before the first step; the same for every algorithm."""

    prompts: int = 64  # held-out prompts answered at each evaluation (0 = off)
    max_new_tokens: int = 8  # longest answer generated
    greedy: bool = True  # greedy answers: exact_match, greedy_reward, greedy_kl
    sampled: bool = False  # also samples at `temperature`: sampled_exact_match, reward, kl
    temperature: float = 1.0  # sampling temperature of the sampled answers
    at_start: bool = True  # evaluate the starting model (step 0) so every run records its own "before"
    log_samples: int = 4  # completions per evaluation written to RUN_DIR/samples.jsonl (0 = none)
    # a rule (a jalign.rewards name or an import path module:function) scored on every answer: greedy_reward /
    # reward; for the algorithms without a reward of their own (SFT, DPO family, KTO, SteerLM, KD, CAI, OPD)
    reward: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    roles: dict[str, RoleConfig] = field(default_factory=dict)
    algorithm: Any = None  # the dataclass of the algorithm named by algorithm.name (jalign.algorithms.registry)
    source: Optional[str] = None  # the YAML file this came from (informational)
    # dotted keys given explicitly in the YAML or on the command line (not defaults); e.g. an architecture
    # key set explicitly must agree with the weights' source, one left out is taken from it
    explicit: frozenset = field(default_factory=frozenset, repr=False)


# --------------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------------
class _DuplicateKey(Exception):
    """A mapping sets one key twice: (dotted key, first line, second line)."""


def _node_to_python(node: yaml.Node, path: tuple, lines: dict, loader: yaml.SafeLoader):
    lines.setdefault(path, node.start_mark.line + 1)  # a key's own line wins over its value's
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in out
            except TypeError:  # an unhashable key such as [a, b]
                raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}",
                                                        key_node.start_mark) from None
            if seen:  # plain PyYAML lets the last one win silently
                raise _DuplicateKey(".".join(map(str, path + (key,))), lines[path + (key,)], line)
            lines[path + (key,)] = line
            out[key] = _node_to_python(value_node, path + (key,), lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, path + (i,), lines, loader) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml_with_lines(path: str | Path) -> tuple[dict, dict]:
    """Safe-load a YAML mapping, returning (data, {key_path_tuple: line_number}).

    A key (or section) given twice in one mapping is an error naming both lines.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) file: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict = {}
        data = _node_to_python(node, (), lines, loader)
    except _DuplicateKey as e:
        key, first, second = e.args
        what = "section" if "." not in key else "key"
        raise ConfigError(f"{path}:{second}: {key}: duplicate {what} (already set at line {first}); "
                          "remove one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
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
        for n in range(len(path), 0, -1):  # the override that set this value, or a section holding it
            if path[:n] in self.overrides:
                return f"override '{self.overrides[path[:n]]}': {dotted}"
        if path not in self.lines:  # a section or key only an override created (e.g. 'modle.hidden=8')
            below = [text for key, text in self.overrides.items() if key[:len(path)] == path]
            if below:
                return f"override '{below[-1]}': {dotted}"
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.file}:{self.lines[path[:n]]}: {dotted}"
        return f"{self.file or '<config>'}: {dotted}"


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _same_shape(value, tp) -> bool:
    """Whether ``value`` has the container shape of type ``tp`` (mapping / list), for Union errors."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, list):
        return origin is list
    return False


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
                errors.append((a, e))
        # the one arm of the value's own shape (a mapping for a section, a list for a list) says what is wrong
        # inside it, e.g. a misspelt key, rather than "expected A or B"
        shaped = [e for a, e in errors if _same_shape(value, a)]
        if len(errors) == 1 or len(shaped) == 1:
            raise (shaped or [errors[0][1]])[0]
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
    """The algorithm class named by ``algorithm.name`` (default ``sft``), through the registry."""
    from jalign.algorithms.registry import UnknownAlgorithm, resolve

    section = data.get("algorithm", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where(('algorithm',))}: expected a mapping with a name, got {section!r}")
    name = section.get("name", "sft")
    try:
        return resolve(name)
    except UnknownAlgorithm as e:
        raise ConfigError(f"{where(('algorithm', 'name'))}: {e}") from None


def _roles(value, path: tuple, where: _Where) -> dict:
    """``roles: {name: source string | {source, offload}}`` -> {name: RoleConfig}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where(path)}: expected a mapping of role names to sources, got {value!r}")
    out = {}
    for name, spec in value.items():
        if spec is None:  # roles.NAME=null: no such role (e.g. a rule reward instead of a config's reward model)
            continue
        if isinstance(spec, str):
            spec = {"source": spec}
        out[name] = _coerce(spec, RoleConfig, path + (name,), where)
    return out


def _check_roles(roles: dict, algo_cls, where: _Where) -> None:
    known = list(getattr(algo_cls, "role_names", ()))
    for name in roles:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean 'roles.{close[0]}'?" if close else ""
            have = ", ".join(known) if known else "none"
            raise ConfigError(f"{where(('roles', name))}: unknown role for algorithm {algo_cls.name!r}{hint} "
                              f"(its roles: {have})")


def _explicit_keys(data: dict, prefix: tuple = ()) -> set:
    keys = set()
    for k, v in data.items():
        keys.add(".".join(map(str, prefix + (k,))))
        if isinstance(v, dict) and len(prefix) < 1:
            keys |= _explicit_keys(v, prefix + (k,))
    return keys


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------
def _set_dotted(data: dict, path: tuple, value, override_text: str):
    node = data
    for p in path[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if isinstance(nxt, str) and path[0] == "roles":  # roles.NAME=SOURCE then roles.NAME.offload=true
            nxt = node[p] = {"source": nxt}
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
    hints["algorithm"] = algo_cls.config_class
    names = [f.name for f in dataclasses.fields(Config) if f.name not in ("source", "explicit")]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where((key,))}: unknown section{hint} (valid: {', '.join(names)})")
        if key == "roles":
            kwargs[key] = _roles(value, (key,), where)
        elif key == "algorithm" and value is None:
            continue
        else:
            kwargs[key] = _coerce(value, hints[key], (key,), where)
    if "algorithm" not in kwargs:
        kwargs["algorithm"] = algo_cls.config_class()
    if hasattr(kwargs["algorithm"], "name"):  # a built-in name or the import path the config gave
        section = data.get("algorithm") or {}
        kwargs["algorithm"].name = section.get("name", algo_cls.name)
    _check_roles(kwargs.get("roles", {}), algo_cls, where)
    cfg = Config(**kwargs)
    cfg.source = str(path) if path else None
    cfg.explicit = frozenset(_explicit_keys(data))
    validate_static(cfg, where)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def validate_static(cfg: Config, where: Optional[_Where] = None) -> None:
    """Checks that need no device information: value ranges of every key, then their combinations."""
    where = where or _Where(cfg.source, {}, {})
    for section in ("model", "mesh", "data", "optim", "train", "distributed", "eval", "rollout", "algorithm"):
        if dataclasses.is_dataclass(getattr(cfg, section)):
            validate_values(getattr(cfg, section), (section,), where)
    m = cfg.model
    if m.hidden % m.heads and m.head_dim is None:
        raise ConfigError(f"{where(('model', 'heads'))}: hidden={m.hidden} is not divisible by heads={m.heads}; set model.head_dim")
    if m.heads % m.kv_heads:
        raise ConfigError(f"{where(('model', 'kv_heads'))}: heads={m.heads} is not divisible by kv_heads={m.kv_heads}")
    r = m.rope_scaling
    if r is not None and r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        raise ConfigError(f"{where(('model', 'rope_scaling', 'high_freq_factor'))}: must be greater than "
                          f"low_freq_factor={r.low_freq_factor} (llama3 scaling interpolates between them), "
                          f"got {r.high_freq_factor}")
    if m.hf_path is None and cfg.data.seq_len > m.max_seq_len:  # with hf_path, checked once config.json is read
        raise ConfigError(f"{where(('data', 'seq_len'))}: {cfg.data.seq_len} exceeds model.max_seq_len="
                          f"{m.max_seq_len}")
    if m.hf_path is None and cfg.data.pack_pairs and packed_pair_len(cfg.data) > m.max_seq_len:
        raise ConfigError(f"{where(('data', 'pack_pairs'))}: packed pair rows are 2 * data.seq_len = "
                          f"{packed_pair_len(cfg.data)} tokens, more than model.max_seq_len={m.max_seq_len}; "
                          "halve data.seq_len or leave data.pack_pairs off")
    for key in MESH_AXES:
        v = getattr(cfg.mesh, key)
        if v == 0 or v < -1:
            raise ConfigError(f"{where(('mesh', key))}: must be a positive size or -1, got {v}")
    if sum(getattr(cfg.mesh, k) == -1 for k in MESH_AXES) > 1:
        raise ConfigError(f"{where(('mesh',))}: at most one mesh axis may be -1")
    validate_rules(cfg.mesh.rules, where)
    _validate_data(cfg.data, where)
    t = cfg.train
    mb = t.micro_batch or t.global_batch
    if t.global_batch % mb:
        raise ConfigError(
            f"{where(('train', 'micro_batch'))}: global_batch={t.global_batch} is not divisible by micro_batch={mb}"
        )
    d = cfg.distributed
    if d.num_processes is not None and d.process_id is not None and d.process_id >= d.num_processes:
        raise ConfigError(f"{where(('distributed', 'process_id'))}: {d.process_id} is not in "
                          f"[0, distributed.num_processes={d.num_processes})")


def train_sources(d: DataConfig) -> list[DataSourceConfig]:
    """``data.train`` as a list of sources (one source: a list of one, weight 1)."""
    items = [d.train] if isinstance(d.train, str) else list(d.train)
    return [DataSourceConfig(source=x) if isinstance(x, str) else x for x in items]


def eval_sources(d: DataConfig) -> dict[Optional[str], DataSourceConfig]:
    """``data.eval`` as {name: source}: ``{None: source}`` for one unnamed set, ``{}`` for none."""
    if d.eval is None:
        return {}
    if isinstance(d.eval, str):
        return {None: DataSourceConfig(source=d.eval)}
    return {name: DataSourceConfig(source=x) if isinstance(x, str) else x for name, x in d.eval.items()}


def packed_pair_len(d: DataConfig) -> int:
    """Tokens per packed pair row (``data.pack_pairs``): both sides of the longest pair fit."""
    return 2 * d.seq_len


def _validate_data(d: DataConfig, where: _Where) -> None:
    if d.pack_max_pairs < 1:
        raise ConfigError(f"{where(('data', 'pack_max_pairs'))}: must be >= 1, got {d.pack_max_pairs}")
    if isinstance(d.train, list):
        if not d.train:
            raise ConfigError(f"{where(('data', 'train'))}: an empty mixture; give at least one source")
        for i, src in enumerate(train_sources(d)):
            if not src.source:
                raise ConfigError(f"{where(('data', 'train', i))}: a mixture entry needs a source "
                                  "({source: FILE, weight: W})")
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ConfigError(f"{where(('data', 'train', i, 'weight'))}: must be a positive number, got "
                                  f"{src.weight!r}")
    if isinstance(d.eval, dict):
        if not d.eval:
            raise ConfigError(f"{where(('data', 'eval'))}: no eval sets; give {{name: source}} or null")
        for name, src in eval_sources(d).items():
            if not str(name) or "/" in str(name):
                raise ConfigError(f"{where(('data', 'eval', name))}: eval set names are logged as eval/NAME/...: "
                                  f"use a name without '/', got {name!r}")
            if not src.source:
                raise ConfigError(f"{where(('data', 'eval', name))}: an eval set needs a source")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int, where: str = "mesh") -> dict[str, int]:
    """The mesh sizes with ``-1`` filled in (``sharding.mesh.resolve_sizes``); errors name ``where``.

    Imported here, not at the top: device counts exist only once JAX runs, and this module stays JAX-free."""
    from sharding.mesh import resolve_sizes

    try:
        return resolve_sizes({k: getattr(mesh, k) for k in MESH_AXES}, num_devices)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_for_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Checks that need the device count; returns the resolved mesh shape."""
    src = cfg.source or "<config>"
    sizes = resolve_mesh_shape(cfg.mesh, num_devices, where=f"{src}: mesh")
    dp = sizes["data"] * sizes["fsdp"]
    mb = cfg.train.micro_batch or cfg.train.global_batch
    # an RL config's global_batch counts prompts, not rows: its algorithm checks its own row counts
    rows = getattr(type(cfg.algorithm), "global_batch_counts", "rows") == "rows"
    if rows and mb % dp:
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
    if cfg.data.seq_len > m.max_seq_len:
        origin = f" (max_position_embeddings of {m.hf_path}/config.json)" if m.hf_path else ""
        raise ConfigError(f"{src}: data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}{origin}")
    if cfg.data.pack_pairs and packed_pair_len(cfg.data) > m.max_seq_len:
        origin = f" (max_position_embeddings of {m.hf_path}/config.json)" if m.hf_path else ""
        raise ConfigError(f"{src}: data.pack_pairs: packed pair rows are 2 * data.seq_len = {packed_pair_len(cfg.data)} "
                          f"tokens, more than model.max_seq_len={m.max_seq_len}{origin}; halve data.seq_len or leave "
                          "data.pack_pairs off")
    sp = sizes["sequence"]
    if sp > 1:
        # mesh.sequence > 1 runs ring attention (the model picks it from the mesh); its zigzag layout
        # splits each row into 2*sequence chunks.
        if cfg.data.seq_len % (2 * sp):
            raise ConfigError(f"{src}: data.seq_len={cfg.data.seq_len} must be divisible by 2*mesh.sequence={2 * sp} "
                              "(ring attention's zigzag layout)")
    return sizes


def to_dict(cfg) -> dict:
    """The config as plain data (YAML/JSON-safe); which keys were explicit is not part of it."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        data.pop("explicit", None)
    return data


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    data = to_dict(cfg)
    data.pop("source", None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
