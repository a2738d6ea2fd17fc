"""Abstract construction of a run: every jitted program with arguments made of shapes, dtypes and shardings
only (``jax.ShapeDtypeStruct``), nothing read beyond what fixes a shape. ``jalign plan`` compiles them.

    rt = Runtime(cfg, mesh, rules, run_dir, abstract=True)     # algorithms read no data, load no weights
    algo = resolve(cfg.algorithm.name)(rt)
    for name, prog in algo.programs().items():                   # {name: Program(fn, args, uses, ...)}
        compiled = prog.fn.lower(*prog.resolve_args(outputs)).compile()

What abstract mode assumes where the real run would read data (each is a bound, so a plan is an upper
estimate of what the data can ask for): batches are ``train.global_batch`` / ``train.micro_batch`` rows of
``data.seq_len`` tokens (what the data pipeline always produces: fixed shapes); RL prompts and the held-out
prompts of the generation-based evaluation are ``data.seq_len - max_new_tokens`` tokens long (the longest a
prompt may be before its answer no longer fits a row), all of them distinct (the samples of one prompt share
its pages in the rollout engine, different prompts do not), and every generation runs to its longest length
(the widest decode window of the engine).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

INT_FIELDS = ("tokens", "targets", "positions", "segment_ids", "index")


@dataclasses.dataclass
class Program:
    """One jitted program of a run, with its abstract arguments.

    ``args``: a tuple of abstract pytrees, or a callable ``args(outputs)`` of the abstract outputs of the
    programs before it (``{name: pytree of ShapeDtypeStruct with the compiled output shardings}``), for a
    program fed by another one's results (RL scoring reads the rollout). ``uses``: the run's persistent
    buffers among the arguments (``"params"``, ``"opt_state"``, ``"role:reference"``, ...; see
    :func:`persistent_buffers`): the plan adds every other persistent buffer that sits on the devices
    meanwhile. ``releases``: buffers the run frees after this program (a reference whose log-probs were
    precomputed). ``plan_only``: not a program of the run itself but a phase of one (the optimizer update
    with host-offloaded moments copied in).
    """

    fn: Any
    args: Union[tuple, Callable[[dict], tuple]]
    uses: tuple = ()
    releases: tuple = ()
    plan_only: bool = False
    note: str = ""
    rules: Optional[dict] = None  # the logical-axis rules it is traced under (default: the run's)
    sampler: Optional["SamplerRequest"] = None  # a generation: what it samples (the engine plans it, see below)
    slots: int = 0  # an engine program: its slots (all shards)

    def resolve_args(self, outputs: dict) -> tuple:
        return self.args(outputs) if callable(self.args) else self.args


# ---- stand-ins for what abstract mode does not read ----------------------------------------------
class StandInTokenizer:
    """The ids a program's shapes need when the tokenizer files are not here (pad 0, one end token)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = self.id_limit = vocab_size
        self.pad_id, self.eos_id = 0, max(vocab_size - 1, 0)
        self.eos_ids = frozenset({self.eos_id})
        self.path = None

    def __repr__(self) -> str:
        return f"StandInTokenizer(vocab_size={self.vocab_size})"


def abstract_tokenizer(model_cfg):
    """The configured tokenizer when its files are here (its ids and vocabulary are checked), else a
    stand-in: a tokenizer fixes no shape."""
    from pathlib import Path

    from jalign.data.tokenizer import load_tokenizer

    spec = model_cfg.tokenizer
    if spec == "byte" or Path(spec).expanduser().exists():
        return load_tokenizer(spec)
    return StandInTokenizer(model_cfg.vocab_size)


def prompt_bound(seq_len: int, max_new_tokens: int, given: Optional[int] = None) -> int:
    """The longest prompt abstract mode assumes: ``given`` (``jalign plan --prompt-len``), else the rest of a
    row after the answer (the longest prompt the data may hold)."""
    bound = max(seq_len - max_new_tokens, 1)
    if given is None:
        return bound
    if not 1 <= given <= bound:
        from jalign.config import ConfigError

        raise ConfigError(f"--prompt-len {given}: must be in [1, data.seq_len - max_new_tokens = {bound}]")
    return given


