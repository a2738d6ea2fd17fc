"""Generation-based evaluation shared by the policy algorithms: greedy exact match on held-out prompts."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np


class ExactMatchEval:
    """Greedy answers to held-out prompts, compared with the reference (or scored by a reward fn).

    ``examples``: list of ``(prompt_ids, reference_text)``. ``reward_fn(prompt_index, text) -> float``
    optionally scores answers (e.g. the tiny task's verifiable reward) and is reported as ``reward``.
    """

    def __init__(self, rt, tokenizer, examples: Sequence[tuple[list[int], str]], n: int, max_new_tokens: int,
                 reward_fn: Optional[Callable[[int, str], float]] = None):
        self.rt, self.tokenizer = rt, tokenizer
        self.examples = list(examples)[: max(n, 0)]
        self.max_new_tokens = max_new_tokens
        self.reward_fn = reward_fn

    def answers(self, params, cfg) -> list[str]:
        from jalign.generate import generate

        out = generate(params, cfg, [p for p, _ in self.examples], max_new_tokens=self.max_new_tokens,
                       greedy=True, eos_ids=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id,
                       rng=jax.random.key(0), mesh=self.rt.mesh, rules=self.rt.rules)
        tokens = np.asarray(jax.device_get(out["tokens"]))
        lengths = np.asarray(jax.device_get(out["lengths"]))
        return [self.tokenizer.decode([int(t) for t in row[:n]]) for row, n in zip(tokens, lengths)]

    def __call__(self, params, cfg) -> dict:
        if not self.examples:
            return {}
        texts = self.answers(params, cfg)
        hits = [t.strip() == ref.strip() for t, (_, ref) in zip(texts, self.examples)]
        out = {"exact_match": float(np.mean(hits))}
        if self.reward_fn is not None:
            out["reward"] = float(np.mean([self.reward_fn(i, t) for i, t in enumerate(texts)]))
        return out
