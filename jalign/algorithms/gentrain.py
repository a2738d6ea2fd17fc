"""Generate-then-train: what rejection sampling, online DPO, SPIN, Constitutional AI and on-policy distillation
share (``jalign.algorithms.{rs, online_dpo, spin, cai, opd}``).

One ``step(state, roles, {"prompt_index"})`` is

1. rollout  K samples of each of the P = ``train.global_batch`` prompts, drawn on device by the *generator*
            (``rollout.experience.sample``): the round's frozen snapshot of the policy, the policy itself, or
            a frozen role (a teacher);
2. learn    whatever host work the algorithm needs (a rule's scores, critique and revision rounds, judge
            prompts), then one jitted program that turns the rollout into a training batch [accum, micro, ...]
            on device (rows, scores by roles, selection, pairs [B, 2, T]), and one optimizer update on it
            (``base.make_train_step``: accumulation, clipping, skip-on-non-finite).

Rounds: ``train.steps`` is split into equal rounds (``rs_iterations``, ``spin_iterations``, ``iterations``).
At the first step of round t the algorithm's *iterate roles* (SPIN's opponent, online DPO's previous-iterate
reference, the round's generator) are rebuilt from the current policy with :func:`jalign.roles.snapshot`: a
bit-identical copy in buffers of its own, never in an optimizer, never trained. When rounds are longer than one
step the snapshot is also written to ``RUN_DIR/iterates`` (itself a run directory: ``run:RUN_DIR/iterates@t``
loads iterate t anywhere), so that a run resumed in the middle of a round rebuilds the same role with the one
loader; round 0's iterate is the starting policy, rebuilt from its own source.

LoRA (``model.lora``, :class:`jalign.algorithms.trainable.Trainable`): the trained params are the adapters over
the frozen ``base`` role, and the policy (sampling, the loss, evaluation) is that base with the adapters applied
(``rollout.experience.sample`` of the base with the adapters, as in RL). The adapters start at B = 0, so the
starting policy *is* the base: a role that means "the start policy" (``policy-init``: RS's and online DPO's
reference, CAI's default critic and judge) is the base role itself, the same buffers, never a second copy.
An iterate role (SPIN's opponent, online DPO's previous-iterate reference, a round's generator) is a snapshot
of the adapters only, applied over the same base; the iterate store then holds adapters only, like the
run's checkpoints; export writes the merged model and the PEFT adapter (``OUT_DIR/adapter``).
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.base import (Algorithm, field_sharding, initial_policy_params, make_train_step,
                                    require_mesh_context, state_rng)
from jalign.algorithms.trainable import BASE, Trainable
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _NON_NEGATIVE, _POSITIVE, _PROBABILITY
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.heads import sequence_scores
from jalign.roles import POLICY_INIT, role_source, snapshot
from jalign.rollout import experience as xp
from jalign.state import TrainedModel

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids")
# consecutive steps that train on no token before a run stops (fewer if the run is shorter): a run whose
# filter keeps nothing would otherwise go on with a zero loss and exit 0, looking trained
EMPTY_PATIENCE = 10


@dataclass
class GenTrainConfig:
    """Sampling keys every generate-then-train algorithm shares.

    ``train.global_batch`` counts prompts per step; each is sampled ``num_rollouts_per_prompt`` times; the
    training rows that result (kept samples, pairs) are split into accumulation steps of ``micro_batch_size``
    rows (None: one)."""

    global_batch_counts: ClassVar[str] = "prompts"

    name: str = ""
    num_rollouts_per_prompt: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    micro_batch_size: Optional[int] = None
    # write each step's samples (prompt index, response tokens, end flag) and the training batch built from them
    # to RUN_DIR/rollouts.jsonl, one line per step (process 0; a host copy per step: for audits and tests)
    log_rollouts: bool = False


@dataclass
class ScoredConfig(GenTrainConfig):
    """A sequence reward from a reward model (``roles.reward: run:DIR``) or a rule (``reward_fn``): exactly one.

    ``truncated_response: last`` ranks a response that did not end within ``max_new_tokens`` below every one
    that did (so it is never kept / never chosen); ``keep`` ranks it by its reward like the others."""

    reward_fn: Optional[str] = None
    reward_attribute: int = 0
    truncated_response: Literal["last", "keep"] = "last"


VALUE_RANGES.setdefault("GenTrainConfig", {
    "num_rollouts_per_prompt": _AT_LEAST_1, "max_new_tokens": _AT_LEAST_1, "temperature": _POSITIVE,
    "top_k": _NON_NEGATIVE.with_hint("0 = off"), "top_p": _PROBABILITY, "micro_batch_size": _AT_LEAST_1})
VALUE_RANGES.setdefault("ScoredConfig", {"reward_attribute": _NON_NEGATIVE})


# ---- sizes --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    prompts: int  # P prompts per step
    per_prompt: int  # K samples per prompt
    rollout: int  # P * K sampled rows
    rows: int  # training rows per step (kept samples, pairs, ...)
    micro: int  # training rows per accumulation step
    rounds: int  # rounds over train.steps
    round_steps: int  # steps per round

    @property
    def accum(self) -> int:
        return self.rows // self.micro


def check_sizes(cfg, mesh, rows_per_prompt: int, rounds: int, rounds_key: str = "") -> Sizes:
    """Every divisibility the step relies on, checked before any compile; errors name the keys."""
    a, src = cfg.algorithm, cfg.source or "<config>"
    P, K = cfg.train.global_batch, a.num_rollouts_per_prompt
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.micro_batch is not None:
        raise ConfigError(f"{src}: train.micro_batch is not used by {a.name}; set algorithm.micro_batch_size "
                          "(training rows per accumulation step)")
    if (P * K) % dp:
        raise ConfigError(f"{src}: train.global_batch x algorithm.num_rollouts_per_prompt = {P} x {K} sampled rows "
                          f"is not divisible by the data-parallel size mesh.data*mesh.fsdp = {dp}")
    R = P * rows_per_prompt
    mu = a.micro_batch_size or R
    if R % mu:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} does not divide the {R} training rows of a step")
    if mu % dp:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} (training rows per accumulation step) is not "
                          f"divisible by the data-parallel size mesh.data*mesh.fsdp = {dp}")
    steps = cfg.train.steps
    if rounds < 1 or steps % rounds:
        raise ConfigError(f"{src}: algorithm.{rounds_key}={rounds} must be >= 1 and divide train.steps={steps} "
                          "(every round has the same number of steps)")
    return Sizes(P, K, P * K, R, mu, rounds, steps // rounds)


def split_accumulation(batch: dict, fields: dict, accum: int, mesh, rules) -> dict:
    """Training rows [R, ...] -> [accum, R / accum, ...], each field on its declared sharding (jittable)."""
    out = {}
    for k, x in batch.items():
        if k not in fields:
            raise KeyError(f"training field {k!r} has no declared logical axes (declared: {sorted(fields)})")
        y = x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        out[k] = jax.lax.with_sharding_constraint(y, field_sharding(mesh, rules, fields[k]))
    return out


def rank_key(score, ended, truncated: str):
    """The value samples are ranked by: the score, or -inf for a response without EOS under ``last``."""
    score = score.astype(jnp.float32)
    return jnp.where(ended > 0, score, -jnp.inf) if truncated == "last" else score


def gather_rows(rows: dict, index) -> dict:
    """The rows ``index`` [M] (or [M, 2] for pairs) of every [N, ...] field."""
    return {k: v[index] for k, v in rows.items()}


# ---- host side ----------------------------------------------------------------------------------
def host_global(x) -> np.ndarray:
    """Every row of a (batch-sharded) array on every process: one allgather when several processes hold it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def all_texts(tokenizer, out: dict) -> list[str]:
    """The decoded responses of *every* row on every process (a host rewrite such as a critique round needs
    them all to build the next prompts); only the tokens, lengths and end flags move."""
    return xp.decode_responses(tokenizer, host_global(out["tokens"]), host_global(out["lengths"]),
                               host_global(out["ended_with_eos"]))