class AbstractData:
    """What a supervised algorithm asks of its data in abstract mode (no file is read)."""

    def __init__(self, cfg, prompt_len: Optional[int] = None):
        self.cfg, self.prompt_len = cfg, prompt_len
        self.has_eval = bool(cfg.data.eval)
        self.counts: dict = {}
        n = getattr(cfg.algorithm, "num_attributes", 1)
        self.attribute_names = [f"attribute_{i}" for i in range(n)]

    @property
    def longest(self) -> int:
        """The longest example a split may hold: a whole row."""
        return self.cfg.data.seq_len

    def eval_examples(self) -> list:
        """Held-out prompts of the longest length, for the shapes of the generation-based evaluation."""
        if not self.cfg.data.eval or self.cfg.eval.prompts <= 0:
            return []
        P = prompt_bound(self.cfg.data.seq_len, self.cfg.eval.max_new_tokens, self.prompt_len)
        return [([0] * P, None)] * self.cfg.eval.prompts


def dummy_prompts(n: int, length: int):
    from jalign.data.prompts import PromptSet

    return PromptSet.from_pairs([([0] * length, None)] * n)


# ---- abstract arrays -----------------------------------------------------------------------------
def with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def to_memory_kind(tree, kind: str):
    """Abstract arrays in another memory space of the same devices."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=a.sharding.with_memory_kind(kind)), tree)


def abstract_batch(fields: dict, mesh, rules, accum: int, rows: int, seq_len: int,
                   trailing: Optional[dict] = None) -> dict:
    """Abstract ``[accum, rows, ...]`` batch arrays of the declared ``fields`` as ``to_global_batch`` places
    them: ``batch`` -> ``rows``, ``seq`` -> ``seq_len``, other axes from ``trailing[name]`` (e.g. the 2 of a
    chosen/rejected pair); token-like fields int32, the rest float32 (as the data pipeline builds them)."""
    from jalign.algorithms.base import field_sharding

    trailing = trailing or {}
    out = {}
    for name, axes in fields.items():
        extra = list(trailing.get(name, ()))
        shape = [accum]
        for ax in axes:
            if ax not in ("batch", "seq") and not extra:
                from jalign.config import ConfigError

                raise ConfigError(f"batch field {name!r} {axes}: the size of its axis {ax!r} is not given (the "
                                  "algorithm's batch_trailing_dims); jalign plan cannot size this run")
            shape.append(rows if ax == "batch" else seq_len if ax == "seq" else extra.pop(0))
        int_like = name in INT_FIELDS or any(name.endswith("_" + f) for f in INT_FIELDS)
        out[name] = jax.ShapeDtypeStruct(tuple(shape), jnp.int32 if int_like else jnp.float32,
                                         sharding=field_sharding(mesh, rules, axes))
    return out


def abstract_params(decls, mesh, rules, dtype):
    from jalign.models import params as params_lib

    return with_shardings(params_lib.abstract_params(decls, dtype), params_lib.param_shardings(decls, mesh, rules))


# ---- roles ---------------------------------------------------------------------------------------
def abstract_roles(cfg, specs: dict, mesh, rules) -> tuple[dict, dict, frozenset]:
    """``(params, configs, offloaded)`` of the frozen models ``build_roles`` would load, as abstract arrays on
    their device shardings; architectures and score-head sizes come from the sources' config files only."""
    from jalign.models import load
    from jalign.models import params as params_lib
    from jalign.models import transformer as tfm
    from jalign.roles import POLICY_INIT, _source_score_outputs, role_architecture, role_source

    params, configs, offloaded = {}, {}, set()
    for name, spec in specs.items():
        key, spec_str = role_source(cfg, name, spec)
        if spec_str is None:
            continue
        if spec_str == POLICY_INIT:
            mcfg, source = cfg.model, None
        else:
            source = load.parse_source(spec_str, where=key)
            mcfg = role_architecture(cfg, source, key)
        outputs = spec.score_outputs
        if outputs < 0:
            outputs = _source_score_outputs(source, key, spec.what or name) if source is not None else 1
        decls = tfm.declare_params(mcfg, lm_head=spec.lm_head, score_outputs=outputs)
        params[name] = abstract_params(decls, mesh, rules, params_lib.DTYPES[mcfg.param_dtype])
        configs[name] = mcfg
        if name in cfg.roles and cfg.roles[name].offload:
            offloaded.add(name)
    return params, configs, frozenset(offloaded)


# ---- the run's persistent buffers ----------------------------------------------------------------
def state_buffers(state) -> dict:
    """{name: abstract tree} of a train state's parts: params, opt_state, and each entry of ``extra``
    (PPO's critic as ``critic`` and ``critic_opt_state``)."""
    out = {"params": state.params, "opt_state": state.opt_state,
           "counters": {"step": state.step, "rng": state.rng}}
    for k, v in (state.extra or {}).items():
        if isinstance(v, dict) and "params" in v and "opt_state" in v:
            out[k] = v["params"]
            out[f"{k}_opt_state"] = v["opt_state"]
        else:
            out["counters"][k] = v
    return out


