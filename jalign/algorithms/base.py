"""What every algorithm shares: the registry, the run context, train state, optimizer and the jitted
supervised step (gradient accumulation, clipping, skip-on-non-finite).

An algorithm is a small object with ``init(rng)``, ``abstract_state()``, ``step(state, host_batch)``,
``evaluate(state)``, ``batches(split)`` and ``export(state, out_dir)``; the loop in
``jalign.trainer`` calls only these.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.config import Config, OptimConfig
from jalign.losses import chunked_token_logps
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from sharding.rules import logical_to_spec

ALGORITHMS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        ALGORITHMS[name] = cls
        return cls

    return deco


# Built-in algorithms live in modules named after them and register themselves on import.
BUILTIN_MODULES = {"sft": "sft", "reward": "reward", "dpo": "dpo", "ppo": "ppo", "grpo": "ppo", "rloo": "ppo"}


def get_algorithm(name: str):
    if name not in ALGORITHMS and name in BUILTIN_MODULES:
        importlib.import_module(f"jalign.algorithms.{BUILTIN_MODULES[name]}")
    return ALGORITHMS[name]


@dataclasses.dataclass
class Runtime:
    """Everything an algorithm may need from the run, built by the loop."""

    cfg: Config
    mesh: Mesh
    rules: dict
    run_dir: Path
    tokenizer: Any = None
    log: Callable[[str], None] = print

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]


class Algorithm(Protocol):
    def init(self, rng: jax.Array) -> dict: ...
    def abstract_state(self) -> dict: ...
    def step(self, state: dict, batch: dict) -> tuple[dict, dict]: ...
    def evaluate(self, state: dict) -> dict: ...
    def batches(self, split: str): ...
    def export(self, state: dict, out_dir: str) -> None: ...


# ---- optimizer ----------------------------------------------------------------------------------
def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio``, or constant."""
    warm = max(o.warmup_steps, 0)
    decay_steps = max(total_steps - warm, 1)
    end = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        after = optax.constant_schedule(o.lr)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(o.lr / warm, o.lr, warm - 1 or 1), after], [warm])


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(o, total_steps)
    parts = []
    if o.grad_clip:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=_decay_mask_from_paths))
    return optax.chain(*parts)


def _decay_mask_from_paths(params):
    """Decay every parameter except norm scales and biases (decided by name, stacked layers included)."""

    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


# ---- state --------------------------------------------------------------------------------------
def state_shardings(decls, optimizer, mesh: Mesh, rules) -> dict:
    p_shard = params_lib.param_shardings(decls, mesh, rules)
    abstract = params_lib.abstract_params(decls)
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "step": replicated,
        "params": p_shard,
        "opt_state": params_lib.shardings_like_params(opt_abstract, p_shard, mesh),
        "rng": replicated,
    }


