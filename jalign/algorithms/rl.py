"""What every generate-then-train RL algorithm shares (PPO, GRPO, RLOO and their successors).

One ``step(state, roles, {"prompt_index"})`` is:

1. rollout  K samples of each of the P prompts at temperature T with the actor (``rollout.experience``):
            the result stays on the devices in the sampler's layout; a rule reward pulls only the tokens and
            lengths of each process's own rows to the host;
2. score    one jitted program: the training rows, old log-probs of the actor at logits/T (skipped when the
            rollout is used for one update and the estimator does not need them), reference log-probs, critic
            values, the reward (reward-model role or the rule's), standardisation, the truncation rule, then
            an advantage estimator from ``ADVANTAGES`` (GAE, group-normalised, leave-one-out, ...);
3. train    ``ppo_epochs`` passes over the N = P*K rows in minibatches, each one jitted program running the
            actor's (and a critic's) train step with accumulation and the global count of that minibatch.

Train state: ``TrainState(step, params=actor, opt_state, rng, extra={"kl_coef", "critic": {...}})``. The
reference and reward model are roles (``roles.reference``, ``roles.reward``): frozen, never in an optimizer,
never donated, never checkpointed.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.base import (Algorithm, field_sharding, initial_policy_params, make_train_step,
                                    require_mesh_context, state_rng)
from jalign.config import ConfigError
from jalign.evaluation import GenerationEval
from jalign.losses import entropy_bonus, kl_k1, masked_mean
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.heads import sequence_scores, token_logps, token_values
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp
from jalign.state import TrainedModel

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids")


@dataclass
class RLConfig:
    """What PPO, GRPO and RLOO share: rollout, reward, KL to the reference, minibatching.

    One step = ``train.global_batch`` prompts x ``num_rollouts_per_prompt`` samples (the rollout batch), then
    ``ppo_epochs`` passes over it in minibatches of ``minibatch_size`` rows (None = the whole rollout), each
    split into accumulation steps of ``micro_batch_size`` rows (None = minibatch). The reward is a reward
    model (``roles.reward: run:DIR``) or a rule (``reward_fn``): exactly one.
    """

    global_batch_counts: ClassVar[str] = "prompts"  # train.global_batch is prompts per step (rows: x K samples)

    name: str = ""
    reward_fn: Optional[str] = None  # a rule-based reward from jalign.rewards (e.g. exact_match)
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
    # Reward standardisation (NeMo-Aligner's reward_standardization): r <- clip((r - offset) / scale, +-clip),
    # applied to the raw reward before the truncation penalty and the KL term.
    reward_offset: float = 0.0
    reward_scale: float = 1.0
    reward_clip: Optional[float] = None
    # "tensor": sample from a copy of the actor resharded once per rollout to tensor-parallel only (replicated
    # over data/fsdp, compute dtype) instead of all-gathering fsdp-sharded weights at every decode step
    # (jalign.rollout.layout; `jalign plan` shows both).
    rollout_layout: Literal["train", "tensor"] = "train"


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
    has_rm = "reward" in cfg.roles
    if has_rm == (a.reward_fn is not None):
        raise ConfigError(f"{src}: set exactly one of roles.reward (a reward-model run: roles.reward=run:DIR) and "
                          f"algorithm.reward_fn (a rule-based reward, e.g. exact_match)")
    if a.temperature <= 0:
        raise ConfigError(f"{src}: algorithm.temperature must be > 0 for RL sampling, got {a.temperature}")
    if a.reward_scale <= 0 or (a.reward_clip is not None and a.reward_clip <= 0):
        raise ConfigError(f"{src}: algorithm.reward_scale and algorithm.reward_clip must be > 0, got "
                          f"{a.reward_scale} and {a.reward_clip}")
    return Sizes(P, K, N, M, mu, dp)


def standardize_reward(score, offset: float, scale: float, clip: Optional[float]):
    """``clip((score - offset) / scale, -clip, clip)`` (no clipping when ``clip`` is None)."""
    score = (score - offset) / scale
    return score if clip is None else jnp.clip(score, -clip, clip)


# ---- the algorithm ------------------------------------------------------------------------------
class RLAlgorithm(Algorithm):
    """Rollout, scoring, minibatch updates shared by the RL algorithms (see the module docstring).

    A variant sets ``has_critic`` / ``min_per_prompt`` / ``needs_old_logps`` and implements ``advantages``
    (inside the jitted scoring program) and ``actor_loss``.
    """

    has_critic = False
    min_per_prompt = 1
    needs_old_logps = True  # the advantage estimator reads the behaviour log-probs (e.g. a KL-penalised reward)
    role_names = ("reference", "reward")

    def __init__(self, rt):
        super().__init__(rt)
        cfg, a = self.cfg, self.a
        self.sizes = check_sizes(cfg, rt.mesh, self.min_per_prompt)
        self.rule = None
        if a.reward_fn:
            from jalign.rewards import get_reward

            try:
                self.rule = get_reward(a.reward_fn)
            except ValueError as e:
                raise ConfigError(f"{cfg.source or '<config>'}: {e}") from None
        self.decls = tfm.declare_params(cfg.model)
        self.gen_cfg = dataclasses.replace(cfg.model, init_from=None, hf_path=None)
        self.updates = cfg.train.steps * a.ppo_epochs * self.sizes.minibatches
        self.actor = TrainedModel(self.decls, cfg.optim, self.updates, rt.mesh, rt.rules,
                                  params_lib.DTYPES[cfg.model.param_dtype])
        self.replicated = NamedSharding(rt.mesh, PartitionSpec())
        self.single_use = a.ppo_epochs == 1 and self.sizes.minibatches == 1
        self.old_from_update = self.single_use and not self.needs_old_logps
        self.rm_cfg = self._reward_model_config()
        if self.has_critic:
            self._init_critic()
        self._load_data()
        from jalign.rollout.layout import RolloutLayout

        self.rollout = RolloutLayout(a.rollout_layout, self.decls, cfg.model, rt.mesh, rt.rules)
        self._actor_step = make_train_step(self.actor_loss, self.normalizers, self.actor)
        self._score = jax.jit(self._score_impl)
        shardings = self._state_shardings()
        self._update = jax.jit(self._update_impl, in_shardings=(shardings, None, self.replicated),
                               out_shardings=(shardings, self.replicated), donate_argnums=(0,))
        self._host_step = 0
        self._penalty_checked = False
        reward_role = "reward" if "reward" in cfg.roles else None
        self.generation_eval = (GenerationEval(rt, self.tokenizer, self.eval_set, kl_role="reference",
                                               reward_role=reward_role, reward_attribute=a.reward_attribute,
                                               reward_fn=self._rule_fn() if self.rule else None)
                                if self.eval_set is not None and cfg.eval.prompts > 0 else None)

    def _reward_model_config(self):
        """The reward role's architecture (from its own run), known before any weights are loaded."""
        if "reward" not in self.cfg.roles:
            return None
        from jalign.models import load
        from jalign.roles import role_architecture

        source = load.parse_source(self.cfg.roles["reward"].source, where="roles.reward")
        rm = role_architecture(self.cfg, source, "roles.reward")
        if rm.vocab_size != self.cfg.model.vocab_size:
            raise ConfigError(f"roles.reward={source}: vocab_size {rm.vocab_size} differs from the policy's "
                              f"{self.cfg.model.vocab_size}: the reward model must share the tokenizer")
        return rm

    def _rule_fn(self):
        """(prompt text, response, reference, example) -> reward; the example's other fields reach the rule."""
        return lambda p, r, ref, ex: self.rule(p, r, ref, fields=getattr(ex, "fields", None))

    # ---- construction ---------------------------------------------------------------------------
    def role_specs(self):
        return {"reference": RoleSpec(what="reference model"),
                "reward": RoleSpec(source=None, lm_head=False, score_outputs=-1, what="reward model")}

    def critic_source(self) -> Optional[str]:
        """The critic's starting weights: ``algorithm.critic_init``, else the reward model's, else the policy's."""
        a = self.a
        if getattr(a, "critic_init", None):
            return a.critic_init
        if "reward" in self.cfg.roles:
            return self.cfg.roles["reward"].source
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
        params = initial_policy_params(self.rt, self.decls)
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
        idx = np.repeat(np.asarray(batch["prompt_index"]), self.sizes.per_prompt)
        out = self.sample(state.params, [self.train_prompts.ids[i] for i in idx], self._rollout_key(step))
        score = None
        if self.rule is not None:
            score, _, _ = xp.rule_scores(self._rule_fn(), self.tokenizer, out, list(idx), self.train_prompts)
        if timing:
            jax.block_until_ready(out)
        t1 = time.perf_counter()
        critic = state.extra["critic"]["params"] if self.has_critic else None
        prep, metrics, new_kl = self._score(state.params, critic, self.scoring_roles(roles), out, score,
                                            state.extra["kl_coef"])
        if not self._penalty_checked:
            self._check_truncation_penalty(metrics)
        metrics = {k: v for k, v in metrics.items() if k != "reward_ended_min"}
        if timing:
            jax.block_until_ready(prep)
        t2 = time.perf_counter()
        state, train_metrics = self.update(state, prep, step)
        state = state.replace(step=state.step + 1, extra=dict(state.extra, kl_coef=new_kl))
        if timing:
            jax.block_until_ready(state.params)
        t3 = time.perf_counter()
        self._host_step = step + 1
        metrics = dict(metrics, **train_metrics, kl_coef=jnp.copy(new_kl))  # the state's own buffer is donated next
        if timing:
            metrics.update(time_rollout=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
        return state, metrics

    def scoring_roles(self, roles) -> dict:
        names = ["reference"] + (["reward"] if "reward" in roles else [])
        return roles.on_device(names)

    # ---- rollout --------------------------------------------------------------------------------
    def _rollout_key(self, step: int):
        return jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)

    def sample(self, params, prompt_ids, key, greedy: bool = False) -> dict:
        a = self.a
        return xp.sample(self.rollout.reshard(params), self.gen_cfg, prompt_ids, max_new_tokens=a.max_new_tokens,
                         new_len=self.N, prompt_len=self.P, key=key, eos_ids=sorted(self.tokenizer.eos_ids),
                         pad_id=self.tokenizer.pad_id, mesh=self.rt.mesh, rules=self.rollout.rules,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, greedy=greedy)

    # ---- scoring (one jitted program) -----------------------------------------------------------
    def _score_impl(self, params, critic, roles, out, rule_score, kl_coef):
        require_mesh_context("the RL scoring program")
        a, T = self.a, self.a.temperature
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        mask0 = rows["mask"]
        ended = rows["ended"] > 0
        ref = token_logps(roles["reference"], rows, self.cfg.model, T)
        old = None if self.old_from_update else token_logps(params, rows, self.cfg.model, T)
        if "reward" in roles:
            score = sequence_scores(roles["reward"], rows["tokens"], rows["positions"], rows["segment_ids"],
                                    self.rm_cfg)[:, a.reward_attribute].astype(jnp.float32)
        else:
            score = rule_score
        raw_mean = jnp.mean(score)
        score = standardize_reward(score, a.reward_offset, a.reward_scale, a.reward_clip)
        ended_min = jnp.min(jnp.where(ended, score, jnp.inf))
        mask = mask0
        if a.truncated_response == "penalize":
            score = jnp.where(ended, score, a.truncation_penalty)
        elif a.truncated_response == "mask":
            mask = mask0 * ended[:, None].astype(mask0.dtype)
        values = token_values(critic, rows, self.critic_cfg) if self.has_critic else None
        seq_kl = jnp.sum(kl_k1(old, ref, mask0), axis=-1) if old is not None else None
        extra, metrics, new_kl = self.advantages(old, ref, values, score, mask, seq_kl, kl_coef)
        prep = {k: rows[k] for k in ROW_KEYS}
        prep.update(extra, score=score)
        if old is not None:
            prep["old_logps"] = old
        metrics = dict(metrics, reward_mean=jnp.mean(score), reward_std=jnp.std(score), reward_raw_mean=raw_mean,
                       response_length=jnp.mean(rows["lengths"].astype(jnp.float32)),
                       ended_with_eos=jnp.mean(rows["ended"]),
                       truncated_fraction=1.0 - jnp.mean(rows["ended"]), reward_ended_min=ended_min,
                       trained_fraction=jnp.mean((jnp.sum(mask, -1) > 0).astype(jnp.float32)))
        if seq_kl is not None:
            metrics["kl"] = jnp.mean(seq_kl)
            metrics["logprob_max_diff"] = jnp.max(jnp.where(mask0 > 0, jnp.abs(old - rows["sampler_logps"]), 0.0))
        return prep, metrics, new_kl

    # ---- training -------------------------------------------------------------------------------
    @staticmethod
    def normalizers(batch):
        """The global count of the whole minibatch: valid tokens (or sequences, with per-sequence weights)."""
        return {"n": jnp.sum(batch["weight"])}

    def policy_terms(self, params, mb, norms):
        """(token log-probs at T, entropy-bonus loss, entropy metric or None): entropy only when it is trained."""
        if self.a.entropy_coef:
            logps, ent = token_logps(params, mb, self.cfg.model, self.a.temperature, return_entropy=True)
            e_loss, em = entropy_bonus(ent, mb["weight"], self.a.entropy_coef, norms["n"])
            return logps, e_loss, em["entropy"]
        return token_logps(params, mb, self.cfg.model, self.a.temperature), 0.0, None

    @staticmethod
    def old_logps(mb, logps):
        """The behaviour log-probs: scored before the update, or (one update per rollout) this very forward."""
        return mb["old_logps"] if "old_logps" in mb else jax.lax.stop_gradient(logps)

    def _update_impl(self, state, prep, idx):
        s = self.sizes
        mb = {}
        for k, x in prep.items():
            axes = ("batch",) + (("seq",) if x.ndim > 1 else ()) + (None,) * max(x.ndim - 2, 0)
            mb[k] = jax.lax.with_sharding_constraint(
                x[idx].reshape((s.accum, s.micro) + x.shape[1:]), field_sharding(self.rt.mesh, self.rt.rules, axes))
        sub = state.replace(extra={})
        new, m = self._actor_step(sub, None, mb)
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

    def update(self, state, prep, step: int):
        """``ppo_epochs`` shuffled passes of minibatch updates; metrics averaged over the updates (on device)."""
        s = self.sizes
        rows = prep["tokens"].shape[0]
        if rows != s.rollout:  # an index past the rows would be clamped silently inside jit
            raise ValueError(f"rollout has {rows} rows, expected {s.rollout} (prompts x samples per prompt)")
        order = np.random.default_rng([self.cfg.train.seed, step])
        collected = []
        for _ in range(self.a.ppo_epochs):
            perm = order.permutation(s.rollout)
            for i in range(s.minibatches):
                idx = jax.device_put(jnp.asarray(perm[i * s.minibatch:(i + 1) * s.minibatch], jnp.int32),
                                     self.replicated)
                state, m = self._update(state, prep, idx)
                collected.append(m)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *collected)
        out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in stacked.items()}
        out["skipped"] = jnp.max(stacked["skipped"])
        out["num_tokens"] = jnp.sum(stacked["num_tokens"]) / self.a.ppo_epochs
        return state, out

    # ---- to implement ---------------------------------------------------------------------------
    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        raise NotImplementedError

    def actor_loss(self, params, mb, norms, roles):
        raise NotImplementedError

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
            note=f"{s.prompts} prompts x {s.per_prompt} samples, {self.P} + {self.N} slots")
        critic = state.extra["critic"]["params"] if self.has_critic else None
        score_roles = {n: roles[n] for n in ("reference", "reward") if n in roles}

        def score_args(outs):
            out = sampler_output(outs, "rollout", progs["rollout"])
            rule = (jax.ShapeDtypeStruct((s.rollout,), jnp.float32, sharding=out["lengths"].sharding)
                    if self.rule is not None else None)
            return state.params, critic, score_roles, out, rule, state.extra["kl_coef"]

        progs["score"] = Program(self._score, score_args, uses=("params",) + (("critic",) if self.has_critic else ())
                                 + tuple(f"role:{n}" for n in score_roles), note=f"{s.rollout} rows")
        idx = jax.ShapeDtypeStruct((s.minibatch,), jnp.int32, sharding=self.replicated)
        progs["update"] = Program(self._update, lambda outs: (state, outs["score"][0], idx), uses=state_uses(state),
                                  note=f"{s.accum} x {s.micro} rows, {s.minibatches * a.ppo_epochs} per step")
        progs.update(self.actor.update_phase_programs("update/actor"))
        if self.has_critic:
            progs.update(self.critic.update_phase_programs("update/critic"))
        if self.generation_eval is not None:
            params, mcfg = self.policy(state, None)
            progs.update(generation_eval_programs(self.generation_eval, params, mcfg, roles, configs))
        return progs
