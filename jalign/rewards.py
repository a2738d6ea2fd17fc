"""Rule-based (verifiable) rewards, by name, for ``algorithm.reward_fn`` in RL configs.

A reward function takes the prompt text (before the chat template), the decoded response (without
the end token) and the reference answer when the data has one, and returns a float:

    @register_reward("my_rule")
    def my_rule(prompt: str, response: str, reference: Optional[str]) -> float: ...

Built in: ``exact_match`` (response == reference after stripping; the tiny addition task computes
the reference from the prompt when the data carries none) and ``contains`` (reference in response).
No JAX here: rewards run on the host.
"""
from __future__ import annotations

import difflib
from typing import Callable, Optional

RewardFn = Callable[[str, str, Optional[str]], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"algorithm.reward_fn: unknown reward {name!r}{hint} (known: {', '.join(sorted(REWARDS))})")
    return REWARDS[name]


@register_reward("exact_match")
def exact_match(prompt: str, response: str, reference: Optional[str]) -> float:
    """1.0 if the stripped response equals the stripped reference, else 0.0."""
    if reference is None:
        from jalign.data.tiny import answer_for

        reference = answer_for(prompt)
    return float(response.strip() == str(reference).strip())


@register_reward("contains")
def contains(prompt: str, response: str, reference: Optional[str]) -> float:
    """1.0 if the reference occurs in the response."""
    return float(reference is not None and str(reference).strip() in response)
