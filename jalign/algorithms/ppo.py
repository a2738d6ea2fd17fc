"""RLHF with PPO (actor, critic, reference, reward) and the critic-free GRPO and RLOO, on one mesh.

One ``step(state, {"prompt_index"})`` is:

1. rollout   ``generate`` K samples for each of the P prompts at temperature T (the actor's params);
2. score     one jitted forward program: old log-probs of the actor at logits/T (recomputed, and
             checked against generate's ``logprobs_tempered``: metric ``logprob_max_diff``), reference
             log-probs, critic values, the reward at the last token (reward model or rule); then the
             variant's advantages (PPO: per-token KL-penalised rewards + GAE + global whitening;
             GRPO: group-normalised; RLOO: leave-one-out);
3. train     ``ppo_epochs`` passes over the N = P*K rows in minibatches; each minibatch is one jitted
             program running the actor's (and PPO's critic's) ``make_train_step`` with gradient
             accumulation and the global valid-token normaliser of that minibatch.

The train state is ``{"step", "params" (actor), "opt_state" (actor), "rng", "kl_coef", "critic":
{"params", "opt_state"}}`` (no critic for GRPO/RLOO). The reference and reward model are frozen: they
live outside the state, are never in an optimizer, never donated and never checkpointed (they are
reloaded from their runs on resume). With ``algorithm.offload_frozen`` they are parked in pinned host
memory and copied to the devices only for the scoring pass of each step.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms import base
from jalign.algorithms import rl_common as rl
from jalign.config import ConfigError
from jalign.data.tokenizer import load_tokenizer
from jalign.losses import (adaptive_kl_coef, entropy_bonus, explained_variance, gae, grpo_advantages, grpo_loss,
                           kl_abs, kl_k1, kl_k3, masked_mean, ppo_policy_loss, ppo_value_loss, reinforce_loss,
                           rloo_advantages, token_rewards, whiten)
from jalign.models import params as params_lib
from jalign.models import transformer as tfm

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids")


class RLAlgorithm:
    """Rollout, scoring, minibatch updates and evaluation shared by PPO, GRPO and RLOO.

    A variant sets ``has_critic`` / ``min_per_prompt`` and implements ``advantages`` (inside the jitted
    scoring program) and ``actor_loss``.
    """

    has_critic = False
    min_per_prompt = 1

    def __init__(self, rt: base.Runtime):
        self.rt = rt
        cfg, a = rt.cfg, rt.cfg.algorithm
        self.cfg, self.a = cfg, a
        self.sizes = rl.check_sizes(cfg, rt.mesh, self.min_per_prompt)
        self.tokenizer = rt.tokenizer or load_tokenizer(cfg.model.tokenizer)
        self.decls = tfm.declare_params(cfg.model)
        # where the weights came from does not change the program: one compiled sampler across stages
        self.gen_cfg = dataclasses.replace(cfg.model, init_from=None, hf_path=None)
        updates = cfg.train.steps * a.ppo_epochs * self.sizes.minibatches
        self.schedule = base.make_schedule(cfg.optim, updates)
        self.optimizer = base.make_optimizer(cfg.optim, updates)
        self.actor_shardings = base.state_shardings(self.decls, self.optimizer, rt.mesh, rt.rules)
        self.replicated = NamedSharding(rt.mesh, PartitionSpec())
        self.rm_cfg = rl.run_model_config(a.reward_model) if a.reward_model else None
        if self.rm_cfg is not None and self.rm_cfg.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"algorithm.reward_model={a.reward_model}: vocab_size {self.rm_cfg.vocab_size} differs "
                              f"from the policy's {cfg.model.vocab_size}: the reward model must share the tokenizer")
        self.rule = rl.RuleReward(a.reward_fn, self.tokenizer) if a.reward_fn else None
        if self.has_critic:
            self._init_critic(updates)
        self._load_data()
        self._actor_step = base.make_train_step(self.actor_loss, self.normalizers, self.optimizer, self.schedule,
                                                self.actor_shardings, rt.mesh)
        self.state_shardings = self._state_shardings()
        self._prepare = jax.jit(self._prepare_impl)
        self._update = jax.jit(self._update_impl, in_shardings=(self.state_shardings, None, self.replicated),
                               out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        self._ref = None
        self._frozen_cache = None

    # ---- construction ---------------------------------------------------------------------------
    def _init_critic(self, updates):
        cfg, a = self.cfg, self.a
        self.critic_src = a.critic_init_from or a.reward_model or cfg.model.init_from
        has_cfg = self.critic_src and (Path(self.critic_src) / "config.yaml").is_file()
        self.critic_cfg = rl.run_model_config(self.critic_src) if has_cfg else cfg.model
        self.critic_decls = tfm.declare_params(self.critic_cfg, lm_head=False, score_outputs=1)
        copt = dataclasses.replace(cfg.optim, lr=a.critic_lr or cfg.optim.lr)
        self.critic_optimizer = base.make_optimizer(copt, updates)
        self.critic_shardings = base.state_shardings(self.critic_decls, self.critic_optimizer, self.rt.mesh,
                                                     self.rt.rules)
        self._critic_step = base.make_train_step(self.critic_loss, self.normalizers, self.critic_optimizer,
                                                 base.make_schedule(copt, updates), self.critic_shardings, self.rt.mesh)

    def _load_data(self):
        from jalign.data.tiny import load_source

        d, a = self.cfg.data, self.a
        max_prompt = d.seq_len - a.max_new_tokens
        if max_prompt < 1:
            raise ConfigError(f"{self.cfg.source or '<config>'}: data.seq_len={d.seq_len} leaves no room for a "
                              f"prompt before algorithm.max_new_tokens={a.max_new_tokens}")

        def prompts(spec, limit):
            examples, skipped = load_source(spec, "prompt", d.skip_bad_lines, seed=d.seed, max_examples=limit)
            if skipped:
                self.rt.log(f"data: {spec}: skipped {len(skipped)} bad lines")
            return rl.PromptSet(examples, self.tokenizer, d.chat_template, max_prompt, self.rt.log, spec)

        self.train_prompts = prompts(d.train, d.max_examples)
        self.eval_set = prompts(d.eval, a.eval_prompts) if d.eval and a.eval_prompts > 0 else None
        longest = max(self.train_prompts.longest, self.eval_set.longest if self.eval_set else 0)
        self.prompt_bucket = rl.round_up(longest, 8)
        self.S = rl.round_up(longest + a.max_new_tokens, 8 * self.rt.mesh.shape["sequence"])
        if self.S > self.cfg.model.max_seq_len:
            raise ConfigError(f"prompt ({longest}) + algorithm.max_new_tokens ({a.max_new_tokens}) exceeds "
                              f"model.max_seq_len={self.cfg.model.max_seq_len}")
        self.train_iter = rl.PromptIterator(len(self.train_prompts), self.sizes.prompts, d.seed, d.shuffle)

    def _state_shardings(self) -> dict:
        s = dict(self.actor_shardings, kl_coef=self.replicated)
        if self.has_critic:
            s["critic"] = {"params": self.critic_shardings["params"], "opt_state": self.critic_shardings["opt_state"]}
        return s

    # ---- protocol -------------------------------------------------------------------------------
    def init(self, rng):
        k_params, k_state = jax.random.split(rng)
        params = self._initial_policy(k_params)
        self._ref = jax.tree.map(jnp.copy, params)  # the frozen reference: the initial (SFT) policy
        state = base.init_state(params, self.optimizer, self.actor_shardings, k_state)
        state["kl_coef"] = jax.device_put(jnp.float32(self.a.kl_coef), self.replicated)
        if self.has_critic:
            k_critic = jax.random.fold_in(k_params, 1)
            if self.critic_src:
                cparams, _ = rl.load_scored_model(self.critic_src, self.rt, k_critic, self.rt.log,
                                                  fallback_cfg=self.critic_cfg, what="critic")
            else:
                cparams = params_lib.init_params(self.critic_decls, k_critic,
                                                 params_lib.DTYPES[self.critic_cfg.param_dtype],
                                                 self.critic_shardings["params"])
            copt = jax.jit(self.critic_optimizer.init, out_shardings=self.critic_shardings["opt_state"])(cparams)
            state["critic"] = {"params": cparams, "opt_state": copt}
        return state

    def _initial_policy(self, rng):
        """The SFT policy (``model.init_from`` / ``hf_path``, else random). A checkpoint that does not
        match the model config is an error here: a silently re-initialised actor and reference would
        make the whole RL run meaningless."""
        m = self.cfg.model
        if not m.init_from:
            return base.initial_params(self.rt, self.decls, rng, log=self.rt.log)
        from jalign.checkpoint import load_params

        src = params_lib.flatten(load_params(m.init_from))
        bad = [f"{p} {tuple(src[p].shape) if p in src else 'missing'} != {d.shape}"
               for p, d in params_lib.flatten_decls(self.decls).items()
               if p not in src or tuple(src[p].shape) != tuple(d.shape)]
        if bad:
            raise ConfigError(f"model.init_from={m.init_from}: checkpoint does not match the model section "
                              f"(checkpoint vs config): {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        return base.merge_params(self.decls, params_lib.unflatten(src), rng, self.rt.mesh, self.rt.rules,
                                 params_lib.DTYPES[m.param_dtype], self.rt.log)

    def abstract_state(self):
        dtype = params_lib.DTYPES[self.cfg.model.param_dtype]
        out = base.abstract_state(self.decls, self.optimizer, self.actor_shardings, dtype)
        out["kl_coef"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
        if self.has_critic:
            c = base.abstract_state(self.critic_decls, self.critic_optimizer, self.critic_shardings,
                                    params_lib.DTYPES[self.critic_cfg.param_dtype])
            out["critic"] = {"params": c["params"], "opt_state": c["opt_state"]}
        return out

    def batches(self, split: str):
        if split == "train":
            return self.train_iter
        return iter(())

    def frozen(self) -> dict:
        """{"ref": reference params, "reward": reward-model params or None}; loaded once, never trained."""
        if self._frozen_cache is None:
            ref = self._ref
            if ref is None:  # resumed: rebuild the reference exactly as init() did
                k_params = jax.random.split(jax.random.key(self.cfg.train.seed))[0]
                ref = self._initial_policy(k_params)
            reward = None
            if self.a.reward_model:
                reward, _ = rl.load_scored_model(self.a.reward_model, self.rt, jax.random.key(0), self.rt.log)
            self._frozen_cache = {"ref": ref, "reward": reward}
            if self.a.offload_frozen:
                self._frozen_cache = _to_memory(self._frozen_cache, "pinned_host")
        return self._frozen_cache

    def frozen_on_device(self) -> dict:
        """The frozen roles in device memory for one scoring pass. With ``offload_frozen`` this is a
        transient copy (freed when the pass is done); the parked host copy stays the only long-lived one."""
        frozen = self.frozen()
        return _to_memory(frozen, "device") if self.a.offload_frozen else frozen

    def on_start(self, state, writer) -> dict:
        """Evaluate the initial policy (step 0) so every run records its own "before" numbers."""
        if int(jax.device_get(state["step"])) != 0 or self.eval_set is None or not self.cfg.train.eval_every:
            return {}
        ev = self.evaluate(state)
        writer.write(0, ev, prefix="eval/")
        writer.message("step 0: " + ", ".join(f"eval/{k}={v:.4g}" for k, v in ev.items()))
        return {f"before/{k}": v for k, v in ev.items()}

    def step(self, state, batch):
        step = int(jax.device_get(state["step"]))
        t0 = time.perf_counter()
        rows, info, _ = self.rollout(state["params"], batch["prompt_index"], self._rollout_key(step))
        t1 = time.perf_counter()
        prep, _, pm, new_kl = self.prepare(state, rows)
        jax.block_until_ready(prep)
        t2 = time.perf_counter()
        state, tm = self.update(state, prep, step)
        state["kl_coef"] = jax.device_put(new_kl, self.replicated)
        state["step"] = jax.device_put(jnp.int32(step + 1), self.replicated)
        jax.block_until_ready(state["params"])
        t3 = time.perf_counter()
        metrics = {**{k: float(v) for k, v in jax.device_get(pm).items()}, **tm, **info}
        metrics.update(time_rollout=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                       kl_coef=float(jax.device_get(new_kl)))
        return state, metrics

    def export(self, state, out_dir: str) -> None:
        from jalign.models.hf_io import save_hf

        save_hf(state["params"], self.cfg.model, out_dir)

    # ---- rollout --------------------------------------------------------------------------------
    def _rollout_key(self, step: int):
        return jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)

    def rollout(self, params, prompt_index, key, prompts=None, greedy=False, repeat=True):
        """Sample responses (K per prompt if ``repeat``) -> (host rows [N, S], host metrics, decoded texts)."""
        from jalign.generate import generate

        ps = prompts or self.train_prompts
        idx = np.repeat(np.asarray(prompt_index), self.sizes.per_prompt) if repeat else np.asarray(prompt_index)
        ids = [ps.ids[i] for i in idx]
        a = self.a
        t0 = time.perf_counter()
        out = generate(params, self.gen_cfg, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_k=a.top_k, top_p=a.top_p, greedy=greedy, eos_ids=sorted(self.tokenizer.eos_ids),
                       pad_id=self.tokenizer.pad_id, rng=key, mesh=self.rt.mesh, rules=self.rt.rules,
                       prompt_bucket=self.prompt_bucket, new_bucket=a.max_new_tokens)
        gen_time = time.perf_counter() - t0
        rows = rl.build_rows(ids, out["tokens"], out["lengths"], out["logprobs_tempered"], self.S,
                             self.tokenizer.pad_id)
        ended = np.asarray(out["ended_with_eos"], bool)
        rows["ended"] = ended.astype(np.float32)
        texts = rl.decode_responses(self.tokenizer, out["tokens"], out["lengths"], ended)
        rows["score"] = (self.rule([ps.texts[i] for i in idx], [ps.answers[i] for i in idx], texts)
                         if self.rule else np.zeros(len(ids), np.float32))
        n_tok = float(np.sum(out["lengths"]))
        info = {"response_length": float(np.mean(out["lengths"])), "ended_with_eos": float(np.mean(ended)),
                "generate_tokens_per_s": n_tok / max(gen_time, 1e-9), "time_generate": gen_time,
                "rollout_samples": float(len(ids))}
        return rows, info, texts

    # ---- scoring (one jitted program) -----------------------------------------------------------
    def prepare(self, state, rows: dict):
        """Host rollout rows -> (device train arrays, per-row {score, seq_kl}, metrics, next kl_coef)."""
        dev = rl.put_rows(rows, self.rt.mesh, self.rt.rules)
        critic = state["critic"]["params"] if self.has_critic else None
        return self._prepare(state["params"], critic, self.frozen_on_device(), dev, state["kl_coef"])

    def _prepare_impl(self, params, critic, frozen, rows, kl_coef):
        a, T = self.a, self.a.temperature
        old, ent = rl.token_logps_entropy(params, rows, self.cfg.model, T)
        ref = rl.token_logps(frozen["ref"], rows, self.cfg.model, T)
        mask0 = rows["mask"]
        ended = rows["ended"] > 0
        if frozen["reward"] is not None:
            score = rl.reward_scores(frozen["reward"], rows["tokens"], rows["positions"], rows["segment_ids"],
                                     self.rm_cfg)[:, a.reward_attribute].astype(jnp.float32)
        else:
            score = rows["score"]
        score = rl.standardize_reward(score, a.reward_offset, a.reward_scale, a.reward_clip)
        mask = mask0
        if a.truncated_response == "penalize":
            score = jnp.where(ended, score, a.truncation_penalty)
        elif a.truncated_response == "mask":
            mask = mask0 * ended[:, None].astype(mask0.dtype)
        seq_kl = jnp.sum(kl_k1(old, ref, mask0), axis=-1)
        values = rl.critic_values(critic, rows, self.critic_cfg) if self.has_critic else None
        extra, metrics, new_kl = self.advantages(old, ref, values, score, mask, seq_kl, kl_coef)
        prep = {k: rows[k] for k in ROW_KEYS}
        prep.update(extra, old_logps=old)
        metrics = dict(metrics, reward_mean=jnp.mean(score), reward_std=jnp.std(score), kl=jnp.mean(seq_kl),
                       entropy_rollout=masked_mean(ent, mask0),
                       logprob_max_diff=jnp.max(jnp.where(mask0 > 0, jnp.abs(old - rows["gen_logps"]), 0.0)),
                       trained_fraction=jnp.mean((jnp.sum(mask, -1) > 0).astype(jnp.float32)))
        return prep, {"score": score, "seq_kl": seq_kl}, metrics, new_kl

    # ---- training -------------------------------------------------------------------------------
    @staticmethod
    def normalizers(batch):
        """The global count of the whole minibatch: valid tokens (or sequences, with per-sequence weights)."""
        return {"n": jnp.sum(batch["weight"])}

    def _policy_terms(self, params, mb, norms):
        logps, ent = rl.token_logps_entropy(params, mb, self.cfg.model, self.a.temperature)
        e_loss, em = entropy_bonus(ent, mb["weight"], self.a.entropy_coef, norms["n"])
        return logps, e_loss, em["entropy"]

    def critic_loss(self, params, mb, norms, frozen):
        v = rl.critic_values(params, mb, self.critic_cfg)
        loss, m = ppo_value_loss(v, mb["values"], mb["returns"], mb["weight"], self.a.value_clip, norms["n"])
        return loss, {"loss": loss, "value_clip_fraction": m["value_clip_fraction"], "value_mean": m["value_mean"],
                      "return_mean": m["return_mean"]}

    def _update_impl(self, state, prep, idx):
        s = self.sizes
        sharding = lambda ndim: base.batch_sharding(self.rt.mesh, self.rt.rules, ndim)  # noqa: E731
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x[idx].reshape((s.accum, s.micro) + x.shape[1:]), sharding(x.ndim + 1)), prep)
        sub = {k: state[k] for k in ("step", "params", "opt_state", "rng")}
        new, m = self._actor_step(sub, mb, None)
        out = dict(state, params=new["params"], opt_state=new["opt_state"])
        metrics = {("policy_" + k if k in ("grad_norm", "skipped") else k): v for k, v in m.items()}
        metrics["actor_loss"] = metrics.pop("loss")
        if self.has_critic:
            csub = {"step": state["step"], "params": state["critic"]["params"],
                    "opt_state": state["critic"]["opt_state"], "rng": state["rng"]}
            cnew, cm = self._critic_step(csub, mb, None)
            out["critic"] = {"params": cnew["params"], "opt_state": cnew["opt_state"]}
            metrics.update(value_loss=cm["loss"], value_clip_fraction=cm["value_clip_fraction"],
                           value_mean=cm["value_mean"], return_mean=cm["return_mean"],
                           critic_grad_norm=cm["grad_norm"], critic_skipped=cm["skipped"])
        metrics["skipped"] = metrics["policy_skipped"] + metrics.get("critic_skipped", 0)
        return out, metrics

    def update(self, state, prep, step: int):
        """``ppo_epochs`` shuffled passes of minibatch updates; metrics averaged over the updates."""
        s = self.sizes
        order = np.random.default_rng([self.cfg.train.seed, step])
        collected = []
        for _ in range(self.a.ppo_epochs):
            perm = order.permutation(s.rollout)
            for i in range(s.minibatches):
                idx = jax.device_put(jnp.asarray(perm[i * s.minibatch:(i + 1) * s.minibatch], jnp.int32),
                                     self.replicated)
                state, m = self._update(state, prep, idx)
                collected.append(m)
        host = jax.device_get(collected)
        out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        out["skipped"] = float(np.max([m["skipped"] for m in host]))
        out["num_tokens"] = float(np.sum([m["num_tokens"] for m in host])) / self.a.ppo_epochs
        return state, out

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state) -> dict:
        """Held-out prompts: sampled rollouts (mean reward, KL to the reference, length) and greedy ones
        (the same), each with exact match against the data's answers when present."""
        ps = self.eval_set
        if ps is None:
            return {}
        n, N = len(ps), self.sizes.rollout
        sums: dict = {}
        for start in range(0, n, N):
            idx = np.arange(start, start + N) % n
            real = np.arange(start, start + N) < n
            for greedy in (False, True):
                key = jax.random.fold_in(jax.random.key(self.cfg.train.seed + 7919), start)
                rows, _, texts = self.rollout(state["params"], idx, key, prompts=ps, greedy=greedy, repeat=False)
                _, per_row, _, _ = self.prepare(state, rows)
                per_row = jax.device_get(per_row)
                tag = "greedy_" if greedy else ""
                add = {f"{tag}reward": per_row["score"], f"{tag}kl": per_row["seq_kl"],
                       f"{tag}response_length": rows["mask"].sum(-1)}
                if any(a is not None for a in ps.answers):  # greedy: "exact_match"; sampled: "sampled_exact_match"
                    add["exact_match" if greedy else "sampled_exact_match"] = np.asarray(
                        [float(ps.answers[i] is not None and t.strip() == ps.answers[i].strip())
                         for i, t in zip(idx, texts)])
                for k, v in add.items():
                    sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[real]))
        return {k: v / n for k, v in sums.items()}