def persistent_buffers(state, roles: dict, offloaded: frozenset) -> dict:
    """Every buffer that lives across programs: the train state's parts and the frozen roles (``role:NAME``),
    roles parked in host memory when offloaded."""
    out = state_buffers(state)
    for name, tree in roles.items():
        out[f"role:{name}"] = to_memory_kind(tree, "pinned_host") if name in offloaded else tree
    return out


def state_uses(state) -> tuple:
    return tuple(state_buffers(state))


# ---- bytes ---------------------------------------------------------------------------------------
def _leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def _itemsize(dtype) -> int:
    try:
        return jnp.dtype(dtype).itemsize
    except TypeError:  # a typed PRNG key
        return 8


def shard_bytes(x) -> int:
    """Bytes of one device's shard of an abstract (or real) array: the largest shard under its sharding."""
    sharding = getattr(x, "sharding", None)
    shape = tuple(x.shape)
    if isinstance(sharding, NamedSharding):
        shape = sharding.shard_shape(shape)
    return int(np.prod(shape, dtype=np.int64)) * _itemsize(x.dtype)


def memory_kind(x) -> str:
    sharding = getattr(x, "sharding", None)
    return getattr(sharding, "memory_kind", None) or "device"


def per_device_bytes(tree) -> dict:
    """{"device": bytes, "host": bytes} of one device's shards of every leaf (host = pinned/unpinned host)."""
    out = {"device": 0, "host": 0}
    for x in _leaves(tree):
        out["device" if memory_kind(x) == "device" else "host"] += shard_bytes(x)
    return out


def per_process_bytes(tree, devices_per_process: int) -> dict:
    """Bytes per (simulated) process: ``{"total": the process's devices' shards summed, "largest_leaf": the
    largest distinct-slice share of one leaf (what a loader stages on the host at once)}``, maximised over
    processes. Process p holds devices with ids ``[p*K, (p+1)*K)`` (``sharding.mesh`` fills the fast mesh
    axes with consecutive devices, i.e. inside a host)."""
    totals, largest = {}, {}
    for x in _leaves(tree):
        sharding = getattr(x, "sharding", None)
        item = _itemsize(x.dtype)
        if not isinstance(sharding, NamedSharding):
            continue
        distinct = {}
        for device, idx in sharding.devices_indices_map(tuple(x.shape)).items():
            p = device.id // devices_per_process
            n = int(np.prod([len(range(*s.indices(d))) for s, d in zip(idx, x.shape)], dtype=np.int64)) * item
            totals[p] = totals.get(p, 0) + n
            distinct.setdefault(p, {})[tuple((s.start, s.stop) for s in idx)] = n
        for p, slices in distinct.items():
            largest[p] = max(largest.get(p, 0), sum(slices.values()))
    return {"total": max(totals.values(), default=0), "largest_leaf": max(largest.values(), default=0)}


# ---- generation programs -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerRequest:
    """What one generation call of a run samples (``rollout.experience.sample``): ``batch`` rows, ``num_samples``
    consecutive rows per prompt, prompts of ``prompt_len`` tokens (the prompt block), up to ``max_new_tokens``
    new tokens in a response block of ``new_len``."""

    params: Any
    cfg: Any
    mesh: Any
    rules: Any
    batch: int
    prompt_len: int
    new_len: int
    max_new_tokens: int
    num_samples: int = 1
    top_k: int = 0
    top_p: float = 1.0
    num_end_ids: int = 1


def batch_parallel(mesh, rules) -> int:
    """The data-parallel size: devices the logical "batch" axis is split over (the engine adapter's own count)."""
    from jalign.rollout.adapter import batch_parallel as engine_dp

    return engine_dp(mesh, rules)


