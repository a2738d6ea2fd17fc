"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): GRPO's group
advantages with Clip-Higher (eps_low 0.2, eps_high 0.28; Sec. 3.1), dynamic sampling (Sec. 3.2), token-level
aggregation (Sec. 3.3), soft overlong punishment (Sec. 3.4) and no KL term. A preset: every piece is a key of
``jalign.algorithms.rl.RLConfig`` that any RL algorithm can set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from jalign.algorithms.grpo import GRPOConfig
from jalign.algorithms.registry import register
from jalign.algorithms.rl import KlIn, RLAlgorithm

OVERLONG_FRACTION = 0.2  # the paper's buffer: 4096 of a 20480-token budget


@dataclass
class DAPOConfig(GRPOConfig):
    name: str = "dapo"
    clip_eps_low: Optional[float] = 0.2
    clip_eps_high: Optional[float] = 0.28
    dynamic_sampling: bool = True
    kl_in: KlIn = "none"
    kl_coef: float = 0.0
    truncated_response: Literal["keep", "mask", "penalize"] = "keep"  # the overlong penalty already reaches -factor at the budget
    overlong_buffer: Optional[int] = None  # None: 20% of max_new_tokens (the paper's ratio); 0: off

    def __post_init__(self):
        if self.overlong_buffer is None:  # resolved here, so the run's config.yaml shows the value used
            self.overlong_buffer = max(1, round(OVERLONG_FRACTION * self.max_new_tokens))


@register("dapo", config=DAPOConfig)
class DAPO(RLAlgorithm):
    pass
