"""GRPO (Shao et al. 2024): group-normalised outcome advantages, clipped ratio, k3 KL to the reference in the loss.
Rollout, scoring and updates: ``jalign.algorithms.rl``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp

from jalign.algorithms.registry import register
from jalign.algorithms.rl import RLAlgorithm, RLConfig
from jalign.losses import grpo_advantages, grpo_loss


@dataclass
class GRPOConfig(RLConfig):
    name: str = "grpo"
    num_rollouts_per_prompt: int = 4
    kl_coef: float = 0.04  # k3 KL to the reference, in the loss
    scale_advantages: bool = True  # False: Dr. GRPO (no division by the group std)
    loss_aggregation: Literal["token", "sequence"] = "token"  # global token mean, or per-sequence mean


@register("grpo", config=GRPOConfig)
class GRPO(RLAlgorithm):
    min_per_prompt = 2
    needs_old_logps = False  # outcome advantages: one update per rollout needs no separate old-policy pass

    def advantages(self, old, ref, values, score, mask, seq_kl, kl_coef):
        s, a = self.sizes, self.a
        adv = grpo_advantages(score.reshape(s.prompts, s.per_prompt), scale=a.scale_advantages).reshape(-1)
        weight = mask
        if a.loss_aggregation == "sequence":  # per-sequence token mean, then the mean over sequences
            weight = mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
        return {"advantages": adv, "ref_logps": ref, "weight": weight}, {}, kl_coef

    def actor_loss(self, params, mb, norms, roles):
        logps, e_loss, ent = self.policy_terms(params, mb, norms)
        gl, m = grpo_loss(logps, self.old_logps(mb, logps), mb["ref_logps"], mb["advantages"], mb["weight"],
                          self.a.clip_eps, self.a.kl_coef, norms["n"])
        loss = gl + e_loss
        out = {"loss": loss, "policy_loss": m["policy_loss"], "kl_loss": m["kl"], "clip_fraction": m["clip_fraction"],
               "approx_kl": m["approx_kl"], "num_tokens": m["num_tokens"]}
        if ent is not None:
            out["entropy"] = ent
        return loss, out
