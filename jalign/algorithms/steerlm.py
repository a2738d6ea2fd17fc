"""SteerLM attribute-conditioned SFT (Dong et al. 2023; NeMo-Aligner's recipe, step 3 of 4).

Data: SFT examples with attributes, ``{"prompt", "response", "attributes": {name: 0-4}}`` (or a conversation
with ``"attributes"``), as ``jalign annotate`` writes them from a regression reward model's scores. Each prompt
is conditioned on its attribute string (``quality:4,correctness:4,verbosity:1``: ``algorithm.attributes`` gives
the names and their order) rendered by the chat template as a system message (``jalign.data.steer``); the
loss is SFT's, on the response tokens only.

At inference the same string steers the model: ``jalign generate --model RUN --attributes correctness=4,verbosity=0``
or ``jalign.data.steer.steered_prompt_ids`` in Python. The run records its attribute order in
``RUN_DIR/steerlm.json`` (also written into ``train.export_hf``) so generation renders the string the same way.

Evaluation: the held-out examples conditioned on their own attributes (exact match against their responses),
and for each setting in ``algorithm.eval_attributes`` (e.g. ``correctness=0,verbosity=0``) the same prompts
conditioned on it, reported as ``eval/steer_<name><value>_.../...``; ``algorithm.eval_reward`` (a rule of
``jalign.rewards`` or an import path) is scored on every answer as ``greedy_reward``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import jax

from jalign.algorithms.registry import register
from jalign.algorithms.sft import SFT
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1
from jalign.data.steer import SteerData, attribute_string, parse_attribute_values

RECORD = "steerlm.json"


@dataclass
class SteerLMConfig:
    name: str = "steerlm"
    attributes: Optional[list[str]] = None  # names and order of the attribute string; None: the data's, sorted
    max_value: int = 4  # attribute values are integers in [0, max_value]
    eval_attributes: list[str] = field(default_factory=list)  # extra generation evals: "correctness=4,verbosity=0"
    eval_reward: Optional[str] = None  # a rule scored on every generated answer (e.g. an import path)


VALUE_RANGES["SteerLMConfig"] = {"max_value": _AT_LEAST_1}


def setting_name(values: dict) -> str:
    """``{"correctness": 4, "verbosity": 0}`` -> ``"steer_correctness4_verbosity0"`` (a metric prefix)."""
    return "steer_" + "_".join(f"{k}{v}" for k, v in values.items())


def eval_reward_fn(cfg, a):
    """The rule scored on every eval answer: ``algorithm.eval_reward``, else ``eval.reward`` (or None)."""
    from jalign.evaluation import rule_reward_fn

    key = "algorithm.eval_reward" if a.eval_reward else "eval.reward"
    return rule_reward_fn(a.eval_reward or cfg.eval.reward, key, cfg.source or "<config>")


class SteeredEvals:
    """Several generation evals of one policy (the data's own attributes, then each chosen setting); the
    loop calls it like one ``GenerationEval``."""

    def __init__(self, evals: list):
        self.evals = evals  # [(metric prefix or "", GenerationEval)]

    def __call__(self, params, cfg, roles, step: int = 0) -> dict:
        out = {}
        for prefix, ev in self.evals:
            out.update({(f"{prefix}/{k}" if prefix else k): v for k, v in ev(params, cfg, roles, step).items()})
        return out

    def observe(self, step: int, metrics: dict, train_metrics=None) -> dict:
        """The loop's monitor hook: the unsteered eval's (the first), on its own metrics."""
        prefix, ev = self.evals[0]
        mine = {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "/")} if prefix else metrics
        return ev.observe(step, mine, train_metrics)

    def state_dict(self) -> dict:
        return self.evals[0][1].state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.evals[0][1].load_state_dict(state)


@register("steerlm", config=SteerLMConfig)
class SteerLM(SFT):
    def __init__(self, rt):
        super().__init__(rt)
        if not rt.abstract:  # the plan: the steered sets are run one after another with the same shapes as the plain one
            self.generation_eval = self._generation_evals()

    def make_data(self):
        return SteerData(self.cfg, self.tokenizer, attributes=self.a.attributes, max_value=self.a.max_value,
                         log=self.rt.log)

    def _generation_evals(self):
        from jalign.data.prompts import PromptSet, prompt_text
        from jalign.evaluation import GenerationEval

        e, src = self.cfg.eval, self.cfg.source or "<config>"
        if e.prompts <= 0 or not self.data.has_eval:
            return None
        reward_fn = eval_reward_fn(self.cfg, self.a)
        # the prompt texts a rule reward sees, in the order of the eval examples (those with a text response)
        texts = [prompt_text(ex.prompt) for ex in self.data.eval_examples_raw if isinstance(ex.response, str)]
        evals = []
        own = self.data.eval_examples()
        if own:
            evals.append(("", GenerationEval(self.rt, self.tokenizer, PromptSet.from_pairs(own, texts),
                                             reward_fn=reward_fn)))
        for i, setting in enumerate(self.a.eval_attributes):
            where = f"{src}: algorithm.eval_attributes[{i}]"
            values = parse_attribute_values(setting, where=where)
            attribute_string(values, self.data.order, max_value=self.a.max_value, where=where)  # checks the names
            pairs = self.data.steered_eval_examples(values)
            evals.append((setting_name(values), GenerationEval(self.rt, self.tokenizer,
                                                               PromptSet.from_pairs(pairs, texts),
                                                               reward_fn=reward_fn)))
        return SteeredEvals(evals) if evals else None

    def record(self) -> dict:
        """What generation needs to render the attribute string as training did."""
        return {"attributes": list(self.data.order), "max_value": self.a.max_value,
                "chat_template": self.cfg.data.chat_template}

    def start(self, state, roles):
        if jax.process_index() == 0:
            self.rt.run_dir.mkdir(parents=True, exist_ok=True)
            (Path(self.rt.run_dir) / RECORD).write_text(json.dumps(self.record()))
        self.rt.log(f"steerlm: attribute string order {','.join(self.data.order)} (values 0-{self.a.max_value})")

    def export(self, state, roles, out_dir):
        super().export(state, roles, out_dir)
        if jax.process_index() == 0:
            (Path(out_dir) / RECORD).write_text(json.dumps(self.record()))
