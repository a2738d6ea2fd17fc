"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022): KL-penalised per-token reward, GAE, clipped surrogate
for the actor and clipped value loss for a critic with its own optimizer. Rollout, scoring and updates:
``jalign.algorithms.rl``; the objective and estimator (``policy_loss: ppo_clip``, ``advantage: gae``) can be
swapped by config (``jalign.algorithms.rl_objectives``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jalign.algorithms.packed_rows import forward_rows
from jalign.algorithms.registry import register
from jalign.algorithms.rl import KlIn, RLAlgorithm, RLConfig
from jalign.losses import ppo_value_loss
from jalign.models.heads import token_values


@dataclass
class PPOConfig(RLConfig):
    name: str = "ppo"
    advantage: str = "gae"
    kl_in: KlIn = "reward"  # per-token kl_estimator in the reward r_t
    critic_init: Optional[str] = None  # critic weights: default the reward model (roles.reward), else the policy's
    critic_lr: Optional[float] = None  # default optim.lr
    kl_target: Optional[float] = None  # set for the adaptive KL coefficient (Ziegler et al. 2019)
    kl_horizon: float = 10000.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float = 0.2


@register("ppo", config=PPOConfig)
class PPO(RLAlgorithm):
    def critic_loss(self, params, mb, norms, roles):
        v = forward_rows(lambda r: token_values(params, r, self.critic_cfg), mb)  # packed rows when mb has them
        loss, m = ppo_value_loss(v, mb["values"], mb["returns"], mb["weight"], self.a.value_clip, norms["n"])
        return loss, {"loss": loss, "value_clip_fraction": m["value_clip_fraction"], "value_mean": m["value_mean"],
                      "return_mean": m["return_mean"]}