def generate_program(params, cfg, mesh, rules, *, batch: int, prompt_len: int, new_len: int, top_k: int = 0,
                     top_p: float = 1.0, num_end_ids: int = 1, uses=("params",), note: str = "",
                     max_new_tokens: Optional[int] = None, num_samples: int = 1) -> Program:
    """The jitted sampler ``jalign.generate`` runs for ``batch`` prompts of ``prompt_len`` tokens and ``new_len``
    response slots (KV cache of ``prompt_len + new_len``), with its abstract arguments as ``generate`` places
    them (prompt block batch-sharded when the batch divides the data-parallel size). Under ``rollout.engine``
    the plan replaces it by the engine's programs for the same request (:func:`engine_programs`)."""
    from jax.sharding import PartitionSpec

    from jalign import generate as gen
    from sharding.rules import logical_to_spec

    fn = gen._compiled(cfg, mesh, rules, new_len=new_len, top_k=int(top_k), use_top_p=top_p < 1.0)
    spec = logical_to_spec(("batch",), rules)
    sharding = NamedSharding(mesh, spec if batch % batch_parallel(mesh, rules) == 0 else PartitionSpec())
    block = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    prompt = (block(jnp.int32, batch, prompt_len), block(jnp.int32, batch, prompt_len),
              block(jnp.int32, batch, prompt_len), block(jnp.int32, batch), block(jnp.bool_, batch))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    ends = jax.ShapeDtypeStruct((gen._pow2(num_end_ids, 4),), jnp.int32)
    args = (params, *prompt, key, scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.int32),
            scalar(jnp.bool_), ends, scalar(jnp.int32))
    request = SamplerRequest(params, cfg, mesh, rules, batch, prompt_len, new_len,
                             new_len if max_new_tokens is None else max_new_tokens, num_samples, int(top_k),
                             float(top_p), num_end_ids)
    return Program(fn, args, uses=uses, note=note, rules=rules, sampler=request)


def layout_key(name: str) -> str:
    """Where a generation's output layout is kept among the outputs when the engine plans it."""
    return f"{name}:layout"


def sampler_output(outputs: dict, name: str, program: Program) -> dict:
    """What ``rollout.experience.sample`` returns for the generation ``name``: the static sampler's outputs plus
    the prompt block it was given, or, when the engine was planned, the engine's layout (the same keys: the
    rollout layout ``jalign.rollout.experience.rollout_rows`` reads)."""
    if layout_key(name) in outputs:
        return outputs[layout_key(name)]
    args = program.resolve_args(outputs)
    return dict(outputs[name], prompt_tokens=args[1], prompt_positions=args[2], prompt_segment_ids=args[3],
                prompt_lengths=args[4])