def abstract_state(decls, optimizer, shardings, param_dtype=jnp.float32) -> dict:
    params = params_lib.abstract_params(decls, param_dtype)
    opt = jax.eval_shape(optimizer.init, params)
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt,
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def init_state(params, optimizer, shardings, rng) -> dict:
    """Train state from (already sharded) params; the optimizer state is created sharded."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    return {
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.device_put(jax.random.key_data(rng).astype(jnp.uint32).reshape(-1)[-2:], shardings["rng"]),
    }


# ---- batches ------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, rules, ndim: int, leading_accum: bool = True) -> NamedSharding:
    """[accum, rows, seq, ...]: rows over the data-parallel axes, seq over "sequence"."""
    axes = (None, "batch", "seq") if leading_accum else ("batch", "seq")
    axes = axes + (None,) * (ndim - len(axes))
    return NamedSharding(mesh, logical_to_spec(axes[:ndim], rules))


def to_global_batch(host_batch: dict, mesh: Mesh, rules, accum: int) -> dict:
    """Process-local numpy rows [rows_local, ...] -> global arrays [accum, rows_global/accum, ...].

    Each process holds ``rows_local = accum * micro_local`` rows; row ``a*micro_local + i`` goes to
    accumulation step ``a``. Assembled with ``make_array_from_process_local_data`` so it is correct on
    several hosts (each contributes its own slice of every micro-batch).
    """
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        local = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
        sharding = batch_sharding(mesh, rules, local.ndim)
        global_shape = (accum, local.shape[1] * jax.process_count()) + local.shape[2:]
        out[k] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


# ---- the supervised step ------------------------------------------------------------------------
LossFn = Callable[[Any, dict, dict, Any], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, normalizers_fn: Callable[[dict], dict], optimizer, schedule,
                    shardings: dict, mesh: Mesh, frozen_shardings=None):
    """Jitted ``(state, batch, frozen) -> (state, metrics)`` with gradient accumulation.

    ``batch`` leaves are [accum, micro, ...]. ``normalizers_fn(batch)`` computes global counts (valid
    tokens / pairs) over the whole optimizer batch; ``loss_fn(params, micro_batch, normalizers,
    frozen)`` returns a loss already divided by those counts, so summing over micro-batches gives the
    big-batch loss and gradient exactly. A non-finite loss or gradient norm skips the update
    (params and optimizer state unchanged) and reports ``skipped = 1``.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state, batch, frozen):
        norms = normalizers_fn(batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro(carry, mb):
            g_acc, m_acc = carry
            (_, metrics), grads = grad_fn(state["params"], mb, norms, frozen)
            return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, m_acc, metrics)), None

        first = jax.tree.map(lambda x: x[0], batch)
        metric_shapes = jax.eval_shape(lambda: loss_fn(state["params"], first, norms, frozen)[1])
        zeros = (jax.tree.map(jnp.zeros_like, state["params"]),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (grads, metrics), _ = jax.lax.scan(micro, zeros, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # An update that overflows the params (an absurd step on finite gradients) is skipped too, so
        # a non-finite streak never starts from parameters that were already ruined.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        count = _adam_count(state["opt_state"])
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "rng": state["rng"],
        }
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(count), skipped=1 - finite.astype(jnp.int32))
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, None, frozen_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def _adam_count(opt_state):
    """The optimizer's own update count (advances only on applied updates), for the LR metric."""
    for leaf in jax.tree.leaves(opt_state):
        if leaf.shape == () and jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf
    return jnp.zeros((), jnp.int32)


# ---- parameters from another run ----------------------------------------------------------------
def merge_params(decls, source: dict, rng, mesh: Mesh, rules, dtype=jnp.float32, log=print) -> dict:
    """Params for ``decls`` taking every matching (path, shape) tensor from ``source``; the rest random.

    Used to start a reward model or critic from an SFT policy (trunk copied, fresh score head) and a
    policy from a checkpoint that also has heads it does not need.
    """
    shardings = params_lib.param_shardings(decls, mesh, rules)
    fresh = params_lib.init_params(decls, rng, dtype, shardings)
    src, fresh_flat, shard_flat = params_lib.flatten(source), params_lib.flatten(fresh), params_lib.flatten(shardings)
    out, missing = {}, []
    for path, d in params_lib.flatten_decls(decls).items():
        if path in src and tuple(src[path].shape) == tuple(d.shape):
            out[path] = _place(src[path], dtype, shard_flat[path])
        else:
            out[path] = fresh_flat[path]
            missing.append(path)
    if missing:
        log(f"initialised fresh (not in the source checkpoint): {', '.join(missing)}")
    return params_lib.unflatten(out)


