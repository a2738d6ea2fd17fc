"""Prompts for generate-then-train algorithms and generation-based evaluation.

    prompts = PromptSet(examples, tokenizer, template, max_prompt_len)   # ids, texts, answers, examples
    it = PromptIterator(len(prompts), batch=16, seed=0)                 # checkpointable {"prompt_index": [16]}

No JAX here.
"""
from __future__ import annotations

import numpy as np

from jalign.errors import ConfigError


def prompt_text(prompt) -> str:
    """The text a rule-based reward sees: the prompt string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


class PromptSet:
    """Encoded prompts of one split: ids, text (for rules), reference answer, and the example itself."""

    def __init__(self, examples, tokenizer, template, max_prompt_len: int, log=print, spec: str = ""):
        from jalign.data.chat import encode_prompt

        self.ids, self.texts, self.answers, self.examples = [], [], [], []
        dropped = 0
        for ex in examples:
            ids = encode_prompt(ex.prompt, template, tokenizer)
            if len(ids) > max_prompt_len:
                dropped += 1
                continue
            self.ids.append(ids)
            self.texts.append(prompt_text(ex.prompt))
            self.answers.append(getattr(ex, "answer", None))
            self.examples.append(ex)
        if dropped:
            log(f"data: {spec}: dropped {dropped} prompts longer than {max_prompt_len} tokens")
        if not self.ids:
            raise ConfigError(f"data: {spec}: no prompt fits in {max_prompt_len} tokens")

    @classmethod
    def from_pairs(cls, pairs, texts=None):
        """A PromptSet from ``(prompt_ids, reference)`` pairs (held-out SFT / preference examples)."""
        self = cls.__new__(cls)
        self.ids = [list(p) for p, _ in pairs]
        self.answers = [r for _, r in pairs]
        self.texts = list(texts) if texts is not None else [""] * len(pairs)
        self.examples = [None] * len(pairs)
        return self

    def __len__(self):
        return len(self.ids)

    @property
    def longest(self) -> int:
        return max(map(len, self.ids))

    @property
    def has_answers(self) -> bool:
        return any(a is not None for a in self.answers)


class PromptIterator:
    """Checkpointable stream of global prompt indices: ``next() -> {"prompt_index": int32[P]}``.

    Every process gets the same indices; the order is a fresh permutation per epoch from ``(seed, epoch)``.
    State ``{"epoch", "pos"}`` is JSON.
    """

    def __init__(self, n: int, batch: int, seed: int, shuffle: bool = True):
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        while len(out) < self.batch:
            order = self._order(self.epoch)
            take = order[self.pos:self.pos + self.batch - len(out)]
            out.extend(int(i) for i in take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return {"prompt_index": np.asarray(out, np.int32)}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
