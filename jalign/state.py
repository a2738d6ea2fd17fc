"""The typed train state and what derives it from a model's declarations: optimizer, schedule, shardings.

    trained = TrainedModel(decls, cfg.optim, total_updates, mesh, rules)
    state = trained.new_state(params, rng)          # TrainState(step, params, opt_state, rng, extra)
    abstract = trained.abstract_state()             # the same tree of ShapeDtypeStructs with shardings

``extra`` holds what an algorithm keeps beside the trained model (PPO's critic and adaptive KL coefficient);
it is checkpointed with the rest. Frozen models are never in the train state (see ``jalign.roles``).

``optim.offload_state: true`` keeps the optimizer's params-shaped state (Adam's moments) in the devices' pinned
host memory (``memory_kind="pinned_host"``): the train step copies it to device memory for the update only
(:meth:`TrainedModel.opt_to_device`, after the gradients exist) and its output sharding puts the new state back,
so the forward and backward passes run without the moments on the device.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.config import OptimConfig
from jalign.models import params as params_lib


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 [] updates applied so far
    params: Any  # the trained parameters (a pytree)
    opt_state: Any
    rng: Any  # uint32 [2]
    extra: Any = flax.struct.field(default_factory=dict)


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


def adam_count(opt_state):
    """The optimizer's own update count (advances only on applied updates), for the LR metric."""
    for leaf in jax.tree.leaves(opt_state):
        if leaf.shape == () and jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf
    return jnp.zeros((), jnp.int32)


def rng_words(key) -> jax.Array:
    """The two uint32 words a train state keeps of a JAX key."""
    return jax.random.key_data(key).astype(jnp.uint32).reshape(-1)[-2:]


# ---- one trained model --------------------------------------------------------------------------
class TrainedModel:
    """A model that is trained: its declarations, optimizer (with schedule) and state shardings.

    ``total_updates`` sizes the schedule (optimizer updates over the run, e.g. ``train.steps`` for a
    supervised algorithm, steps x epochs x minibatches for PPO).
    """

    def __init__(self, decls: dict, optim: OptimConfig, total_updates: int, mesh: Mesh, rules, param_dtype):
        self.decls, self.mesh, self.rules = decls, mesh, rules
        self.param_dtype = param_dtype
        self.schedule = make_schedule(optim, total_updates)
        self.optimizer = make_optimizer(optim, total_updates)
        self.param_shardings = params_lib.param_shardings(decls, mesh, rules)
        opt_abstract = jax.eval_shape(self.optimizer.init, params_lib.abstract_params(decls, param_dtype))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.opt_device_shardings = params_lib.shardings_like_params(opt_abstract, self.param_shardings, mesh)
        self.offload_state = bool(getattr(optim, "offload_state", False))
        if self.offload_state:  # the params-shaped parts (moments) in host memory; step counts stay on device
            host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), self.param_shardings)
            self.opt_shardings = params_lib.shardings_like_params(opt_abstract, host, mesh)
        else:
            self.opt_shardings = self.opt_device_shardings

    def opt_to_device(self, opt_state):
        """Inside the train step: the optimizer state in device memory (a no-op unless it is offloaded)."""
        if not self.offload_state:
            return opt_state
        return jax.tree.map(jax.device_put, opt_state, self.opt_device_shardings)

    def shardings(self, extra=None) -> TrainState:
        r = self.replicated
        return TrainState(step=r, params=self.param_shardings, opt_state=self.opt_shardings, rng=r,
                          extra=extra if extra is not None else {})

    def abstract_state(self, extra=None) -> TrainState:
        params = params_lib.abstract_params(self.decls, self.param_dtype)
        tree = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(self.optimizer.init, params),
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32), extra={})
        out = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, self.shardings())
        return out.replace(extra=extra if extra is not None else {})

    def init_opt_state(self, params):
        return jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)

    def new_state(self, params, rng, extra=None) -> TrainState:
        """A fresh state around (already sharded) params; the optimizer state is created sharded."""
        return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated), params=params,
                          opt_state=self.init_opt_state(params),
                          rng=jax.device_put(rng_words(rng), self.replicated), extra=extra or {})

    def update_phase_programs(self, name: str) -> dict:
        """For ``jalign plan``: with the optimizer state offloaded, the update phase of the train step ``name``
        as a program of its own (params, gradients and the moments copied in, all on the device), since the
        step's peak is then the larger of its gradient phase and this."""
        if not self.offload_state:
            return {}
        from jalign.abstract import Program, with_shardings

        params = with_shardings(params_lib.abstract_params(self.decls, self.param_dtype), self.param_shardings)
        opt = with_shardings(jax.eval_shape(self.optimizer.init, params), self.opt_device_shardings)

        def update(params, grads, opt_state):
            updates, new_opt = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        fn = jax.jit(update, out_shardings=(self.param_shardings, self.opt_device_shardings), donate_argnums=(0, 2))
        return {name: Program(fn, (params, params, opt), uses=("params",), plan_only=True,
                                          note="update phase: the offloaded moments copied in")}
