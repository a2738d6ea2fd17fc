"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"): no
critic; the token-level KL to the reference in the reward, the discounted return normalised over the whole
batch (Sec. 3), PPO's clipped ratio. A preset of ``jalign.algorithms.rl`` (``advantage: reinforce_pp``;
``reinforce_pp_baseline`` subtracts each prompt's mean reward first)."""
from __future__ import annotations

from dataclasses import dataclass

from jalign.algorithms.registry import register
from jalign.algorithms.rl import KlIn, RLAlgorithm, RLConfig


@dataclass
class ReinforcePPConfig(RLConfig):
    name: str = "reinforce_pp"
    advantage: str = "reinforce_pp"
    policy_loss: str = "ppo_clip"
    kl_in: KlIn = "reward"
    kl_coef: float = 0.01


@register("reinforce_pp", config=ReinforcePPConfig)
class ReinforcePP(RLAlgorithm):
    pass