def _to_memory(tree, kind: str):
    """The same arrays, same shardings, in another memory space of their devices ("device", "pinned_host")."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)


# ---- the variants ---------------------------------------------------------------------------------
_KL = {"k1": kl_k1, "abs": kl_abs, "k3": kl_k3}


@base.register("ppo")
class PPO(RLAlgorithm):
    """PPO-RLHF (Ziegler et al. 2019; Ouyang et al. 2022): KL-penalised per-token reward, GAE, clipped
    surrogate for the actor and clipped value loss for the critic (its own optimizer)."""

    has_critic = True

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        a = self.a
        kl = _KL[a.kl_estimator](old, ref, mask)
        rewards = token_rewards(score, mask, kl, kl_coef)
        adv, returns = gae(rewards, jax.lax.stop_gradient(values), mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = whiten(adv, mask)  # the whole rollout is one global array: global statistics
        new_kl = kl_coef
        if a.kl_target is not None:
            new_kl = adaptive_kl_coef(kl_coef, jnp.mean(seq_kl), a.kl_target, a.kl_horizon, self.sizes.rollout)
        metrics = {"explained_variance": explained_variance(values, returns, mask)}
        return {"advantages": adv, "returns": returns, "values": values, "weight": mask}, metrics, new_kl

    def actor_loss(self, params, mb, norms, frozen):
        logps, e_loss, ent = self._policy_terms(params, mb, norms)
        pl, m = ppo_policy_loss(logps, mb["old_logps"], mb["advantages"], mb["weight"], self.a.clip_eps, norms["n"])
        loss = pl + e_loss
        return loss, {"loss": loss, "policy_loss": pl, "clip_fraction": m["clip_fraction"],
                      "approx_kl": m["approx_kl"], "entropy": ent, "num_tokens": m["num_tokens"]}


@base.register("grpo")
class GRPO(RLAlgorithm):
    """GRPO (Shao et al. 2024): group-normalised outcome advantages, clipped ratio, k3 KL in the loss."""

    min_per_prompt = 2

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        s, a = self.sizes, self.a
        adv = grpo_advantages(score.reshape(s.prompts, s.per_prompt), scale=a.scale_advantages).reshape(-1)
        weight = mask
        if a.loss_aggregation == "sequence":  # per-sequence token mean, then the mean over sequences
            weight = mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
        return {"advantages": adv, "ref_logps": ref, "weight": weight}, {}, kl_coef

    def actor_loss(self, params, mb, norms, frozen):
        logps, e_loss, ent = self._policy_terms(params, mb, norms)
        gl, m = grpo_loss(logps, mb["old_logps"], mb["ref_logps"], mb["advantages"], mb["weight"], self.a.clip_eps,
                          self.a.kl_coef, norms["n"])
        loss = gl + e_loss
        return loss, {"loss": loss, "policy_loss": m["policy_loss"], "kl_loss": m["kl"],
                      "clip_fraction": m["clip_fraction"], "approx_kl": m["approx_kl"], "entropy": ent,
                      "num_tokens": m["num_tokens"]}


@base.register("rloo")
class RLOO(RLAlgorithm):
    """RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline of the K samples; the KL
    to the reference in the sequence reward (R - beta sum_t k1) or as a k3 term in the loss."""

    min_per_prompt = 2

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        s, a = self.sizes, self.a
        r = score - a.kl_coef * seq_kl if a.kl_in == "reward" else score
        adv = rloo_advantages(r.reshape(s.prompts, s.per_prompt)).reshape(-1)
        return {"advantages": adv, "ref_logps": ref, "weight": mask}, {}, kl_coef

    def actor_loss(self, params, mb, norms, frozen):
        logps, e_loss, ent = self._policy_terms(params, mb, norms)
        pl, m = reinforce_loss(logps, mb["advantages"], mb["weight"], norms["n"])
        loss = pl + e_loss
        metrics = {"policy_loss": pl, "advantage_mean": m["advantage_mean"], "entropy": ent,
                   "num_tokens": m["num_tokens"]}
        if self.a.kl_in == "loss":
            w = mb["weight"]
            kl = jnp.sum(jnp.where(w > 0, kl_k3(logps, mb["ref_logps"], w), 0.0) * w) / jnp.maximum(norms["n"], 1e-9)
            loss = loss + self.a.kl_coef * kl
            metrics["kl_loss"] = kl
        return loss, dict(metrics, loss=loss)