def place_rows(values: np.ndarray, mesh, rules) -> jax.Array:
    """A global host array [B, ...] (the same on every process) sharded over its rows like the rollout."""
    values = np.asarray(values)
    sharding = field_sharding(mesh, rules, ("batch",) + (None,) * (values.ndim - 1), leading_accum=False)
    return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


class IterateStore:
    """Snapshots of the policy at the start of rounds: ``RUN_DIR/iterates/checkpoints/<round>/state`` plus the
    run's ``config.yaml``, so the directory is a run source (``run:RUN_DIR/iterates@t``). All are kept."""

    def __init__(self, rt, decls):
        self.rt, self.decls = rt, decls
        self.directory = (rt.run_dir / "iterates").absolute()  # orbax wants absolute paths

    def save(self, round_index: int, params) -> None:
        from jalign.checkpoint import Checkpointer
        from jalign.config import dump_config

        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            dump_config(self.rt.cfg, self.directory / "config.yaml")
            # a run resumed at a round's first step (or restarted with train.resume=false) makes this iterate
            # again: from the same params, so the stored one is replaced rather than refused
            shutil.rmtree(self.directory / "checkpoints" / str(round_index), ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"iterate {round_index}")
        ck = Checkpointer(self.directory / "checkpoints", keep=None, async_save=False)
        try:
            ck.save(round_index, {"step": jnp.int32(round_index), "params": params}, force=True)
            ck.wait()
        finally:
            ck.close()

    def load(self, round_index: int):
        from jalign.models import load

        where = f"{self.directory} (round {round_index})"
        source = load.parse_source(f"run:{self.directory}@{round_index}", where=where)
        return load.load_params(source, self.decls, mesh=self.rt.mesh, rules=self.rt.rules,
                                dtype=params_lib.DTYPES[self.rt.cfg.model.param_dtype], role=f"iterate {round_index}",
                                where=where, log=self.rt.log)