def _place(value, dtype, sharding):
    """A source tensor onto ``sharding``. Host-local values (numpy, single-device arrays from
    ``load_params``) go through numpy: ``device_put`` of a single-device jax.Array onto a sharding that
    spans several processes is an error, while the same numpy value on every process is not."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.device_put(value.astype(dtype), sharding)
    return jax.device_put(np.asarray(jax.device_get(value)).astype(np.dtype(dtype)), sharding)


# ---- what policy-style algorithms share ---------------------------------------------------------
def initial_params(rt: Runtime, decls, rng, log=print) -> dict:
    """Params for ``decls`` from ``model.init_from`` (a jalign run), ``model.hf_path`` or random init."""
    m = rt.cfg.model
    dtype = params_lib.DTYPES[m.param_dtype]
    if m.init_from:
        from jalign.models.hf_io import load_params_checkpoint

        source = load_params_checkpoint(m.init_from, m)  # a training run dir or a `jalign convert` dir
        return merge_params(decls, source, rng, rt.mesh, rt.rules, dtype, log)
    if m.hf_path:
        from jalign.models.hf_io import load_hf_params

        source = load_hf_params(m.hf_path, m, mesh=rt.mesh, rules=rt.rules, dtype=dtype)
        return merge_params(decls, source, rng, rt.mesh, rt.rules, dtype, log)
    shardings = params_lib.param_shardings(decls, rt.mesh, rt.rules)
    return params_lib.init_params(decls, rng, dtype, shardings)


def new_train_state(rt: Runtime, decls, optimizer, shardings, rng) -> dict:
    """A fresh train state: params from ``initial_params``, optimizer state created sharded like them."""
    k_params, k_state = jax.random.split(rng)
    params = initial_params(rt, decls, k_params, log=rt.log)
    return init_state(params, optimizer, shardings, k_state)


class TrainedOnData:
    """What SFT, reward-model and DPO training share: one trained model (``self.decls``,
    ``self.optimizer``, ``self.shardings``) fed by a data pipeline (``self.data``) in ``self.accum``
    micro-batches per step."""

    def setup_training(self, rt: Runtime, decls: dict) -> None:
        """Runtime, tokenizer, the trained model's declarations, optimizer (with its schedule) and the
        state shardings, from the config; subclasses then build their step functions and data."""
        from jalign.data.tokenizer import load_tokenizer

        cfg = rt.cfg
        self.rt = rt
        self.tokenizer = rt.tokenizer or load_tokenizer(cfg.model.tokenizer)
        self.decls = decls
        self.accum = accumulation_steps(cfg)
        self.schedule = make_schedule(cfg.optim, cfg.train.steps)
        self.optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        self.shardings = state_shardings(decls, self.optimizer, rt.mesh, rt.rules)

    def init(self, rng):
        return new_train_state(self.rt, self.decls, self.optimizer, self.shardings, rng)

    def abstract_state(self):
        return abstract_state(self.decls, self.optimizer, self.shardings,
                              params_lib.DTYPES[self.rt.cfg.model.param_dtype])

    def batches(self, split: str):
        return self.data.train_iterator() if split == "train" else self.data.eval_iterator()

    def global_batch(self, host_batch: dict, accum: Optional[int] = None) -> dict:
        """This process's rows -> the global, sharded [accum, micro, ...] batch (default: the train
        step's ``self.accum``; evaluation passes 1)."""
        return to_global_batch(host_batch, self.rt.mesh, self.rt.rules, self.accum if accum is None else accum)


def accumulation_steps(cfg: Config) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch or cfg.train.global_batch)


def rows_per_process(cfg: Config) -> int:
    n = jax.process_count()
    if cfg.train.global_batch % n:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} is not divisible by {n} processes")
    return cfg.train.global_batch // n


LOGPROB_CHUNK = 512


def policy_token_logps(params, batch, cfg, temperature: float = 1.0):
    """log p(target_t | tokens_<=t) / T-tempered, for every position of packed rows [B, T]."""
    hidden = tfm.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg)
    return chunked_token_logps(hidden, tfm.unembed_matrix(params, cfg), batch["targets"], LOGPROB_CHUNK,
                               temperature)
