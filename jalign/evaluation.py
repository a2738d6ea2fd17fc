"""Evaluation the loop runs for every algorithm.

* :func:`reduce_eval`: an algorithm's eval steps return ``{name: (sum, count)}`` per batch (``count`` None: a
  total, e.g. the number of pairs); summed over the eval batches on device and divided once at the end
  (exact, whatever the batch split or device count).
* :class:`GenerationEval`: held-out prompts answered greedily and/or sampled (``eval:`` section); exact match
  against the reference answers, the reward of the answers (a rule, or a reward-model role), their KL to a
  reference role and their length; a few completions are written to ``RUN_DIR/samples.jsonl``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.data.prompts import PromptSet
from jalign.losses import kl_k1
from jalign.models.heads import sequence_scores, token_logps
from jalign.rollout import experience as xp


def reduce_eval(algo, state, roles, max_batches: int) -> dict:
    """Means of the algorithm's eval metrics over at most ``max_batches`` eval batches (0 = all)."""
    sums = None
    for i, batch in enumerate(algo.eval_batches()):
        if max_batches and i >= max_batches:
            break
        part = algo.eval_sums(state, roles, batch)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    if not sums:
        return {}
    host = jax.device_get(sums)
    means = {k: float(np.asarray(s)) if c is None else float(np.asarray(s)) / max(float(np.asarray(c)), 1e-12)
             for k, (s, c) in host.items()}
    return algo.eval_finish(means)