# ---- the algorithm ------------------------------------------------------------------------------
class GenTrainAlgorithm(Algorithm):
    """Rollout by a generator, host work, one jitted preparation and one update per step (module docstring).

    A variant sets ``rows_per_prompt`` (training rows per prompt), ``rounds_key`` (the config key counting
    rounds; None: every step is its own round), ``fields`` (the training batch's declared axes) and implements
    ``learn`` (using ``prepare_program`` / ``update``), ``loss`` and ``normalizers``.
    """

    plan_gap = ("a generate-then-train algorithm: its rollout, scoring and update programs are not listed for the "
                "plan yet (Algorithm.programs)")
    rows_per_prompt = 1
    rounds_key: Optional[str] = None
    prompt_kind = "prompt"  # the data kind data.train is read as
    fields: dict = {}
    step_roles: tuple = ()  # roles the train step itself reads (e.g. a teacher inside the loss)

    def __init__(self, rt):
        super().__init__(rt)
        cfg = self.cfg
        rounds = (getattr(self.a, self.rounds_key) if self.rounds_key else None) or cfg.train.steps  # None: online
        self.sizes = check_sizes(cfg, rt.mesh, self.rows_per_prompt, rounds, self.rounds_key or "")
        self.trainable = Trainable(cfg.model, tfm.declare_params(cfg.model))
        self.decls = self.trainable.decls  # every parameter, or (LoRA) the adapters
        self.gen_cfg = dataclasses.replace(cfg.model, init_from=None, hf_path=None)
        self.trained = TrainedModel(self.decls, cfg.optim, cfg.train.steps, rt.mesh, rt.rules,
                                    params_lib.DTYPES[cfg.model.param_dtype])
        self.store = IterateStore(rt, self.decls)
        self._host_step, self._round, self._empty_steps, self._pending_metrics = 0, None, 0, None
        self.load_data()
        dropout = self.trainable.is_lora and cfg.model.lora.dropout > 0
        self._train_step = make_train_step(self._trained_loss, self.normalizers, self.trained, with_rng=dropout)

    # ---- data -----------------------------------------------------------------------------------
    def load_data(self):
        from jalign.data.prompts import PromptIterator

        d = self.cfg.data
        self.train_prompts = self.prompt_set(d.train, d.max_examples, self.prompt_kind)
        e = self.cfg.eval
        self.eval_set = self.prompt_set(d.eval, e.prompts, "prompt") if d.eval and e.prompts > 0 else None
        self.P, self.N = xp.rollout_shape(self.train_prompts.longest, self.response_block(),
                                          self.rt.mesh.shape["sequence"])
        if self.P + self.N > self.cfg.model.max_seq_len:
            raise ConfigError(f"prompt ({self.P}) + response block ({self.N}) exceeds model.max_seq_len="
                              f"{self.cfg.model.max_seq_len}")
        self.train_iter = PromptIterator(len(self.train_prompts), self.sizes.prompts, d.seed, d.shuffle)

    def response_block(self) -> int:
        """Response tokens a row must hold (default ``max_new_tokens``; SPIN also fits the gold responses)."""
        return self.a.max_new_tokens

    def prompt_set(self, spec: str, limit, kind: str):
        from jalign.data.formats import PromptExample
        from jalign.data.prompts import PromptSet
        from jalign.data.sources import load_source

        d = self.cfg.data
        max_prompt = d.seq_len - self.a.max_new_tokens
        if max_prompt < 1:
            raise ConfigError(f"{self.cfg.source or '<config>'}: data.seq_len={d.seq_len} leaves no room for a "
                              f"prompt before algorithm.max_new_tokens={self.a.max_new_tokens}")
        examples, skipped = load_source(spec, kind, d.skip_bad_lines, seed=d.seed, max_examples=limit)
        if skipped:
            self.rt.log(f"data: {spec}: skipped {len(skipped)} bad lines")
        if kind == "sft":  # prompts with their gold responses as the reference answers
            examples = [PromptExample(*sft_prompt_response(ex), source=ex.source) for ex in examples]
        return PromptSet(examples, self.tokenizer, d.chat_template, max_prompt, self.rt.log, spec)

    def train_batches(self):
        return self.train_iter

    # ---- roles ----------------------------------------------------------------------------------
    def frozen_roles(self) -> dict:
        """The frozen models this algorithm reads (name -> RoleSpec); see :meth:`role_specs`."""
        return {}

    def role_specs(self):
        """:meth:`frozen_roles` and, under LoRA, the frozen base, without the roles that are the base itself."""
        aliases = self.base_aliases()
        return {**self.trainable.role_specs(), **{n: s for n, s in self.frozen_roles().items() if n not in aliases}}

    def base_aliases(self) -> tuple:
        """Under LoRA, the roles that are the starting policy (source ``policy-init``, given or by default): the
        adapters start at B = 0, so that policy is exactly the base; these roles are the base role's buffers."""
        if not self.trainable.is_lora:
            return ()
        return tuple(n for n, spec in self.frozen_roles().items() if role_source(self.cfg, n, spec)[1] == POLICY_INIT)

    def base_roles(self, roles) -> Optional[dict]:
        """What the policy's forward params need besides the trained ones: the base under LoRA, else nothing."""
        return roles.on_device([BASE]) if self.trainable.is_lora else None

    def forward_params(self, params, roles):
        """Trained params -> the params the model runs: themselves, or (LoRA) the base with them applied."""
        return self.trainable.forward_params(params, self.base_roles(roles))

    # ---- state ----------------------------------------------------------------------------------
    def start_params(self, role: str = "policy"):
        """The trained params the run starts from (LoRA: fresh adapters, B = 0), from their sources."""
        return self.trainable.init_params(self.rt, lambda decls: initial_policy_params(self.rt, decls, role=role))

    def init_state(self, roles):
        return self.trained.new_state(self.start_params(), state_rng(self.cfg.train.seed))

    def abstract_state(self):
        return self.trained.abstract_state()

    def start(self, state, roles):
        self._host_step = int(jax.device_get(state.step))
        self._round = None
        self._trim_rollout_log()
        for name in self.base_aliases():  # the same arrays as the base: no copy
            roles.set(name, roles[BASE], roles.config(BASE))
        self.begin_round(state, roles)

    def policy(self, state, roles):
        """(params, config) of the trained policy (generation-based evaluation): under LoRA base + adapters."""
        return self.forward_params(state.params, roles), self.cfg.model

    def export(self, state, roles, out_dir):
        """A Hugging Face directory of the policy (under LoRA merged, and the PEFT adapter in ``OUT_DIR/adapter``)."""
        from pathlib import Path

        from jalign.models.hf_io import save_hf

        save_hf(self.trainable.merged(state.params, self.base_roles(roles)), self.cfg.model, out_dir,
                tokenizer_dir=self.tokenizer_dir(), special_ids=self.special_token_ids())
        if self.trainable.is_lora:
            self.trainable.export_adapter(state.params, str(Path(out_dir) / "adapter"), self.cfg.model.hf_path)

    def _trim_rollout_log(self) -> None:
        """A resumed run samples the steps after its checkpoint again: drop what an earlier attempt logged of them."""
        import json

        path = self.rt.run_dir / "rollouts.jsonl"
        if not getattr(self.a, "log_rollouts", False) or jax.process_index() != 0 or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= self._host_step]
        if len(keep) != len(lines):
            path.write_text("".join(keep))

    # ---- rounds ---------------------------------------------------------------------------------
    def iterate_roles(self) -> tuple:
        """Roles rebuilt from the policy at each round (default: the round's generator when rounds are longer
        than one step; with one-step rounds the generator is the policy itself)."""
        return ("generator",) if self.sizes.round_steps > 1 else ()

    def begin_round(self, state, roles) -> None:
        """At the first step of a round (or a resume inside one): the iterate roles of that round."""
        names = self.iterate_roles()
        s, spr = self._host_step, self.sizes.round_steps
        t = s // spr
        if not names or self._round == t:
            return
        if s % spr == 0:
            frozen = snapshot(state.params)  # under LoRA: the adapters only
            if spr > 1 and t > 0:
                self.store.save(t, frozen)
        elif t == 0:
            frozen = self.start_params(role="round 0 iterate")
        else:
            frozen = self.store.load(t)
        frozen = self.forward_params(frozen, roles)  # LoRA: the snapshot applied over the (shared) base
        for n in names:
            roles.set(n, frozen, self.cfg.model)
        self._round = t

    def generator(self, state, roles):
        """(params, model config) that sample this step's responses (under LoRA the base with the adapters
        applied: ``rollout.experience.sample`` runs them as the RL rollouts do)."""
        if "generator" in self.iterate_roles():
            return roles["generator"], self.gen_cfg
        return self.forward_params(state.params, roles), self.gen_cfg

    # ---- one step -------------------------------------------------------------------------------
    def rollout_key(self, step: int):
        return jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)

    def sample(self, params, cfg, prompt_ids: list, key, *, max_new_tokens: Optional[int] = None,
               prompt_len: Optional[int] = None, new_len: Optional[int] = None, greedy: bool = False,
               temperature: Optional[float] = None) -> dict:
        a = self.a
        return xp.sample(params, cfg, prompt_ids, max_new_tokens=max_new_tokens or a.max_new_tokens,
                         new_len=new_len or self.N, prompt_len=prompt_len or self.P, key=key,
                         eos_ids=sorted(self.tokenizer.eos_ids), pad_id=self.tokenizer.pad_id, mesh=self.rt.mesh,
                         rules=self.rt.rules, temperature=a.temperature if temperature is None else temperature,
                         top_k=a.top_k, top_p=a.top_p, greedy=greedy, rollout=self.cfg.rollout)

    def row_prompts(self, batch) -> np.ndarray:
        """The prompt index of every sampled row (each prompt K times, consecutively)."""
        return np.repeat(np.asarray(batch["prompt_index"]), self.sizes.per_prompt)

    def rollout(self, state, roles, batch) -> dict:
        params, cfg = self.generator(state, roles)
        ids = [self.train_prompts.ids[i] for i in self.row_prompts(batch)]
        return self.sample(params, cfg, ids, self.rollout_key(self._host_step))

    def step(self, state, roles, batch):
        self.begin_round(state, roles)
        self.check_trained()  # the previous step's count: its update has finished by now
        out = self.rollout(state, roles, batch)
        state, metrics = self.learn(state, roles, batch, out)
        self._host_step += 1
        self._pending_metrics = metrics
        if self._host_step >= self.cfg.train.steps:
            self.check_trained()
        return state, metrics

    def check_trained(self) -> None:
        """Stop with one message naming the filter when ``EMPTY_PATIENCE`` steps in a row trained on no token
        (``num_tokens`` of the update is 0: every row masked out). Reads the last step's metrics one step late
        (or at the last step), so the count's device-to-host copy never waits on an update in flight."""
        metrics, self._pending_metrics = self._pending_metrics, None
        if metrics is None or "num_tokens" not in metrics:
            return
        if float(metrics["num_tokens"]) > 0:
            self._empty_steps = 0
            return
        self._empty_steps += 1
        if self._empty_steps >= min(EMPTY_PATIENCE, self.cfg.train.steps):
            from jalign.errors import NothingToTrain

            raise NothingToTrain(
                f"{self.cfg.source or '<config>'}: algorithm {self.a.name}: the last {self._empty_steps} steps "
                f"(to step {self._host_step}) trained on nothing: {self.empty_reason(metrics)}; the checkpoints "
                f"written so far are kept in {self.rt.run_dir}")

    def empty_reason(self, metrics: dict) -> str:
        """Why no row was trained on, naming the config key that filtered them (each algorithm says)."""
        return "every training row was masked out"

    def learn(self, state, roles, batch, out) -> tuple:
        raise NotImplementedError

    def log_rollouts(self, batch, out: dict, train: dict, extra: Optional[dict] = None) -> None:
        """With ``algorithm.log_rollouts``: one line of ``RUN_DIR/rollouts.jsonl`` for this step: the prompt index
        and the response tokens (up to their length) and end flag of every sampled row, and every field of the
        training batch the update receives ([accum, micro, ...]), so selection and pairing can be re-derived;
        ``extra``: the algorithm's own per-row inputs (a rule's scores, a judge's labels, critiques, revisions)."""
        if not getattr(self.a, "log_rollouts", False):
            return
        import json

        tokens, lengths = host_global(out["tokens"]), host_global(out["lengths"])
        ended = host_global(out["ended_with_eos"])
        record = {"step": self._host_step + 1, "prompt_index": [int(i) for i in self.row_prompts(batch)],
                  "responses": [t[:n].tolist() for t, n in zip(tokens, lengths)],
                  "ended_with_eos": [bool(e) for e in ended],
                  "train": {k: host_global(v).tolist() for k, v in train.items()},
                  **{k: host_global(v).tolist() if isinstance(v, jax.Array) else v for k, v in (extra or {}).items()}}
        if jax.process_index() == 0:
            path = self.rt.run_dir / "rollouts.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def update(self, state, roles, train_batch: dict):
        """One optimizer update on a prepared batch [accum, micro, ...]."""
        names = [*self.step_roles, *self.trainable.role_specs()]
        return self._train_step(state, roles.on_device(names) if names else {}, train_batch)

    def _trained_loss(self, params, mb, norms, roles):
        """``loss`` on the model's forward params (under LoRA: the base with the trained adapters, LoRA dropout
        keyed by ``norms["rng"]``)."""
        return self.loss(self.trainable.forward_params(params, roles, norms.get("rng")), mb, norms, roles)

    def to_train_batch(self, rows: dict) -> dict:
        """Inside a jitted preparation: training rows [R, ...] -> the update's [accum, micro, ...] batch."""
        require_mesh_context("the generate-then-train preparation")
        return split_accumulation(rows, self.fields, self.sizes.accum, self.rt.mesh, self.rt.rules)

    # ---- scores (reward model or rule) ----------------------------------------------------------
    def setup_reward(self) -> None:
        """Exactly one of ``roles.reward`` and ``algorithm.reward_fn``; the rule resolved now (clear errors)."""
        a, src = self.a, self.cfg.source or "<config>"
        has_rm = "reward" in self.cfg.roles
        if has_rm == (a.reward_fn is not None):
            raise ConfigError(f"{src}: set exactly one of roles.reward (a reward-model run: roles.reward=run:DIR) "
                              f"and algorithm.reward_fn (a rule-based reward, e.g. exact_match)")
        self.rule = None
        if a.reward_fn:
            from jalign.rewards import get_reward

            try:
                self.rule = get_reward(a.reward_fn)
            except ValueError as e:
                raise ConfigError(f"{src}: {e}") from None
        else:
            check_role_vocab(self.cfg, "reward")

    def rule_fn(self):
        """(prompt text, response, reference, example) -> reward; the example's other fields reach the rule."""
        return lambda p, r, ref, ex: self.rule(p, r, ref, fields=getattr(ex, "fields", None))

    def rule_scores(self, out, batch):
        """The rule's score of every row (each process scores its own rows), or None under a reward model."""
        if self.rule is None:
            return None
        score, _, _ = xp.rule_scores(self.rule_fn(), self.tokenizer, out, list(self.row_prompts(batch)),
                                     self.train_prompts)
        return score

    def sequence_reward(self, roles: dict, rows: dict, rule_score):
        """Inside a jitted program: the reward model's score of every row at ``reward_attribute``, or the rule's."""
        if "reward" in roles:
            return sequence_scores(roles["reward"], rows["tokens"], rows["positions"], rows["segment_ids"],
                                   self.rm_cfg)[:, self.a.reward_attribute].astype(jnp.float32)
        return rule_score.astype(jnp.float32)

    @property
    def rm_cfg(self):
        from jalign.models import load
        from jalign.roles import role_architecture

        if not hasattr(self, "_rm_cfg"):
            source = load.parse_source(self.cfg.roles["reward"].source, where="roles.reward")
            self._rm_cfg = role_architecture(self.cfg, source, "roles.reward")
        return self._rm_cfg

    def generation_eval_for(self, reward: bool = True, kl_role: str = "reference"):
        """The loop's generation-based eval on ``data.eval``: exact match, the reward (reward model or rule) and
        the KL to ``kl_role`` of the answers (when the run has that role)."""
        from jalign.evaluation import GenerationEval, no_eval_reward, rule_reward_fn

        if self.eval_set is None or self.cfg.eval.prompts <= 0:
            return None
        rule = getattr(self, "rule", None) if reward else None
        reward_role = "reward" if reward and "reward" in self.cfg.roles else None
        if rule is not None or reward_role is not None:
            no_eval_reward(self.cfg, f"{self.a.name} scores its evaluation with its own reward")
            reward_fn = self.rule_fn() if rule is not None else None
        else:  # no reward of its own (CAI, OPD, ...): the config's eval.reward, if any
            reward_fn = rule_reward_fn(self.cfg.eval.reward, "eval.reward", self.cfg.source or "<config>")
        return GenerationEval(self.rt, self.tokenizer, self.eval_set, kl_role=kl_role, reward_role=reward_role,
                              reward_attribute=getattr(self.a, "reward_attribute", 0), reward_fn=reward_fn)

    # ---- to implement ---------------------------------------------------------------------------
    def loss(self, params, mb, norms, roles):
        raise NotImplementedError

    def normalizers(self, batch):
        raise NotImplementedError


def sft_prompt_response(ex) -> tuple:
    """(prompt, response text) of an SFT example (a conversation: everything before its last assistant turn)."""
    if ex.messages is None:
        return ex.prompt, ex.response
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]


def check_role_vocab(cfg, name: str):
    """A configured role's architecture (read from its source before any weights load), which must share the
    policy's vocabulary (the same tokenizer): else one error naming ``roles.NAME``."""
    from jalign.models import load
    from jalign.roles import role_architecture

    if name not in cfg.roles:
        return None
    source = load.parse_source(cfg.roles[name].source, where=f"roles.{name}")
    arch = role_architecture(cfg, source, f"roles.{name}")
    if arch.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"roles.{name}={source}: vocab_size {arch.vocab_size} differs from the policy's "
                          f"{cfg.model.vocab_size}: the {name} must share the tokenizer")
    return arch
