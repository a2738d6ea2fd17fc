"""What every generate-then-train RL algorithm shares (PPO, GRPO, RLOO and their successors).

One ``step(state, roles, {"prompt_index"})`` is:

1. rollout  K samples of each of the P prompts at temperature T with the actor (``rollout.experience``):
            the result stays on the devices in the sampler's layout; rule rewards pull only the tokens and
            lengths of each process's own rows to the host (``rl_sampling``; with DAPO's dynamic sampling,
            groups whose rewards all agree are replaced by new ones); under LoRA with the adapters applied;
2. score    one jitted program: the training rows, old log-probs of the actor at logits/T (skipped when the
            rollout is used for one update and nothing needs them), reference log-probs, critic values, the
            reward terms (reward models and rules, ``rl_rewards``), their weighted sum and shaping (overlong
            and truncation penalties), then the advantage estimator ``algorithm.advantage`` and the
            rollout-mismatch weights ``algorithm.mismatch_correction`` (``rl_objectives``);
3. train    ``ppo_epochs`` passes over the N = P*K rows in minibatches, each one jitted program running the
            actor's (and a critic's) train step with accumulation and the global count of that minibatch; the
            actor's loss is ``algorithm.policy_loss`` (+ the k3 KL term when ``kl_in: loss``, + entropy bonus).

Packed rows (``algorithm.pack_rows``, :mod:`jalign.algorithms.packed_rows`): the forwards of steps 2 and 3 run on
rows of several whole samples instead of one padded row per sample, their per-token results read back per sample,
so every objective and metric is computed on the same arrays; a step whose samples do not fit the configured
packed shapes runs unpacked and logs a line.

Train state: ``TrainState(step, params=actor, opt_state, rng, extra={"kl_coef", "critic": {...}})``. The
reference and reward models are roles (``roles.reference``, ``roles.reward``, one ``reward_NAME`` per other
reward-model term): frozen, never in an optimizer, never donated, never checkpointed.

LoRA (``model.lora``, :class:`jalign.algorithms.trainable.Trainable`): the actor's trained params are the
adapters over the frozen ``base`` role; the reference defaults to that base with the adapters off (no second
copy; ``roles.reference`` still picks a separate one); rollouts and scoring run the base with the adapters
applied; a critic (PPO) stays a full model. Export writes the merged model and ``OUT_DIR/adapter`` (PEFT).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms import packed_rows as pk
from jalign.algorithms.base import (Algorithm, field_sharding, initial_policy_params, make_train_step,
                                    require_mesh_context, state_rng)
from jalign.algorithms.rl_objectives import AdvantageInputs, check_objectives, kl_loss_term, with_is_weight
from jalign.algorithms.rl_rewards import (REWARD_ROLE, check_reward_keys, model_components, model_terms, rule_terms,
                                          reward_terms, shape_rewards)
from jalign.algorithms.rl_sampling import Sampler
from jalign.algorithms.trainable import BASE, Trainable
from jalign.config import ConfigError
from jalign.evaluation import GenerationEval, MonitorConfig, no_eval_reward
from jalign.losses import entropy_bonus, kl_k1, rollout_mismatch_metrics
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.heads import token_logps, token_values
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp
from jalign.state import TrainedModel
from sharding.rules import constrain

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids")
KlIn = Literal["reward", "loss", "none"]  # where the KL to the reference goes (jalign.algorithms.rl_objectives)


@dataclass
class RLConfig:
    """What the RL algorithms share: rollout, reward, objective, KL to the reference, minibatching.

    One step = ``train.global_batch`` prompts x ``num_rollouts_per_prompt`` samples (the rollout batch), then
    ``ppo_epochs`` passes over it in minibatches of ``minibatch_size`` rows (None = the whole rollout), each
    split into accumulation steps of ``micro_batch_size`` rows (None = minibatch). The reward is a reward
    model (``roles.reward: run:DIR``), a rule (``reward_fn``), or a weighted list of both (``rewards``).
    Each preset (ppo, grpo, rloo, dapo, gspo, reinforce_pp) sets its own defaults of the objective keys.
    """

    global_batch_counts: ClassVar[str] = "prompts"  # train.global_batch is prompts per step (rows: x K samples)

    name: str = ""
    reward_fn: Optional[str] = None  # a rule-based reward from jalign.rewards (e.g. exact_match)
    # several weighted terms: [{fn: math_verify, weight: 1.0}, {fn: format, weight: 0.2}, {model: reward, weight: 0.5}]
    rewards: Optional[list[dict[str, Any]]] = None
    reward_attribute: int = 0  # which reward-model output is the reward
    num_rollouts_per_prompt: int = 1
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 1
    minibatch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    # the objective (jalign.algorithms.rl_objectives): ppo_clip | dual_clip | gspo | cispo | reinforce
    policy_loss: str = "ppo_clip"
    # gae (PPO, critic) | group (GRPO) | leave_one_out (RLOO) | reinforce_pp | reinforce_pp_baseline
    advantage: str = "group"
    clip_eps: float = 0.2
    clip_eps_low: Optional[float] = None  # DAPO clip-higher: the ratio's bounds 1 - low, 1 + high (default clip_eps)
    clip_eps_high: Optional[float] = None
    dual_clip: float = 3.0  # policy_loss: dual_clip: the loss of a negative advantage is at most dual_clip * |A|
    scale_advantages: bool = True  # group advantages divided by the group std (False: Dr. GRPO)
    loss_aggregation: Literal["token", "sequence"] = "token"  # global token mean, or per-sequence mean
    gamma: float = 1.0  # discount of token-level returns (gae, reinforce_pp)
    entropy_coef: float = 0.0
    kl_coef: float = 0.05
    kl_in: KlIn = "reward"  # reward: shapes the reward; loss: + kl_coef * k3 in the loss; none
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"  # per-token KL in token rewards (gae, reinforce_pp)
    # training/rollout mismatch: none | token_tis | sequence_tis | sequence_mis, weights capped at mismatch_cap
    mismatch_correction: str = "none"
    mismatch_cap: float = 2.0
    truncated_response: Literal["keep", "mask", "penalize"] = "penalize"  # no EOS within max_new_tokens
    truncation_penalty: float = -1.0  # the reward of a truncated response under "penalize"
    # DAPO dynamic sampling: drop groups whose rewards all agree, refill from new prompts (<= rounds extra rollouts)
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3
    # DAPO soft overlong punishment: a linear penalty down to -factor over the last overlong_buffer tokens
    overlong_buffer: Optional[int] = None  # tokens; None or 0 = off
    overlong_penalty_factor: float = 1.0
    # Reward standardisation of reward-model terms (NeMo-Aligner's reward_standardization):
    # r <- clip((r - offset) / scale, +-clip), before the weighted sum and the penalties.
    reward_offset: float = 0.0
    reward_scale: float = 1.0
    reward_clip: Optional[float] = None
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # reward-hacking monitor at each evaluation
    # "tensor": sample from a copy of the actor resharded once per rollout to tensor-parallel only (replicated
    # over data/fsdp, compute dtype) instead of all-gathering fsdp-sharded weights at every decode step
    # (jalign.rollout.layout; `jalign plan` shows both).
    rollout_layout: Literal["train", "tensor"] = "train"
    # Packed rows (jalign.algorithms.packed_rows): the score pass and the updates run their forwards on rows of
    # several whole samples (segment ids, positions restarting per sample) instead of one row per sample; the
    # per-token results are read back per sample, so every objective is unchanged. Static shapes: each
    # accumulation step's micro_batch_size samples go into pack_rows_per_micro rows of pack_row_len tokens (the
    # score pass: the same ratio over the whole rollout); a step whose samples do not fit runs unpacked and
    # logs a line (no sample is ever dropped).
    pack_rows: bool = False
    pack_row_len: Optional[int] = None  # tokens per packed row; None = the rollout row (prompt block + response block)
    pack_rows_per_micro: Optional[int] = None  # packed rows per accumulation step; None = half its samples (rounded up to mesh.data*mesh.fsdp)


# ---- sizes --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    prompts: int  # P prompts per step (train.global_batch)
    per_prompt: int  # K samples per prompt
    rollout: int  # N = P * K rows per step
    minibatch: int  # M rows per optimizer update
    micro: int  # rows per accumulation step
    data_parallel: int

    @property
    def minibatches(self) -> int:
        return self.rollout // self.minibatch

    @property
    def accum(self) -> int:
        return self.minibatch // self.micro


def check_sizes(cfg, mesh, min_per_prompt: int = 1) -> Sizes:
    """Every divisibility the RL step relies on, checked before any compile; errors name the keys."""
    a, src = cfg.algorithm, cfg.source or "<config>"
    P, K = cfg.train.global_batch, a.num_rollouts_per_prompt
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if K < min_per_prompt:
        raise ConfigError(f"{src}: algorithm.num_rollouts_per_prompt={K}: {a.name} needs at least "
                          f"{min_per_prompt} samples per prompt (its baseline compares samples of one prompt)")
    N = P * K
    M = a.minibatch_size or N
    mu = a.micro_batch_size or M
    if cfg.train.micro_batch is not None:
        raise ConfigError(f"{src}: train.micro_batch is not used by {a.name}; set algorithm.minibatch_size "
                          "(rows per update) and algorithm.micro_batch_size (rows per accumulation step)")
    if M <= 0 or mu <= 0 or N % M:
        raise ConfigError(f"{src}: algorithm.minibatch_size={M} does not divide the rollout batch of "
                          f"train.global_batch x algorithm.num_rollouts_per_prompt = {P} x {K} = {N} samples")
    if M % mu:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} does not divide algorithm.minibatch_size={M}")
    if mu % dp:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} (rows per accumulation step; default the "
                          f"minibatch size) is not divisible by the data-parallel size mesh.data*mesh.fsdp = {dp}")
    if a.ppo_epochs < 1:
        raise ConfigError(f"{src}: algorithm.ppo_epochs must be >= 1, got {a.ppo_epochs}")
    if a.max_new_tokens < 1:
        raise ConfigError(f"{src}: algorithm.max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if a.max_resample_rounds < 0:
        raise ConfigError(f"{src}: algorithm.max_resample_rounds must be >= 0, got {a.max_resample_rounds}")
    if a.temperature <= 0:
        raise ConfigError(f"{src}: algorithm.temperature must be > 0 for RL sampling, got {a.temperature}")
    if a.reward_scale <= 0 or (a.reward_clip is not None and a.reward_clip <= 0):
        raise ConfigError(f"{src}: algorithm.reward_scale and algorithm.reward_clip must be > 0, got "
                          f"{a.reward_scale} and {a.reward_clip}")
    return Sizes(P, K, N, M, mu, dp)


# ---- the algorithm ------------------------------------------------------------------------------
class RLAlgorithm(Algorithm):
    """Rollout, scoring, minibatch updates shared by the RL algorithms (see the module docstring).

    A preset is its config class (the defaults of ``policy_loss``, ``advantage``, ``kl_in``, ...) and, when it
    needs one (PPO's critic), a ``critic_loss``. The objective, estimator and mismatch correction come from the
    registries of :mod:`jalign.algorithms.rl_objectives`.
    """

    min_per_prompt = 1
    role_names = ("reference", "reward")

    def __init__(self, rt):
        super().__init__(rt)
        cfg, a = self.cfg, self.a
        src = cfg.source or "<config>"
        self.terms = reward_terms(cfg)
        check_reward_keys(a, src)
        self.objective, self.estimator, self.mismatch = check_objectives(a, src, has_critic_keys=hasattr(a, "lam"))
        if a.policy_loss == "reinforce" and a.ppo_epochs > 1:
            # no importance ratio: later epochs take -A log pi on samples of an older policy, uncorrected
            rt.log(f"warning: {src}: algorithm.policy_loss=reinforce has no importance ratio, so ppo_epochs="
                   f"{a.ppo_epochs} trains every epoch after the first on samples of an older policy without "
                   "correction (RLOO with 2 epochs drifted on the tiny task: README); use ppo_epochs=1 (as "
                   "configs/rloo_tiny.yaml) or a ratio loss (policy_loss=ppo_clip)")
        self.sizes = check_sizes(cfg, rt.mesh, max(self.min_per_prompt, self.estimator.min_per_prompt))
        self.trainable = Trainable(cfg.model, tfm.declare_params(cfg.model))
        self.decls = self.trainable.decls  # every parameter, or (LoRA) the adapters
        self.gen_cfg = dataclasses.replace(cfg.model, init_from=None, hf_path=None)
        self.updates = cfg.train.steps * a.ppo_epochs * self.sizes.minibatches
        self.actor = TrainedModel(self.decls, cfg.optim, self.updates, rt.mesh, rt.rules,
                                  params_lib.DTYPES[cfg.model.param_dtype])
        self.replicated = NamedSharding(rt.mesh, PartitionSpec())
        self.single_use = a.ppo_epochs == 1 and self.sizes.minibatches == 1
        self.old_from_update = self.single_use and not self.needs_old_logps
        self.rm_cfgs = {t.role: self._reward_model_config(t) for t in model_terms(self.terms)}
        if self.has_critic:
            self._init_critic()
        self._load_data()
        from jalign.rollout.layout import RolloutLayout

        self.rollout = RolloutLayout(a.rollout_layout, self.decls, cfg.model, rt.mesh, rt.rules)
        self.sampler = Sampler(self)
        self.pack = pk.pack_shape(cfg, self.sizes, self.P + self.N, rt.mesh.shape["sequence"])
        self._score_unpacked = jax.jit(functools.partial(self._score_impl, packed=False))
        self._score_packed = jax.jit(functools.partial(self._score_impl, packed=True)) if self.pack else None
        self._score = self._score_packed or self._score_unpacked  # the configured layout (tests, jalign plan)
        self._pack_fits = jax.jit(self._pack_fits_impl, out_shardings=self.replicated) if self.pack else None
        self.build_update(self.actor_loss)
        self._host_step = 0
        self._penalty_checked = False
        no_eval_reward(cfg, f"{a.name} scores its evaluation with its reward (algorithm.reward_fn / roles.reward)")
        self.generation_eval = (GenerationEval(rt, self.tokenizer, self.eval_set, kl_role=self.reference_role,
                                               rewards=self.terms, monitor=a.monitor,
                                               standardize=(a.reward_offset, a.reward_scale, a.reward_clip))
                                if self.eval_set is not None and cfg.eval.prompts > 0 else None)

    @property
    def reference_role(self) -> str:
        """The role the reference policy is: ``reference``, or under LoRA by default the frozen base."""
        return BASE if self.trainable.is_lora and "reference" not in self.cfg.roles else "reference"

    @property
    def has_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def needs_old_logps(self) -> bool:
        """The behaviour log-probs are needed before the update: a KL-shaped reward or the mismatch weights."""
        return self.a.kl_in == "reward" or self.mismatch is not None

    def _reward_model_config(self, term):
        """A reward role's architecture (from its own run), known before any weights are loaded."""
        from jalign.models import load
        from jalign.roles import role_architecture

        key = f"roles.{term.role}" if term.role in self.cfg.roles else f"algorithm.rewards ({term.name})"
        spec = self.cfg.roles[term.role].source if term.role in self.cfg.roles else term.source
        source = load.parse_source(spec, where=key)
        rm = role_architecture(self.cfg, source, key)
        if rm.vocab_size != self.cfg.model.vocab_size:
            raise ConfigError(f"{key}={source}: vocab_size {rm.vocab_size} differs from the policy's "
                              f"{self.cfg.model.vocab_size}: the reward model must share the tokenizer")
        return rm

    # ---- construction ---------------------------------------------------------------------------
    def role_specs(self):
        specs = dict(self.trainable.role_specs())  # under LoRA: the frozen base
        if self.reference_role == "reference":
            specs["reference"] = RoleSpec(what="reference model")
        specs[REWARD_ROLE] = RoleSpec(source=None, lm_head=False, score_outputs=-1, what="reward model")
        for t in model_terms(self.terms):
            if t.role != REWARD_ROLE:
                specs[t.role] = RoleSpec(source=t.source, lm_head=False, score_outputs=-1,
                                         what=f"reward model {t.name!r}")
        return specs

    def critic_source(self) -> Optional[str]:
        """The critic's starting weights: ``algorithm.critic_init``, else the reward model's, else the policy's."""
        a = self.a
        if getattr(a, "critic_init", None):
            return a.critic_init
        if REWARD_ROLE in self.cfg.roles:
            return self.cfg.roles[REWARD_ROLE].source
        return None

    def _init_critic(self):
        from jalign.models import load
        from jalign.roles import role_architecture

        cfg, a = self.cfg, self.a
        spec = self.critic_source()
        if spec:
            source = load.parse_source(spec, where="algorithm.critic_init")
            self.critic_cfg = role_architecture(cfg, source, "algorithm.critic_init")
        else:
            self.critic_cfg = cfg.model
        self.critic_decls = tfm.declare_params(self.critic_cfg, lm_head=False, score_outputs=1)
        copt = dataclasses.replace(cfg.optim, lr=a.critic_lr or cfg.optim.lr)
        self.critic = TrainedModel(self.critic_decls, copt, self.updates, self.rt.mesh, self.rt.rules,
                                   params_lib.DTYPES[self.critic_cfg.param_dtype])
        self._critic_step = make_train_step(self.critic_loss, self.normalizers, self.critic)

    def _load_data(self):
        from jalign.data.prompts import PromptIterator, PromptSet
        from jalign.data.sources import load_source

        d, a = self.cfg.data, self.a
        max_prompt = d.seq_len - a.max_new_tokens
        if max_prompt < 1:
            raise ConfigError(f"{self.cfg.source or '<config>'}: data.seq_len={d.seq_len} leaves no room for a "
                              f"prompt before algorithm.max_new_tokens={a.max_new_tokens}")

        def prompts(spec, limit):
            examples, skipped = load_source(spec, "prompt", d.skip_bad_lines, seed=d.seed, max_examples=limit)
            if skipped:
                self.rt.log(f"data: {spec}: skipped {len(skipped)} bad lines")
            return PromptSet(examples, self.tokenizer, d.chat_template, max_prompt, self.rt.log, spec)

        e = self.cfg.eval
        if self.rt.abstract:  # jalign plan: prompts of the longest length a row allows; nothing is read
            from jalign.abstract import dummy_prompts, prompt_bound

            longest = prompt_bound(d.seq_len, a.max_new_tokens, self.rt.abstract_prompt_len)
            self.train_prompts = dummy_prompts(1, longest)
            self.eval_set = dummy_prompts(e.prompts, longest) if d.eval and e.prompts > 0 else None
        else:
            self.train_prompts = prompts(d.train, d.max_examples)
            self.eval_set = prompts(d.eval, e.prompts) if d.eval and e.prompts > 0 else None
        sp = self.rt.mesh.shape["sequence"]
        self.P, self.N = xp.rollout_shape(self.train_prompts.longest, a.max_new_tokens, sp)
        if self.P + self.N > self.cfg.model.max_seq_len:
            raise ConfigError(f"prompt ({self.P}) + algorithm.max_new_tokens ({a.max_new_tokens}) exceeds "
                              f"model.max_seq_len={self.cfg.model.max_seq_len}")
        self.train_iter = PromptIterator(len(self.train_prompts), self.sizes.prompts, d.seed, d.shuffle)

    # ---- protocol -------------------------------------------------------------------------------
    def init_state(self, roles):
        params = self.trainable.init_params(self.rt, lambda decls: initial_policy_params(self.rt, decls))
        extra = {"kl_coef": jax.device_put(jnp.float32(self.a.kl_coef), self.replicated)}
        if self.has_critic:
            extra["critic"] = self._initial_critic()
        return self.actor.new_state(params, state_rng(self.cfg.train.seed), extra)

    def _initial_critic(self) -> dict:
        from jalign.models import load
        from jalign.roles import policy_init_seed, policy_source

        spec = self.critic_source()
        if spec:
            key, source = "algorithm.critic_init", load.parse_source(spec, where="algorithm.critic_init")
        else:
            key, source = policy_source(self.cfg)
        seed = policy_init_seed(self.cfg.train.seed) + 1
        cparams = load.load_params(source, self.critic_decls, mesh=self.rt.mesh, rules=self.rt.rules,
                                   dtype=params_lib.DTYPES[self.critic_cfg.param_dtype], seed=seed,
                                   allow_fresh=("score", "score_bias"), role="critic", where=key, log=self.rt.log)
        return {"params": cparams, "opt_state": self.critic.init_opt_state(cparams)}

    def _extra_abstract(self) -> dict:
        out = {"kl_coef": jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)}
        if self.has_critic:
            c = self.critic.abstract_state()
            out["critic"] = {"params": c.params, "opt_state": c.opt_state}
        return out

    def abstract_state(self):
        return self.actor.abstract_state(self._extra_abstract())

    def _state_shardings(self):
        extra = {"kl_coef": self.replicated}
        if self.has_critic:
            extra["critic"] = {"params": self.critic.param_shardings, "opt_state": self.critic.opt_shardings}
        return self.actor.shardings(extra)

    def train_batches(self):
        return self.train_iter

    # ---- the trained policy -----------------------------------------------------------------------
    def actor_roles(self, roles) -> Optional[dict]:
        """The frozen params the actor's forward pass needs: the base under LoRA, else none."""
        return roles.on_device([BASE]) if self.trainable.is_lora else None

    def policy(self, state, roles):
        """(params, config) generation uses: the actor, under LoRA the base with the adapters applied."""
        return self.trainable.forward_params(state.params, self.actor_roles(roles)), self.cfg.model

    def export(self, state, roles, out_dir):
        """The actor as a Hugging Face directory (under LoRA: merged, and the PEFT adapter in ``OUT_DIR/adapter``)."""
        from pathlib import Path

        from jalign.models.hf_io import save_hf

        save_hf(self.trainable.merged(state.params, self.actor_roles(roles)), self.cfg.model, out_dir,
                tokenizer_dir=self.tokenizer_dir(), special_ids=self.special_token_ids())
        if self.trainable.is_lora:
            self.trainable.export_adapter(state.params, str(Path(out_dir) / "adapter"), self.cfg.model.hf_path)

    def start(self, state, roles):
        self._host_step = int(jax.device_get(state.step))

    def _check_truncation_penalty(self, metrics) -> None:
        """Once: a truncation penalty above the rewards finished responses get makes never stopping pay."""
        self._penalty_checked = True
        if self.a.truncated_response != "penalize" or "reward_ended_min" not in metrics:
            return
        low = float(jax.device_get(metrics["reward_ended_min"]))
        if np.isfinite(low) and self.a.truncation_penalty > low:
            self.rt.log(f"warning: algorithm.truncation_penalty={self.a.truncation_penalty} is above the lowest "
                        f"(standardised) reward of a finished response in the first rollout ({low:.3g}): a policy "
                        "can gain by never ending its answers; set the penalty below the reward range or "
                        "standardise the reward (algorithm.reward_offset / reward_scale)")

    def step(self, state, roles, batch):
        timing = self.cfg.train.timing
        step = self._host_step
        t0 = time.perf_counter()
        roll = self.sampler(self.policy(state, roles)[0], roles, np.asarray(batch["prompt_index"]), step)
        if timing:
            jax.block_until_ready(roll.out)
        t1 = time.perf_counter()
        order = self.update_order(step)
        packed = self.packs_this_step(roll.out, order, step)
        score = self._score_packed if packed else self._score_unpacked
        critic = state.extra["critic"]["params"] if self.has_critic else None
        prep, metrics, new_kl = score(state.params, critic, self.scoring_roles(roles), roll.out, roll.given,
                                      state.extra["kl_coef"], roll.row_valid)
        if not self._penalty_checked:
            self._check_truncation_penalty(metrics)
        metrics = {k: v for k, v in metrics.items() if k != "reward_ended_min"}
        if timing:
            jax.block_until_ready(prep)
        t2 = time.perf_counter()
        state, train_metrics = self.update(state, prep, step, self.actor_roles(roles), packed=packed, order=order)
        state = state.replace(step=state.step + 1, extra=dict(state.extra, kl_coef=new_kl))
        if timing:
            jax.block_until_ready(state.params)
        t3 = time.perf_counter()
        self._host_step = step + 1
        metrics = dict(metrics, **train_metrics, **roll.metrics, kl_coef=jnp.copy(new_kl))  # state's buffer is donated next
        if self.pack:
            metrics["pack_fallback"] = jnp.float32(not packed)
        if timing:
            metrics.update(time_rollout=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
        return state, metrics

    def reward_roles(self, roles) -> dict:
        return roles.on_device(sorted(self.rm_cfgs))

    def scoring_roles(self, roles) -> dict:
        return roles.on_device([*dict.fromkeys((self.reference_role, *self.trainable.role_specs())),
                                *sorted(self.rm_cfgs)])

    # ---- rollout --------------------------------------------------------------------------------
    def _rollout_key(self, step: int):
        return self.sampler._key(step, 0)

    def sample(self, params, prompt_ids, key, greedy: bool = False) -> dict:
        a = self.a
        return xp.sample(self.rollout.reshard(params), self.gen_cfg, prompt_ids, max_new_tokens=a.max_new_tokens,
                         new_len=self.N, prompt_len=self.P, key=key, eos_ids=sorted(self.tokenizer.eos_ids),
                         pad_id=self.tokenizer.pad_id, mesh=self.rt.mesh, rules=self.rollout.rules,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, greedy=greedy,
                         rollout=self.cfg.rollout)

    # ---- scoring (one jitted program) -----------------------------------------------------------
    def _score_impl(self, params, critic, roles, out, given, kl_coef, row_valid=None, *, packed: bool = False):
        """Rows, log-probs, values, the shaped reward, advantages and mismatch weights of one rollout.

        ``given``: reward components already scored (rules, and with dynamic sampling the reward models);
        ``row_valid`` [N]: 0 for rows that must not train (dynamic sampling's unfilled slots). ``packed``: the
        forwards run on packed rows (``self.pack.score_rows`` x ``row_len``), their results read back per sample."""
        require_mesh_context("the RL scoring program")
        a, T = self.a, self.a.temperature
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        view = pk.packed_view(rows, self.pack.score_rows, self.pack.row_len) if packed else None
        if view is not None:
            view["rows"] = {k: _constrain_rows(v) for k, v in view["rows"].items()}
        on_rows = (lambda fn: pk.per_token(fn, view)) if packed else (lambda fn: fn(rows))
        mask0 = rows["mask"] if row_valid is None else rows["mask"] * row_valid[:, None]
        ended = rows["ended"] > 0
        ref = on_rows(lambda r: token_logps(roles[self.reference_role], r, self.cfg.model, T))
        policy = self.trainable.forward_params(params, roles)
        old = None if self.old_from_update else on_rows(lambda r: token_logps(policy, r, self.cfg.model, T))
        raw = dict(given or {})
        raw.update(model_components(self.terms, roles, self.rm_cfgs, rows, raw, view))
        _, score, reward_metrics = shape_rewards(self.terms, a, raw, rows["lengths"], ended)
        mask = mask0
        if a.truncated_response == "mask":
            mask = mask0 * ended[:, None].astype(mask0.dtype)
        values = on_rows(lambda r: token_values(critic, r, self.critic_cfg)) if self.has_critic else None
        seq_kl = jnp.sum(kl_k1(old, ref, mask0), axis=-1) if old is not None else None
        extra, metrics, new_kl = self.estimator.fn(a, self.sizes, AdvantageInputs(old, ref, values, score, mask,
                                                                                  seq_kl, kl_coef))
        weight = mask
        if a.loss_aggregation == "sequence":  # per-sequence token mean, then the mean over sequences
            weight = mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
        prep = {k: rows[k] for k in ROW_KEYS}
        prep.update(extra, score=score, weight=weight)
        if a.kl_in == "loss":
            prep["ref_logps"] = ref
        if old is not None:
            prep["old_logps"] = old
        metrics = dict(metrics, **reward_metrics, **_mean_std(score, row_valid),
                       response_length=jnp.mean(rows["lengths"].astype(jnp.float32)),
                       ended_with_eos=jnp.mean(rows["ended"]),
                       truncated_fraction=1.0 - jnp.mean(rows["ended"]),
                       trained_fraction=jnp.mean((jnp.sum(mask, -1) > 0).astype(jnp.float32)))
        if self.pack:  # the share of the positions the score forwards ran on that are padding
            metrics["padding_fraction"] = pk.padding_fraction((view["rows"] if packed else rows)["segment_ids"])
        if seq_kl is not None:
            metrics["kl"] = jnp.mean(seq_kl)
            metrics["logprob_max_diff"] = jnp.max(jnp.where(mask0 > 0, jnp.abs(old - rows["sampler_logps"]), 0.0))
            mm = rollout_mismatch_metrics(old, rows["sampler_logps"], mask0)
            metrics.update({k: v for k, v in mm.items() if not k.startswith("num_")})
        if self.mismatch is not None:
            w, mm = self.mismatch.fn(old, rows["sampler_logps"], mask0, a.mismatch_cap)
            prep["is_weight"] = w
            metrics.update({k: v for k, v in mm.items() if k.startswith("is_")})
        return prep, metrics, new_kl

    # ---- training -------------------------------------------------------------------------------
    @staticmethod
    def normalizers(batch):
        """The global counts of the whole minibatch: ``n`` valid tokens (or sequences, with per-sequence
        weights) and ``seqs`` sequences with a trained token (sequence-level objectives)."""
        return {"n": jnp.sum(batch["weight"]), "seqs": jnp.sum(jnp.sum(batch["weight"], -1) > 0).astype(jnp.float32)}

    def policy_terms(self, params, mb, norms):
        """(token log-probs at T, entropy-bonus loss, entropy metric or None): entropy only when it is trained."""
        cfg, T = self.cfg.model, self.a.temperature
        if self.a.entropy_coef:
            logps, ent = pk.forward_rows(lambda r: token_logps(params, r, cfg, T, return_entropy=True), mb)
            e_loss, em = entropy_bonus(ent, mb["weight"], self.a.entropy_coef, norms["n"])
            return logps, e_loss, em["entropy"]
        return pk.forward_rows(lambda r: token_logps(params, r, cfg, T), mb), 0.0, None

    @staticmethod
    def old_logps(mb, logps):
        """The behaviour log-probs: scored before the update, or (one update per rollout) this very forward."""
        return mb["old_logps"] if "old_logps" in mb else jax.lax.stop_gradient(logps)

    def _update_impl(self, state, prep, idx, actor_roles, *, packed: bool = False):
        s = self.sizes
        mb = {}
        for k, x in prep.items():
            axes = ("batch",) + (("seq",) if x.ndim > 1 else ()) + (None,) * max(x.ndim - 2, 0)
            mb[k] = jax.lax.with_sharding_constraint(
                x[idx].reshape((s.accum, s.micro) + x.shape[1:]), field_sharding(self.rt.mesh, self.rt.rules, axes))
        if packed:  # each accumulation step's samples into pack.micro_rows rows (the plan: packed_rows)
            views = jax.vmap(lambda r: pk.packed_view(r, self.pack.micro_rows, self.pack.row_len))(
                {k: mb[k] for k in ROW_KEYS})
            sharding = field_sharding(self.rt.mesh, self.rt.rules, ("batch", "seq"))
            mb["packed"] = {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in views["rows"].items()}
            mb["pack_dest"] = views["dest"]
        sub = state.replace(extra={})
        new, m = self._actor_step(sub, actor_roles, mb)
        out = state.replace(params=new.params, opt_state=new.opt_state)
        metrics = {("policy_" + k if k in ("grad_norm", "skipped") else k): v for k, v in m.items()}
        metrics["actor_loss"] = metrics.pop("loss")
        if self.has_critic:
            c = state.extra["critic"]
            csub = state.replace(params=c["params"], opt_state=c["opt_state"], extra={})
            cnew, cm = self._critic_step(csub, None, mb)
            out = out.replace(extra=dict(state.extra, critic={"params": cnew.params, "opt_state": cnew.opt_state}))
            metrics.update(value_loss=cm["loss"], value_clip_fraction=cm["value_clip_fraction"],
                           value_mean=cm["value_mean"], return_mean=cm["return_mean"],
                           critic_grad_norm=cm["grad_norm"], critic_skipped=cm["skipped"])
        metrics["skipped"] = metrics["policy_skipped"] + metrics.get("critic_skipped", 0)
        return out, metrics

    def update_order(self, step: int) -> np.ndarray:
        """[ppo_epochs * minibatches, minibatch] row indices of the step's updates: a shuffle per epoch."""
        s, order = self.sizes, np.random.default_rng([self.cfg.train.seed, step])
        perms = [order.permutation(s.rollout) for _ in range(self.a.ppo_epochs)]
        return np.stack([p[i * s.minibatch:(i + 1) * s.minibatch] for p in perms for i in range(s.minibatches)])

    def packs_this_step(self, out, order: np.ndarray, step: int) -> bool:
        """Whether this step's rollout fits the packed shapes (``algorithm.pack_rows``), for the score pass and
        every accumulation step of ``order``; when it does not, says so: the step then runs unpacked."""
        if self.pack is None:
            return False
        if bool(jax.device_get(self._pack_fits(out, jax.device_put(jnp.asarray(order, jnp.int32), self.replicated)))):
            return True
        p = self.pack
        self.rt.log(f"step {step}: the rollout's samples do not fit algorithm.pack_rows_per_micro={p.micro_rows} "
                    f"packed rows of algorithm.pack_row_len={p.row_len} tokens per {self.sizes.micro} samples: this "
                    "step scores and trains on unpacked rows (raise either key to pack every step)")
        return False

    def _pack_fits_impl(self, out, order):
        return pk.rollout_fits(xp.rollout_rows(out, self.tokenizer.pad_id)["segment_ids"], order, self.sizes.micro,
                               self.pack)

    def update(self, state, prep, step: int, actor_roles=None, packed: Optional[bool] = None,
               order: Optional[np.ndarray] = None):
        """``ppo_epochs`` shuffled passes of minibatch updates; metrics averaged over the updates (on device).
        ``packed``: on packed rows (default: as configured; the caller has checked they fit)."""
        s = self.sizes
        rows = prep["tokens"].shape[0]
        if rows != s.rollout:  # an index past the rows would be clamped silently inside jit
            raise ValueError(f"rollout has {rows} rows, expected {s.rollout} (prompts x samples per prompt)")
        order = self.update_order(step) if order is None else order
        packed = self.pack is not None if packed is None else packed
        if packed and self.pack is None:
            raise ValueError("update(packed=True) needs algorithm.pack_rows: true")
        fn = self._update_packed if packed else self._update_unpacked
        collected = []
        for chosen in order:
            state, m = fn(state, prep, jax.device_put(jnp.asarray(chosen, jnp.int32), self.replicated), actor_roles)
            collected.append(m)
        return state, _reduce_minibatch_metrics(collected, self.a.ppo_epochs)

    def build_update(self, actor_loss) -> None:
        """(Re)build the jitted minibatch update around ``actor_loss(params, mb, norms, roles)``, which is
        given the actor's forward params (under LoRA: the frozen base with the trained adapters, LoRA
        dropout keyed by ``norms["rng"]``)."""
        def trained_loss(params, mb, norms, roles):
            return actor_loss(self.trainable.forward_params(params, roles, norms.get("rng")), mb, norms, roles)

        dropout = self.trainable.is_lora and self.cfg.model.lora.dropout > 0
        self._actor_step = make_train_step(trained_loss, self.normalizers, self.actor, with_rng=dropout)
        shardings = self._state_shardings()

        def jitted(packed):
            return jax.jit(functools.partial(self._update_impl, packed=packed),
                           in_shardings=(shardings, None, self.replicated, None),
                           out_shardings=(shardings, self.replicated), donate_argnums=(0,))

        self._update_unpacked = jitted(False)
        self._update_packed = jitted(True) if self.pack else None
        self._update = self._update_packed or self._update_unpacked  # the configured layout (jalign plan)

    def actor_loss(self, params, mb, norms, roles):
        """``algorithm.policy_loss`` on the (mismatch-weighted) advantages, + kl_coef * k3 with ``kl_in: loss``,
        + the entropy bonus."""
        a = self.a
        logps, e_loss, ent = self.policy_terms(params, mb, norms)
        adv = mb["advantages"] if "is_weight" not in mb else with_is_weight(mb["advantages"], mb["is_weight"])
        pl, m = self.objective.fn(a, logps, self.old_logps(mb, logps), adv, mb["weight"], norms)
        loss = pl + e_loss
        out = dict(m, policy_loss=pl)
        if a.kl_in == "loss":
            kl = kl_loss_term(logps, mb["ref_logps"], mb["weight"], norms["n"])
            loss = loss + a.kl_coef * kl
            out["kl_loss"] = kl
        if ent is not None:
            out["entropy"] = ent
        out["loss"] = loss
        return loss, out


    # ---- the run's programs (jalign plan) -------------------------------------------------------
    def programs(self):
        """Rollout (the sampler with its KV cache), scoring, the minibatch update, the evaluation's programs."""
        from jalign.abstract import Program, generate_program, generation_eval_programs, sampler_output, state_uses

        s, a, rt = self.sizes, self.a, self.rt
        roles, configs, _ = self.abstract_roles()
        state = self.abstract_state()
        progs = {}
        gen_params = state.params
        if self.rollout.active:
            progs["rollout_reshard"] = self.rollout.reshard_program(state.params)
            gen_params = self.rollout.abstract(state.params)
        progs["rollout"] = generate_program(
            gen_params, self.gen_cfg, rt.mesh, self.rollout.rules, batch=s.rollout, prompt_len=self.P, new_len=self.N,
            top_k=a.top_k, top_p=a.top_p, num_end_ids=len(self.tokenizer.eos_ids) or 1, uses=("params",),
            max_new_tokens=a.max_new_tokens, num_samples=s.per_prompt,
            note=f"{s.prompts} prompts x {s.per_prompt} samples, {self.P} + {self.N} slots")
        critic = state.extra["critic"]["params"] if self.has_critic else None
        score_roles = {n: roles[n] for n in (self.reference_role, *self.trainable.role_specs(), *sorted(self.rm_cfgs))
                       if n in roles}

        def score_args(outs):
            out = sampler_output(outs, "rollout", progs["rollout"])
            given = {t.name: jax.ShapeDtypeStruct((s.rollout,), jnp.float32, sharding=out["lengths"].sharding)
                     for t in rule_terms(self.terms)}
            return state.params, critic, score_roles, out, given, state.extra["kl_coef"]

        progs["score"] = Program(self._score, score_args, uses=("params",) + (("critic",) if self.has_critic else ())
                                 + tuple(f"role:{n}" for n in score_roles), note=f"{s.rollout} rows" if not self.pack else
                                 f"{s.rollout} samples packed into {self.pack.score_rows} rows of {self.pack.row_len}")
        idx = jax.ShapeDtypeStruct((s.minibatch,), jnp.int32, sharding=self.replicated)
        actor_roles = {BASE: roles[BASE]} if self.trainable.is_lora and BASE in roles else None
        progs["update"] = Program(self._update, lambda outs: (state, outs["score"][0], idx, actor_roles),
                                  uses=state_uses(state),
                                  note=(f"{s.accum} x {s.micro} rows" if not self.pack else f"{s.accum} x {s.micro} samples "
                                        f"packed into {self.pack.micro_rows} rows of {self.pack.row_len}")
                                  + f", {s.minibatches * a.ppo_epochs} per step")
        progs.update(self.actor.update_phase_programs("update/actor"))
        if self.has_critic:
            progs.update(self.critic.update_phase_programs("update/critic"))
        if self.generation_eval is not None:
            params, mcfg = (self.trainable.forward_params(state.params, {BASE: roles[BASE]} if BASE in roles else None),
                            self.cfg.model)
            progs.update(generation_eval_programs(self.generation_eval, params, mcfg, roles, configs))
        return progs


@functools.partial(jax.jit, static_argnums=1)
def _reduce_minibatch_metrics(collected: list, ppo_epochs: int) -> dict:
    """One program for the step's metrics over its minibatch updates (dozens of eager multi-device ops
    queued behind the updates could exhaust XLA:CPU's in-flight executions of simulated devices)."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *collected)
    out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in stacked.items()}
    out["skipped"] = jnp.max(stacked["skipped"])
    out["num_tokens"] = jnp.sum(stacked["num_tokens"]) / ppo_epochs
    return out


def _constrain_rows(x):
    """Packed rows [R, C] sharded like the rollout's rows (batch over data/fsdp, seq over sequence)."""
    return constrain(x, ("batch", "seq"))


def _mean_std(score, row_valid) -> dict:
    """reward_mean / reward_std of the rows that train (all rows, or those with ``row_valid`` = 1)."""
    if row_valid is None:
        return {"reward_mean": jnp.mean(score), "reward_std": jnp.std(score)}
    n = jnp.maximum(jnp.sum(row_valid), 1.0)
    mean = jnp.sum(score * row_valid) / n
    return {"reward_mean": mean, "reward_std": jnp.sqrt(jnp.sum(jnp.square(score - mean) * row_valid) / n)}
