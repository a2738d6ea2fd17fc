"""RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline of the K samples; the KL to the
reference in the sequence reward (R - beta sum_t k1) or as a k3 term in the loss. Rollout, scoring and updates:
``jalign.algorithms.rl``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp

from jalign.algorithms.registry import register
from jalign.algorithms.rl import RLAlgorithm, RLConfig
from jalign.losses import kl_k3, reinforce_loss, rloo_advantages


@dataclass
class RLOOConfig(RLConfig):
    name: str = "rloo"
    num_rollouts_per_prompt: int = 4
    kl_in: Literal["reward", "loss"] = "reward"  # R - beta * sum_t k1, or + beta * k3 token mean in the loss


@register("rloo", config=RLOOConfig)
class RLOO(RLAlgorithm):
    min_per_prompt = 2

    @property
    def needs_old_logps(self):  # the KL-penalised sequence reward reads the behaviour log-probs
        return self.a.kl_in == "reward"

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        s, a = self.sizes, self.a
        r = score - a.kl_coef * seq_kl if a.kl_in == "reward" else score
        adv = rloo_advantages(r.reshape(s.prompts, s.per_prompt)).reshape(-1)
        return {"advantages": adv, "ref_logps": ref, "weight": mask}, {}, kl_coef

    def actor_loss(self, params, mb, norms, roles):
        logps, e_loss, ent = self.policy_terms(params, mb, norms)
        pl, m = reinforce_loss(logps, mb["advantages"], mb["weight"], norms["n"])
        loss = pl + e_loss
        metrics = {"policy_loss": pl, "advantage_mean": m["advantage_mean"], "num_tokens": m["num_tokens"]}
        if ent is not None:
            metrics["entropy"] = ent
        if self.a.kl_in == "loss":
            w = mb["weight"]
            kl = jnp.sum(jnp.where(w > 0, kl_k3(logps, mb["ref_logps"], w), 0.0) * w) / jnp.maximum(norms["n"], 1e-9)
            loss = loss + self.a.kl_coef * kl
            metrics["kl_loss"] = kl
        return loss, dict(metrics, loss=loss)
