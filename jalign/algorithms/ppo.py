"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022): KL-penalised per-token reward, GAE, clipped surrogate
for the actor and clipped value loss for a critic with its own optimizer. Rollout, scoring and updates:
``jalign.algorithms.rl``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jalign.algorithms.registry import register
from jalign.algorithms.rl import RLAlgorithm, RLConfig
from jalign.losses import (adaptive_kl_coef, explained_variance, gae, kl_abs, kl_k1, kl_k3, ppo_policy_loss,
                           ppo_value_loss, token_rewards, whiten)
from jalign.models.heads import token_values

KL_ESTIMATORS = {"k1": kl_k1, "abs": kl_abs, "k3": kl_k3}


@dataclass
class PPOConfig(RLConfig):
    name: str = "ppo"
    critic_init: Optional[str] = None  # critic weights: default the reward model (roles.reward), else the policy's
    critic_lr: Optional[float] = None  # default optim.lr
    kl_estimator: Literal["k1", "abs", "k3"] = "k1"  # per-token KL in the reward r_t
    kl_target: Optional[float] = None  # set for the adaptive KL coefficient (Ziegler et al. 2019)
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float = 0.2


@register("ppo", config=PPOConfig)
class PPO(RLAlgorithm):
    has_critic = True

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        a = self.a
        kl = KL_ESTIMATORS[a.kl_estimator](old, ref, mask)
        rewards = token_rewards(score, mask, kl, kl_coef)
        adv, returns = gae(rewards, jax.lax.stop_gradient(values), mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = whiten(adv, mask)  # the whole rollout is one global array: global statistics
        new_kl = kl_coef
        if a.kl_target is not None:
            new_kl = adaptive_kl_coef(kl_coef, jnp.mean(seq_kl), a.kl_target, a.kl_horizon, self.sizes.rollout)
        metrics = {"explained_variance": explained_variance(values, returns, mask)}
        return {"advantages": adv, "returns": returns, "values": values, "weight": mask}, metrics, new_kl

    def actor_loss(self, params, mb, norms, roles):
        logps, e_loss, ent = self.policy_terms(params, mb, norms)
        pl, m = ppo_policy_loss(logps, self.old_logps(mb, logps), mb["advantages"], mb["weight"], self.a.clip_eps,
                                norms["n"])
        loss = pl + e_loss
        out = {"loss": loss, "policy_loss": pl, "clip_fraction": m["clip_fraction"], "approx_kl": m["approx_kl"],
               "num_tokens": m["num_tokens"]}
        if ent is not None:
            out["entropy"] = ent
        return loss, out

    def critic_loss(self, params, mb, norms, roles):
        v = token_values(params, mb, self.critic_cfg)
        loss, m = ppo_value_loss(v, mb["values"], mb["returns"], mb["weight"], self.a.value_clip, norms["n"])
        return loss, {"loss": loss, "value_clip_fraction": m["value_clip_fraction"], "value_mean": m["value_mean"],
                      "return_mean": m["return_mean"]}
