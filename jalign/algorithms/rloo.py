"""RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline of the K samples; the KL to the
reference in the sequence reward (R - beta sum_t k1) or as a k3 term in the loss (``kl_in``). Rollout, scoring
and updates: ``jalign.algorithms.rl``."""
from __future__ import annotations

from dataclasses import dataclass

from jalign.algorithms.registry import register
from jalign.algorithms.rl import KlIn, RLAlgorithm, RLConfig


@dataclass
class RLOOConfig(RLConfig):
    name: str = "rloo"
    num_rollouts_per_prompt: int = 4
    policy_loss: str = "reinforce"
    advantage: str = "leave_one_out"
    kl_in: KlIn = "reward"  # R - beta * sum_t k1, or + beta * k3 token mean in the loss


@register("rloo", config=RLOOConfig)
class RLOO(RLAlgorithm):
    pass
