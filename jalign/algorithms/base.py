"""What every algorithm shares: the protocol the loop calls, the runtime, batch placement from declared fields
and the jitted supervised step (gradient accumulation, clipping, skip-on-non-finite).

The loop (``jalign.trainer``) calls only:

    algo = Cls(rt)                                  # reads data, builds programs; no weights yet
    specs = algo.role_specs()                       # frozen models it needs -> jalign.roles.build_roles
    state = algo.init_state(roles)                  # or a checkpoint restored onto algo.abstract_state()
    algo.start(state, roles)                        # once per run start (e.g. precompute reference columns)
    state, metrics = algo.step(state, roles, batch) # batch from algo.train_batches(); metrics stay on device
    sums = algo.eval_sums(state, roles, batch)      # {name: (sum, count)} over algo.eval_batches()
    algo.eval_finish(means), algo.generation_eval   # derived metrics; the shared generation-based eval
    algo.export(state, roles, out_dir)

A supervised algorithm (SFT, reward model, DPO, KTO, ...) is :class:`SupervisedAlgorithm` plus its loss,
normalisers and data kind: see ``jalign/algorithms/sft.py`` for the smallest one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.config import Config, ConfigError
from jalign.losses import chunked_token_logps
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.roles import RoleSpec, Roles, policy_init_seed, policy_source
from jalign.state import TrainedModel, TrainState, adam_count
from sharding.rules import active_mesh, logical_to_spec


@dataclasses.dataclass
class Runtime:
    """Everything an algorithm may need from the run, built by the loop."""

    cfg: Config
    mesh: Mesh
    rules: dict
    run_dir: Path
    tokenizer: Any = None
    log: Callable[[str], None] = print
    # Abstract mode (``jalign plan``, ``jalign train --dry-run``): build every program from shapes only; no
    # data is read, no weight is loaded (see jalign.abstract and Algorithm.programs).
    abstract: bool = False
    abstract_prompt_len: Optional[int] = None  # abstract mode: the longest prompt (default: what a row allows)

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]


# ---- batches ------------------------------------------------------------------------------------
class NotPlanned(ConfigError):
    """``jalign plan`` of an algorithm that does not list its programs: one message naming the algorithm."""


def field_sharding(mesh: Mesh, rules, axes: tuple, leading_accum: bool = True) -> NamedSharding:
    """The sharding of a batch field from its declared logical axes (plus the accumulation axis)."""
    return NamedSharding(mesh, logical_to_spec(((None,) if leading_accum else ()) + tuple(axes), rules))


def to_global_batch(host_batch: dict, fields: dict, mesh: Mesh, rules, accum: int) -> dict:
    """Process-local numpy rows [rows_local, ...] -> global arrays [accum, rows_global / accum, ...].

    ``fields`` declares each key's logical axes (``jalign.data.fields``); a key without a declaration is an
    error rather than a guess from its rank. Each process holds ``rows_local = accum * micro_local`` rows; row
    ``a*micro_local + i`` goes to accumulation step ``a``. Assembled with ``make_array_from_process_local_data``
    so it is correct on several hosts (each contributes its own slice of every micro-batch).
    """
    out = {}
    for k, v in host_batch.items():
        if k not in fields:
            raise KeyError(f"batch field {k!r} has no declared logical axes (declared: {sorted(fields)})")
        v = np.asarray(v)
        axes = fields[k]
        if v.ndim != len(axes):
            raise ValueError(f"batch field {k!r}: rank {v.ndim} but declared axes {axes}")
        local = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
        global_shape = (accum, local.shape[1] * jax.process_count()) + local.shape[2:]
        out[k] = jax.make_array_from_process_local_data(field_sharding(mesh, rules, axes), local, global_shape)
    return out


def accumulation_steps(cfg: Config) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch or cfg.train.global_batch)


def rows_per_process(cfg: Config) -> int:
    n = jax.process_count()
    if cfg.train.global_batch % n:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not divisible by {n} processes")
    return cfg.train.global_batch // n


# ---- the supervised step ------------------------------------------------------------------------
LossFn = Callable[[Any, dict, dict, Any], tuple[jax.Array, dict]]


def require_mesh_context(what: str) -> None:
    """Training programs are traced inside ``use_rules(mesh, rules)``: outside it every activation
    constraint would silently be dropped, so tracing one there is an error."""
    if active_mesh() is None:
        raise RuntimeError(f"{what} traced outside sharding.rules.use_rules(mesh, rules): activation sharding "
                           "constraints would be dropped; trace it inside the run's mesh context")


def make_train_step(loss_fn: LossFn, normalizers_fn: Callable[[dict], dict], trained: TrainedModel,
                    with_rng: bool = False, statistics_fn: Optional[Callable[[Any, Any, dict], dict]] = None):
    """Jitted ``(state, roles, batch) -> (state, metrics)`` with gradient accumulation.

    ``batch`` leaves are [accum, micro, ...]. ``normalizers_fn(batch)`` computes global counts (valid
    tokens / pairs) over the whole optimizer batch; ``loss_fn(params, micro_batch, normalizers, roles)``
    returns a loss already divided by those counts, so summing over micro-batches gives the big-batch loss
    and gradient exactly. ``statistics_fn(params, roles, batch) -> dict`` (optional) adds constants of the
    whole optimizer batch that need the current parameters (KTO's KL reference point): computed once before
    the micro-batches, without gradient, and merged into the normalisers, so they too are the same whatever
    the accumulation. A non-finite loss, gradient norm or updated parameters skip the update (params
    and optimizer state unchanged) and report ``skipped = 1``. ``roles`` (frozen params) are an input:
    never differentiated, never donated. ``with_rng`` adds ``norms["rng"]``, a key per step and micro-batch
    from the state's RNG (e.g. for LoRA dropout).
    """
    optimizer, schedule = trained.optimizer, trained.schedule
    shardings = trained.shardings()

    def step(state: TrainState, roles, batch):
        require_mesh_context("the train step")
        norms = normalizers_fn(batch)
        if statistics_fn is not None:
            norms = {**norms, **jax.lax.stop_gradient(statistics_fn(state.params, roles, batch))}
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if with_rng else None

        def micro_norms(i):
            return dict(norms, rng=jax.random.fold_in(step_key, i)) if with_rng else norms

        def micro(carry, xs):
            (g_acc, m_acc), (mb, i) = carry, xs
            (_, metrics), grads = grad_fn(state.params, mb, micro_norms(i), roles)
            return (jax.tree.map(jnp.add, g_acc, grads), jax.tree.map(jnp.add, m_acc, metrics)), None

        first = jax.tree.map(lambda x: x[0], batch)
        accum = jax.tree.leaves(batch)[0].shape[0]
        if accum == 1:  # no accumulator: zeros + g is g exactly, without materialising a zero copy of the params
            (_, metrics), grads = grad_fn(state.params, first, micro_norms(0), roles)
        else:
            metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, first, micro_norms(0), roles)[1])
            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
            (grads, metrics), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
        grad_norm = optax.tree.norm(grads)
        opt_state = trained.opt_to_device(state.opt_state)  # offloaded moments come in only now
        updates, new_opt = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # An update that overflows the params (an absurd step on finite gradients) is skipped too, so a
        # non-finite streak never starts from parameters that were already ruined.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        count = adam_count(state.opt_state)
        new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                                  opt_state=keep(new_opt, opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(count), skipped=1 - finite.astype(jnp.int32))
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, trained.replicated),
                   donate_argnums=(0,))


LOGPROB_CHUNK = 512


def policy_token_logps(params, batch, cfg, temperature: float = 1.0):
    """log p(target_t | tokens_<=t) / T-tempered, for every position of rows [B, T]."""
    hidden = tfm.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg)
    return chunked_token_logps(hidden, tfm.unembed_matrix(params, cfg), batch["targets"], LOGPROB_CHUNK,
                               temperature)


# ---- the protocol -------------------------------------------------------------------------------
class Algorithm:
    """Base of every algorithm; see the module docstring for what the loop calls.

    Subclasses are registered with ``jalign.algorithms.registry.register(name, config=...)``;
    ``role_names`` lists the roles a config may set under ``roles:`` (checked when the config loads).
    """

    name: str = ""
    config_class: type = None
    role_names: tuple = ()
    generation_eval = None  # a jalign.evaluation.GenerationEval, or None
    packs_pairs: bool = False  # takes packed pair rows (data.pack_pairs): jalign.algorithms.packed_pairs.PackedPairs

    def __init__(self, rt: Runtime):
        from jalign.data.tokenizer import check_vocab, load_tokenizer

        self.rt, self.cfg, self.a = rt, rt.cfg, rt.cfg.algorithm
        if getattr(self.cfg.data, "pack_pairs", False) and not self.packs_pairs:
            raise ConfigError(f"{self.cfg.source or '<config>'}: data.pack_pairs=true but algorithm.name={self.name} "
                              "does not take packed pair rows (they are for reward, dpo and kto); remove "
                              "data.pack_pairs (SFT-style rows pack with data.packing)")
        if rt.abstract and rt.tokenizer is None:
            from jalign.abstract import abstract_tokenizer

            rt.tokenizer = abstract_tokenizer(self.cfg.model)
        self.tokenizer = rt.tokenizer or load_tokenizer(self.cfg.model.tokenizer)
        check_vocab(self.cfg.model.vocab_size, self.tokenizer, f"{self.cfg.source or '<config>'}: model.vocab_size")

    # roles and state
    def role_specs(self) -> dict[str, RoleSpec]:
        return {}

    def init_state(self, roles: Roles) -> TrainState:
        raise NotImplementedError

    def abstract_state(self) -> TrainState:
        raise NotImplementedError

    def start(self, state: TrainState, roles: Roles) -> None:
        """Once per invocation, after the state exists and before the first step or evaluation."""

    # data and steps
    def train_batches(self):
        raise NotImplementedError

    def step(self, state: TrainState, roles: Roles, batch) -> tuple[TrainState, dict]:
        raise NotImplementedError

    def eval_batches(self):
        return ()

    def eval_sums(self, state: TrainState, roles: Roles, batch) -> dict:
        return {}

    def eval_finish(self, means: dict) -> dict:
        """Metrics derived from the reduced means (e.g. a loss that combines terms of different counts)."""
        return means

    def data_counts(self) -> dict:
        """Example counts of the data (examples / truncated / dropped per split), logged at the start."""
        return {}

    # the trained policy, for generation-based evaluation and export
    def policy(self, state: TrainState, roles: Roles):
        """(params, model config) that generation uses."""
        return state.params, self.cfg.model

    def tokenizer_dir(self) -> Optional[str]:
        path = getattr(self.tokenizer, "path", None)
        return None if path is None else str(Path(path).parent)

    def special_token_ids(self) -> dict:
        """bos/eos/pad ids of the run's tokenizer for an export's config.json (pad only when it is a
        real pad token: an EOS stand-in would make transformers treat EOS as padding)."""
        from jalign.models.hf_heads import own_pad_id

        tok = getattr(self, "tokenizer", None)
        return {"bos_token_id": getattr(tok, "bos_id", None), "eos_token_id": getattr(tok, "eos_id", None),
                "pad_token_id": own_pad_id(tok)}

    def export(self, state: TrainState, roles: Roles, out_dir: str) -> None:
        """A Hugging Face directory of the trained policy with the tokenizer files and special ids."""
        from jalign.models.hf_io import save_hf

        params, cfg = self.policy(state, roles)
        save_hf(params, cfg, out_dir, tokenizer_dir=self.tokenizer_dir(), special_ids=self.special_token_ids())

    # the run's programs, for jalign plan
    def programs(self) -> dict:
        """``{name: jalign.abstract.Program(jitted fn, abstract args, ...)}``: every jitted program the run
        executes, in run order, with arguments made of shapes and shardings only (built in abstract mode:
        ``Runtime(abstract=True)``). ``jalign plan`` compiles each and reports its memory."""
        raise NotPlanned(f"{self.cfg.source or '<config>'}: algorithm.name={self.name}: {self.plan_gap}; jalign plan "
                         "cannot size this run (plan the stage it trains with, e.g. the sft or dpo config of the "
                         "same model and batch)")

    plan_gap = "this algorithm does not list its programs (Algorithm.programs)"

    def abstract_roles(self):
        """``(params, configs, offloaded)`` of the roles this algorithm declares, as abstract arrays."""
        from jalign.abstract import abstract_roles

        return abstract_roles(self.cfg, self.role_specs(), self.rt.mesh, self.rt.rules)


def initial_policy_params(rt: Runtime, decls, *, allow_fresh=(), role: str = "policy") -> dict:
    """The trained model's starting params for ``decls`` from the policy's source, straight onto their
    shardings (strict: only ``allow_fresh`` paths may be missing from the source)."""
    from jalign.models import load

    key, source = policy_source(rt.cfg)
    return load.load_params(source, decls, mesh=rt.mesh, rules=rt.rules,
                            dtype=params_lib.DTYPES[rt.cfg.model.param_dtype], seed=policy_init_seed(rt.cfg.train.seed),
                            allow_fresh=allow_fresh, role=role, where=key, log=rt.log)


def state_rng(train_seed: int):
    """The key a fresh train state keeps (split from ``train.seed`` beside the policy's init seed)."""
    return jax.random.split(jax.random.key(train_seed))[1]


class SupervisedAlgorithm(Algorithm):
    """One trained model fed by a data pipeline in ``accum`` micro-batches per step.

    A subclass sets ``lm_head`` / ``score_outputs`` (or overrides ``declare``), ``make_data`` (a data kind
    with ``train_iterator()``, ``eval_iterator()``, ``fields``, ``counts``), ``loss`` and ``normalizers``.
    Its eval reduces each metric by the normaliser named in ``metric_counts`` (default: the first one);
    metrics in ``total_metrics`` are reported as sums.
    """

    lm_head = True
    score_outputs = 0
    allow_fresh: tuple = ()  # parameters the policy's source may lack (a new reward model's score head)
    metric_counts: dict = {}
    total_metrics: tuple = ("num_tokens", "num_pairs", "num_values", "num_examples")
    step_roles: tuple = ()  # roles the train step reads

    def __init__(self, rt: Runtime):
        super().__init__(rt)
        cfg = self.cfg
        from jalign.algorithms.trainable import Trainable

        self.trainable = Trainable(cfg.model, self.declare())
        self.decls = self.trainable.decls
        self.accum = accumulation_steps(cfg)
        self.trained = TrainedModel(self.decls, cfg.optim, cfg.train.steps, rt.mesh, rt.rules,
                                    params_lib.DTYPES[cfg.model.param_dtype])
        if rt.abstract:
            from jalign.abstract import AbstractData

            self.data = AbstractData(cfg, rt.abstract_prompt_len)
        else:
            self.data = self.make_data()
        self.fields = self.batch_fields()
        dropout = self.trainable.is_lora and cfg.model.lora.dropout > 0
        stats = self.batch_statistics()
        self._train_step = make_train_step(self._trained_loss, self.normalizers, self.trained, with_rng=dropout,
                                           statistics_fn=None if stats is None else self._trained_statistics)
        self._eval_step = jax.jit(self._eval_sums)
        from jalign.evaluation import GenerationEval, rule_reward_fn

        reward_fn = rule_reward_fn(cfg.eval.reward, "eval.reward", cfg.source or "<config>")
        if reward_fn is None or rt.abstract:
            self.generation_eval = GenerationEval.for_examples(self, self.eval_examples())
        else:
            rows = self.eval_examples(with_texts=True)
            self.generation_eval = GenerationEval.for_examples(self, [r[:2] for r in rows], [r[2] for r in rows],
                                                               reward_fn=reward_fn)

    # -- to implement --
    def declare(self) -> dict:
        return tfm.declare_params(self.cfg.model, lm_head=self.lm_head, score_outputs=self.score_outputs)

    def make_data(self):
        raise NotImplementedError

    def batch_fields(self) -> dict:
        """{batch key: logical axes} of the data's batches (``jalign.data.fields``)."""
        return self.data.fields

    def loss(self, params, mb: dict, norms: dict, roles) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def normalizers(self, batch: dict) -> dict:
        raise NotImplementedError

    def batch_statistics(self) -> Optional[Callable]:
        """None, or ``fn(params, roles, batch) -> dict``: batch constants that need the parameters (see
        :func:`make_train_step`); a subclass that uses them also computes them in its eval step."""
        return None

    def eval_examples(self, with_texts: bool = False) -> list:
        """(prompt_ids, reference answer) of held-out examples for the generation-based evaluation; with_texts:
        (prompt_ids, reference answer, prompt text)."""
        if not hasattr(self.data, "eval_examples"):
            return []
        return self.data.eval_examples(with_texts=True) if with_texts else self.data.eval_examples()

    def _trained_statistics(self, params, roles, batch):
        """``batch_statistics`` on the model's forward params (no dropout: they are constants of the batch)."""
        return self.batch_statistics()(self.trainable.forward_params(params, roles, None), roles, batch)

    def _trained_loss(self, params, mb, norms, roles):
        """``loss`` on the model's forward params (under LoRA: the frozen base with the trained adapters)."""
        return self.loss(self.trainable.forward_params(params, roles, norms.get("rng")), mb, norms, roles)

    # -- protocol --
    def role_specs(self):
        return self.trainable.role_specs()

    def init_state(self, roles):
        params = self.trainable.init_params(
            self.rt, lambda decls: initial_policy_params(self.rt, decls, allow_fresh=self.allow_fresh))
        return self.trained.new_state(params, state_rng(self.cfg.train.seed))

    def policy(self, state, roles):
        return self.trainable.forward_params(state.params, roles), self.cfg.model

    def export(self, state, roles, out_dir):
        from jalign.models.hf_io import save_hf

        save_hf(self.trainable.merged(state.params, roles), self.cfg.model, out_dir, tokenizer_dir=self.tokenizer_dir(),
                special_ids=self.special_token_ids())
        self.export_adapter(state, out_dir)

    def export_adapter(self, state, out_dir) -> None:
        """Under LoRA, also the PEFT adapter (``OUT_DIR/adapter``)."""
        if self.trainable.is_lora:
            from pathlib import Path

            self.trainable.export_adapter(state.params, str(Path(out_dir) / "adapter"), self.cfg.model.hf_path)

    def abstract_state(self):
        return self.trained.abstract_state()

    def train_batches(self):
        return self.data.train_iterator()

    def global_batch(self, host_batch: dict, accum: Optional[int] = None) -> dict:
        return to_global_batch(host_batch, self.fields, self.rt.mesh, self.rt.rules,
                               self.accum if accum is None else accum)

    def prepare_batch(self, host_batch: dict, split: str) -> dict:
        """Host-side additions to a batch before placement (precomputed columns)."""
        return host_batch

    def step_inputs(self, roles) -> dict:
        names = [*self.step_roles, *self.trainable.role_specs()]
        return roles.on_device([n for n in names if n in roles]) if names else {}

    def step(self, state, roles, batch):
        return self._train_step(state, self.step_inputs(roles), self.global_batch(self.prepare_batch(batch, "train")))

    def eval_batches(self):
        if not getattr(self.data, "has_eval", False):
            return ()
        return self.data.eval_iterator()

    def _eval_sums(self, params, roles, batch):
        require_mesh_context("the eval step")
        mb = jax.tree.map(lambda x: x[0], batch)  # drop the accumulation axis
        norms = self.normalizers(batch)
        sums = {k: jnp.ones_like(v) for k, v in norms.items()}  # divisors of 1: the loss returns sums
        if self.batch_statistics() is not None:  # the eval batch's own constants (e.g. KTO's reference point)
            sums.update(self._trained_statistics(params, roles, batch))
        _, metrics = self._trained_loss(params, mb, sums, roles)
        default = next(iter(norms))
        out = {}
        for k, v in metrics.items():  # totals (counts of tokens / pairs) are summed, not averaged
            out[k] = (v, None) if k in self.total_metrics else (v, norms[self.metric_counts.get(k, default)])
        return out

    def eval_sums(self, state, roles, batch):
        return self._eval_step(state.params, self.step_inputs(roles),
                               self.global_batch(self.prepare_batch(batch, "eval"), accum=1))

    def data_counts(self):
        return getattr(self.data, "counts", {})

    # -- the run's programs (jalign plan) --
    def abstract_batch(self, accum: int, rows: int, fields: Optional[dict] = None) -> dict:
        """Abstract ``[accum, rows, ...]`` batch of this algorithm's fields (``rows`` per accumulation step)."""
        from jalign.abstract import abstract_batch

        return abstract_batch(self.fields if fields is None else fields, self.rt.mesh, self.rt.rules, accum, rows,
                              self.cfg.data.seq_len, self.batch_trailing_dims())

    def batch_trailing_dims(self) -> dict:
        """Sizes of the batch fields' axes that are neither batch nor seq (``{name: (size, ...)}``)."""
        return {}

    def programs(self):
        from jalign.abstract import Program, generation_eval_programs, state_uses

        t = self.cfg.train
        roles, configs, _ = self.abstract_roles()
        state = self.abstract_state()
        names = [n for n in (*self.step_roles, *self.trainable.role_specs()) if n in roles]  # as step_inputs
        step_roles = {n: roles[n] for n in names}
        role_uses = tuple(f"role:{n}" for n in names)
        micro = t.micro_batch or t.global_batch
        progs = {"train_step": Program(self._train_step, (state, step_roles, self.abstract_batch(self.accum, micro)),
                                       uses=state_uses(state) + role_uses,
                                       note=f"{self.accum} x {micro} rows x {self.cfg.data.seq_len}")}
        progs.update(self.trained.update_phase_programs("train_step/update"))
        if self.data.has_eval:
            progs["eval_step"] = Program(self._eval_step, (state.params, step_roles, self.abstract_batch(1, t.global_batch)),
                                         uses=("params",) + role_uses,
                                         note=f"{t.global_batch} rows x {self.cfg.data.seq_len}")
        if self.generation_eval is not None:
            import dataclasses

            params, mcfg = self.policy(state, roles)  # under LoRA: the base with the adapters in it
            lora_uses = tuple(f"role:{n}" for n in self.trainable.role_specs() if n in roles)
            for name, prog in generation_eval_programs(self.generation_eval, params, mcfg, roles, configs).items():
                progs[name] = dataclasses.replace(prog, uses=tuple(prog.uses) + lora_uses)
        return progs
