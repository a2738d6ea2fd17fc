"""GRPO (Shao et al. 2024): group-normalised outcome advantages, clipped ratio, k3 KL to the reference in the loss.
Rollout, scoring and updates: ``jalign.algorithms.rl``; ``policy_loss`` / ``advantage`` / ``clip_eps_low`` /
``clip_eps_high`` select other objectives (``jalign.algorithms.rl_objectives``)."""
from __future__ import annotations

from dataclasses import dataclass

from jalign.algorithms.registry import register
from jalign.algorithms.rl import KlIn, RLAlgorithm, RLConfig


@dataclass
class GRPOConfig(RLConfig):
    name: str = "grpo"
    num_rollouts_per_prompt: int = 4
    advantage: str = "group"  # scale_advantages: false is Dr. GRPO (no division by the group std)
    kl_in: KlIn = "loss"
    kl_coef: float = 0.04  # k3 KL to the reference, in the loss


@register("grpo", config=GRPOConfig)
class GRPO(RLAlgorithm):
    pass