class GenerationEval:
    """Generation-based evaluation on a fixed set of held-out prompts (see the module docstring).

    ``reward_fn(prompt_text, response, reference, example) -> float`` (host) or ``reward_role`` (a reward model
    in the run's roles, read at ``reward_attribute``); ``kl_role``: the frozen model the KL is measured against.
    """

    def __init__(self, rt, tokenizer, prompts: PromptSet, *, reward_fn: Optional[Callable] = None,
                 reward_role: Optional[str] = None, reward_attribute: int = 0, kl_role: Optional[str] = None):
        e = rt.cfg.eval
        self.rt, self.tokenizer, self.e = rt, tokenizer, e
        n = min(len(prompts), e.prompts)
        self.prompts = prompts
        self.n = n
        self.reward_fn, self.reward_role, self.reward_attribute, self.kl_role = (
            reward_fn, reward_role, reward_attribute, kl_role)
        dp = rt.data_parallel
        self.chunk = xp.round_up(min(n, 128), dp)
        sp = rt.mesh.shape["sequence"]
        self.P, self.N = xp.rollout_shape(max(len(prompts.ids[i]) for i in range(n)), e.max_new_tokens, sp)
        self._programs: dict = {}

    @classmethod
    def for_examples(cls, algo, examples, **kw) -> Optional["GenerationEval"]:
        """For supervised algorithms: ``examples`` are ``(prompt_ids, reference)`` of held-out data."""
        if algo.cfg.eval.prompts <= 0 or not examples:
            return None
        return cls(algo.rt, algo.tokenizer, PromptSet.from_pairs(examples), **kw)

    # one jitted program per model configuration: policy log-probs, reference log-probs, reward scores
    def _score_impl(self, params, ref, rm, out, *, cfg, ref_cfg, rm_cfg):
        from jalign.algorithms.base import require_mesh_context

        require_mesh_context("the generation-eval scoring program")
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        res = {"length": jnp.sum(rows["mask"], -1), "ended": rows["ended"]}
        if ref is not None:
            T = self.e.temperature
            lp = token_logps(params, rows, cfg, T)
            rlp = token_logps(ref, rows, ref_cfg, T)
            res["kl"] = jnp.sum(kl_k1(lp, rlp, rows["mask"]), -1)
        if rm is not None:
            res["reward"] = sequence_scores(rm, rows["tokens"], rows["positions"], rows["segment_ids"],
                                            rm_cfg)[:, self.reward_attribute].astype(jnp.float32)
        return res

    def _program(self, cfg, ref_cfg, rm_cfg):
        key = (repr(cfg), repr(ref_cfg), repr(rm_cfg))
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(self._score_impl, cfg=cfg, ref_cfg=ref_cfg,
                                                            rm_cfg=rm_cfg))
        return self._programs[key]

    def __call__(self, params, cfg, roles, step: int = 0) -> dict:
        if self.n == 0:
            return {}
        modes = [m for m, on in (("greedy", self.e.greedy), ("sampled", self.e.sampled)) if on]
        sums, logged = {}, []
        for start in range(0, self.n, self.chunk):
            idx = np.arange(start, start + self.chunk) % self.n
            real = np.arange(start, start + self.chunk) < self.n
            ids = [self.prompts.ids[i] for i in idx]
            for mode in modes:
                key = jax.random.fold_in(jax.random.key(self.rt.cfg.train.seed + 7919), start)
                out = xp.sample(params, cfg, ids, max_new_tokens=self.e.max_new_tokens, new_len=self.N,
                                prompt_len=self.P, key=key, eos_ids=sorted(self.tokenizer.eos_ids),
                                pad_id=self.tokenizer.pad_id, mesh=self.rt.mesh, rules=self.rt.rules,
                                temperature=self.e.temperature, greedy=mode == "greedy",
                                rollout=self.rt.cfg.rollout)
                ref = roles.on_device([self.kl_role])[self.kl_role] if self.kl_role in roles else None
                rm = roles.on_device([self.reward_role])[self.reward_role] if self.reward_role in roles else None
                score = self._program(cfg, roles.config(self.kl_role) if ref is not None else None,
                                      roles.config(self.reward_role) if rm is not None else None)
                per_row = score(params, ref, rm, out)
                texts, index = xp.local_texts(self.tokenizer, out)
                row_prompts = list(idx)
                cols = {k: xp.local_rows(v)[0] for k, v in per_row.items()}
                if self.reward_fn is not None:
                    cols["reward"] = np.asarray([self.reward_fn(self.prompts.texts[row_prompts[r]], t,
                                                                self.prompts.answers[row_prompts[r]],
                                                                self.prompts.examples[row_prompts[r]])
                                                 for r, t in zip(index, texts)], np.float32)
                if self.prompts.has_answers:
                    cols["exact_match"] = xp.exact_matches(texts, index, row_prompts, self.prompts)
                cols = {k: xp.gather_rows_to_host(np.asarray(v, np.float64), index, len(idx)) for k, v in cols.items()}
                for k, v in cols.items():
                    ok = real & np.isfinite(v)
                    name = _metric_name(k, mode)
                    sums[name] = sums.get(name, 0.0) + float(np.sum(v[ok]))
                    sums[name + "#n"] = sums.get(name + "#n", 0.0) + float(np.sum(ok))
                if start == 0 and self.e.log_samples and len(index):
                    logged += [{"step": step, "mode": mode, "prompt": self.prompts.texts[row_prompts[r]] or None,
                                "response": t, "reference": self.prompts.answers[row_prompts[r]],
                                **{k: float(cols[k][r]) for k in cols if np.isfinite(cols[k][r])}}
                               for r, t in zip(index, texts) if r < min(self.e.log_samples, self.n)]
        out = {k: v / max(sums[k + "#n"], 1.0) for k, v in sums.items() if not k.endswith("#n")}
        self._log_samples(logged)
        return out

    def _log_samples(self, rows: list) -> None:
        if not rows or jax.process_index() != 0:
            return
        path = Path(self.rt.run_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def _metric_name(column: str, mode: str) -> str:
    """Names kept from the RL evaluations: greedy exact match is ``exact_match``; other greedy columns are
    ``greedy_*``; sampled exact match is ``sampled_exact_match``, other sampled columns are bare."""
    if column == "exact_match":
        return "exact_match" if mode == "greedy" else "sampled_exact_match"
    if column == "length":
        column = "response_length"
    if column == "ended":
        column = "ended_with_eos"
    return f"greedy_{column}" if mode == "greedy" else column
