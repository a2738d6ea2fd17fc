"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): GRPO's group advantages with the
length-normalised sequence importance ratio clipped per sequence (Sec. 4.1; their clip range 3e-4 / 4e-4).
A preset of ``jalign.algorithms.rl`` (``policy_loss: gspo``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jalign.algorithms.grpo import GRPOConfig
from jalign.algorithms.registry import register
from jalign.algorithms.rl import RLAlgorithm


@dataclass
class GSPOConfig(GRPOConfig):
    name: str = "gspo"
    policy_loss: str = "gspo"
    clip_eps_low: Optional[float] = 3e-4
    clip_eps_high: Optional[float] = 4e-4


@register("gspo", config=GSPOConfig)
class GSPO(RLAlgorithm):
    pass