# ---- the rollout engine's programs ---------------------------------------------------------------
def engine_requests(req: SamplerRequest) -> list:
    """The requests ``rollout.experience.sample`` hands the engine for ``req``: one per row, the ``num_samples``
    rows of a prompt with the same prompt (they share its pages), different prompts otherwise."""
    from jalign.rollout.engine import Request

    V, K = req.cfg.vocab_size, max(req.num_samples, 1)
    ends = tuple(range(req.num_end_ids))  # only how many there are fixes a shape
    return [Request(prompt=[(b // K) % V] * req.prompt_len, max_new_tokens=req.max_new_tokens, top_k=req.top_k,
                    top_p=req.top_p, end_ids=ends, stream=b) for b in range(req.batch)]


def _rows_array(mesh, rules, shape, dtype):
    """An abstract host-fed engine input as ``programs.device_put_tree`` places it (rows over "batch")."""
    from jalign.rollout.programs import array_sharding

    axes = ("batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=array_sharding(mesh, rules, axes, shape))


def engine_programs(name: str, req: SamplerRequest, rollout, *, uses=("params",), note: str = "",
                    split_layers: Optional[bool] = None) -> tuple[dict, dict]:
    """The programs the rollout engine (``rollout.engine``, ``jalign.rollout``) runs for ``req``: its largest
    refill (admission + chunked prefill into the page pool) as ``NAME_prefill`` and its widest decode as
    ``NAME``, each with the engine's device state (the page pools ``[DP, L, KV, pages, page_size, hd]``, the
    slot tables and logits) as its donated argument, with the slots, pool and call shapes ``Engine.run``
    would pick for these requests (``Engine.largest_calls``); and the layout the sampler returns (what the
    programs after it read). ``split_layers``: the engine's own default when None (on for CPU devices)."""
    from jalign.config import ConfigError
    from jalign.rollout import programs as rp
    from jalign.rollout.adapter import default_slots, device_rows
    from jalign.rollout.engine import Engine

    mesh, rules, cfg = req.mesh, req.rules, req.cfg
    slots = rollout.slots or default_slots(req.batch, batch_parallel(mesh, rules))
    try:
        eng = Engine(None, cfg, slots=slots, page_size=rollout.page_size, steps_per_call=rollout.steps_per_call,
                     prefix_sharing=rollout.prefix_sharing, sampler=rollout.sampler, mesh=mesh, rules=rules,
                     split_layers=split_layers)
        lay, R, width = eng.largest_calls(engine_requests(req))
    except ValueError as e:
        raise ConfigError(f"rollout (slots={slots}, page_size={rollout.page_size}): {e}") from None
    progs = rp.programs(cfg, lay, mesh, rules)
    state = with_shardings(rp.state_shapes(lay, cfg), progs.state_sharding)
    S, E, rows = lay.num_slots, lay.end_width, lay.dp * R
    a = lambda shape, dtype: _rows_array(mesh, rules, shape, dtype)  # noqa: E731
    i32, f32 = jnp.int32, jnp.float32
    adm = {"admit": a((S,), jnp.bool_), "table": a((S, lay.max_pages), i32), "length": a((S,), i32),
           "temperature": a((S,), f32), "greedy": a((S,), jnp.bool_), "top_k": a((S,), i32), "top_p": a((S,), f32),
           "min_new": a((S,), i32), "max_new": a((S,), i32), "ends": a((S, E), i32),
           "key": a((S,) + tuple(lay.key_shape), jnp.uint32), "stream": a((S,), i32)}
    prefill = {"tokens": a((rows, lay.chunk), i32), "positions": a((rows, lay.chunk), i32),
               "valid": a((rows, lay.chunk), jnp.bool_), "table": a((rows, lay.prompt_pages), i32),
               "target": a((rows,), i32), "last": a((rows,), i32)}
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    pool = f"{S} slots ({lay.slots} per shard), a pool of {lay.pages} pages x {lay.page_size} tokens per shard"
    progs_out = {
        f"{name}_prefill": Program(progs.refill_fn, (state, req.params, adm, prefill), uses=uses, rules=rules,
                                   note=f"engine: {pool}; {R} prefill rows x {lay.chunk} per shard", slots=S),
        name: Program(progs.decode_fn(width), (state, req.params, scalar(i32), scalar(jnp.bool_)), uses=uses,
                      rules=rules, note=f"engine: {pool}; decode over {width * lay.page_size} positions"
                      + (f" ({note})" if note else ""), slots=S)}
    B, N, P = device_rows(req.batch, mesh, rules), max(req.new_len, req.max_new_tokens), req.prompt_len
    layout = {"tokens": a((B, N), i32), "logprobs": a((B, N), f32), "logprobs_tempered": a((B, N), f32),
              "lengths": a((B,), i32), "ended_with_eos": a((B,), jnp.bool_), "prompt_tokens": a((B, P), i32),
              "prompt_positions": a((B, P), i32), "prompt_segment_ids": a((B, P), i32), "prompt_lengths": a((B,), i32)}
    return progs_out, layout


def expand_generations(programs: dict, rollout, split_layers: Optional[bool] = None) -> tuple[dict, dict]:
    """``programs`` with every generation (a program with a ``sampler`` request) replaced by the engine's
    programs when ``rollout.engine`` is on; and the engine layouts to seed the outputs with."""
    out, layouts = {}, {}
    for name, p in programs.items():
        if p.sampler is None or not rollout.engine:
            out[name] = p
            continue
        progs, layouts[layout_key(name)] = engine_programs(name, p.sampler, rollout, uses=p.uses, note=p.note,
                                                           split_layers=split_layers)
        out.update(progs)
    return out, layouts


def generation_eval_programs(geval, params, cfg, roles: dict, configs: dict, prefix: str = "eval") -> dict:
    """The generation-based evaluation's programs: the sampler for one chunk of held-out prompts and the
    scoring program (KL to the reference, reward model) on its output."""
    rt = geval.rt
    gen = generate_program(params, cfg, rt.mesh, rt.rules, batch=geval.chunk, prompt_len=geval.P, new_len=geval.N,
                           num_end_ids=len(getattr(geval.tokenizer, "eos_ids", ())) or 1,
                           max_new_tokens=rt.cfg.eval.max_new_tokens,
                           note=f"{geval.chunk} held-out prompts x {geval.P} + {geval.N} slots")
    progs = {f"{prefix}_generate": gen}
    ref = roles.get(geval.kl_role) if geval.kl_role else None
    rms = {n: roles[n] for n in geval.model_roles if n in roles}  # the reward models among the reward terms
    rm_cfgs = tuple((n, configs.get(n)) for n in rms)
    score = geval._program(cfg, configs.get(geval.kl_role) if ref is not None else None, rm_cfgs)
    uses = ("params",) + ((f"role:{geval.kl_role}",) if ref is not None else ()) + tuple(f"role:{n}" for n in rms)
    name = f"{prefix}_generate"
    progs[f"{prefix}_score"] = Program(score, lambda outs: (params, ref, rms, sampler_output(outs, name, gen)),
                                       uses=uses)
    return progs
