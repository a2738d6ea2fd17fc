"""Evaluation the loop runs for every algorithm.

* :func:`reduce_eval`: an algorithm's eval steps return ``{name: (sum, count)}`` per batch (``count`` None: a
  total, e.g. the number of pairs); summed over the eval batches on device and divided once at the end
  (exact, whatever the batch split or device count).
* :class:`GenerationEval`: held-out prompts answered greedily and/or sampled (``eval:`` section); exact match
  against the reference answers, the reward of the answers (each term of the run's reward and their weighted
  sum), their KL to a reference role (per sequence and per token), the policy's entropy on them, their length,
  repetition rate and truncated fraction; a few completions with every reward are written to
  ``RUN_DIR/samples.jsonl`` and to TensorBoard (a text table).
* :meth:`GenerationEval.observe` (the loop's monitor hook, once per evaluation): the reward-hacking monitor
  (:class:`jalign.monitors.HackingMonitor`: the optimised reward against a gold signal, on the held-out answers
  and on the training reward) and entropy collapse, with a warning in the log when an alarm fires. Its state is
  JSON (:meth:`GenerationEval.state_dict`), saved in each checkpoint's metadata by the loop.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign import monitors
from jalign.data.prompts import PromptSet
from jalign.losses import kl_k1
from jalign.models.heads import sequence_scores, token_logps
from jalign.rollout import experience as xp

EVAL_STATE_KEY = "generation_eval"  # the key of GenerationEval.state_dict() in a checkpoint's metadata


@dataclasses.dataclass
class MonitorConfig:
    """The reward-hacking monitor of an RL run (``algorithm.monitor``), fed at every evaluation.

    ``gold``: the signal the optimised reward is checked against: ``auto`` (a reward term with weight 0, else
    exact match when a reward model is optimised and the prompts have reference answers), the name of a reward
    term, ``exact_match``, or ``none`` (off). The alarm fires when, over the last ``window`` evaluations, the
    optimised reward's fitted change exceeds ``min_reward_rise`` while the gold one falls by more than
    ``min_gold_drop`` (set both above the evaluation noise); entropy collapse when the policy's entropy on the
    held-out answers falls below ``entropy_ratio`` times its first value.
    """

    gold: str = "auto"
    window: int = 4
    min_reward_rise: float = 0.05
    min_gold_drop: float = 0.05
    entropy_ratio: float = 0.2


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


@dataclasses.dataclass(frozen=True)
class _Term:
    """A reward term as the evaluation scores it: a host rule ``(prompt, response, reference, example)`` or a
    reward-model role read at ``attribute`` and standardised like in training."""

    name: str
    weight: float
    rule: Optional[Callable] = None
    role: Optional[str] = None
    attribute: int = 0


def rule_reward_fn(spec: Optional[str], key: str, src: str) -> Optional[Callable]:
    """A rule of ``jalign.rewards`` (a registered name or an import path ``module:function``) as a
    ``GenerationEval`` reward function, or None; an unknown rule is one ConfigError naming ``key``."""
    if not spec:
        return None
    from jalign.config import ConfigError
    from jalign.rewards import get_reward

    try:
        rule = get_reward(spec, key=key)
    except ValueError as err:
        raise ConfigError(f"{src}: {err}") from None
    return lambda p, r, ref, ex: rule(p, r, ref, fields=None)


def no_eval_reward(cfg, why: str) -> None:
    """``eval.reward`` set for an algorithm that scores its evaluation with its own reward: one ConfigError
    (a rule the run would silently not score is a wrong figure)."""
    if cfg.eval.reward:
        from jalign.config import ConfigError

        raise ConfigError(f"{cfg.source or '<config>'}: eval.reward={cfg.eval.reward!r} is not used: {why} "
                          "(eval.reward is for algorithms without a reward of their own); remove it")


def _terms(rewards, reward_fn, reward_role, reward_attribute) -> list[_Term]:
    """The terms from ``rewards`` (``jalign.algorithms.rl_rewards.RewardTerm``s) or the one-term shorthands."""
    if rewards is not None:
        out = []
        for t in rewards:
            rule = None
            if t.rule is not None:
                rule = functools.partial(lambda r, p, resp, ref, ex: r(p, resp, ref, fields=getattr(ex, "fields", None)),
                                         t.rule)
            out.append(_Term(t.name, float(t.weight), rule, t.role, t.attribute))
        return out
    if reward_fn is not None:
        return [_Term("reward", 1.0, rule=reward_fn)]
    if reward_role is not None:
        return [_Term("reward", 1.0, role=reward_role, attribute=reward_attribute)]
    return []


class GenerationEval:
    """Generation-based evaluation on a fixed set of held-out prompts (see the module docstring).

    ``rewards``: the run's reward terms (``RewardTerm``: a rule, or a reward-model role in the run's roles),
    standardised with ``standardize = (offset, scale, clip)`` for model terms, combined with their weights into
    ``reward``; or the shorthands ``reward_fn(prompt_text, response, reference, example) -> float`` (host) /
    ``reward_role`` (read at ``reward_attribute``). ``kl_role``: the frozen model the KL is measured against.
    ``monitor``: a :class:`MonitorConfig` turns on :meth:`observe`'s hacking monitor.
    """

    def __init__(self, rt, tokenizer, prompts: PromptSet, *, reward_fn: Optional[Callable] = None,
                 reward_role: Optional[str] = None, reward_attribute: int = 0, kl_role: Optional[str] = None,
                 rewards=None, standardize=(0.0, 1.0, None), monitor: Optional[MonitorConfig] = None):
        e = rt.cfg.eval
        self.rt, self.tokenizer, self.e = rt, tokenizer, e
        n = min(len(prompts), e.prompts)
        self.prompts = prompts
        self.n = n
        self.terms = _terms(rewards, reward_fn, reward_role, reward_attribute)
        self.standardize = standardize
        self.kl_role = kl_role
        dp = rt.data_parallel
        self.chunk = xp.round_up(min(n, 128), dp)
        sp = rt.mesh.shape["sequence"]
        self.P, self.N = xp.rollout_shape(max(len(prompts.ids[i]) for i in range(n)), e.max_new_tokens, sp)
        self._programs: dict = {}
        self._tb = None
        self.monitor_cfg = monitor
        self.monitor = self.train_monitor = None
        if monitor is not None:
            kw = dict(window=monitor.window, min_reward_rise=monitor.min_reward_rise,
                      min_gold_drop=monitor.min_gold_drop, entropy_ratio=monitor.entropy_ratio)
            self.monitor, self.train_monitor = monitors.HackingMonitor(**kw), monitors.HackingMonitor(**kw)

    @classmethod
    def for_examples(cls, algo, examples, texts=None, **kw) -> Optional["GenerationEval"]:
        """For supervised algorithms: ``examples`` are ``(prompt_ids, reference)`` of held-out data, ``texts``
        their prompts' texts (what a rule reward sees)."""
        if algo.cfg.eval.prompts <= 0 or not examples:
            return None
        return cls(algo.rt, algo.tokenizer, PromptSet.from_pairs(examples, texts), **kw)

    @property
    def model_roles(self) -> list[str]:
        return sorted({t.role for t in self.terms if t.role is not None})

    # one jitted program per model configuration: policy log-probs and entropy, reference log-probs, RM scores
    def _score_impl(self, params, ref, rms, out, *, cfg, ref_cfg, rm_cfgs):
        from jalign.algorithms.base import require_mesh_context

        require_mesh_context("the generation-eval scoring program")
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        res = {"length": jnp.sum(rows["mask"], -1), "ended": rows["ended"]}
        if ref is not None:
            T = self.e.temperature
            lp, ent = token_logps(params, rows, cfg, T, return_entropy=True)
            rlp = token_logps(ref, rows, ref_cfg, T)
            res["kl"] = jnp.sum(kl_k1(lp, rlp, rows["mask"]), -1)
            res["entropy_sum"] = jnp.sum(jnp.where(rows["mask"] > 0, ent, 0.0), -1)
        for t in self.terms:
            if t.role is not None and t.role in rms:
                s = sequence_scores(rms[t.role], rows["tokens"], rows["positions"], rows["segment_ids"],
                                    dict(rm_cfgs)[t.role])
                res[f"rm:{t.name}"] = s[:, t.attribute].astype(jnp.float32)
        return res

    def _program(self, cfg, ref_cfg, rm_cfgs):
        key = (repr(cfg), repr(ref_cfg), repr(rm_cfgs))
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(self._score_impl, cfg=cfg, ref_cfg=ref_cfg,
                                                            rm_cfgs=rm_cfgs))
        return self._programs[key]

    def _reward_columns(self, per_row: dict, texts, index, row_prompts) -> dict:
        """{term name: per-row reward (standardised for reward models)} and their weighted sum ``reward``."""
        from jalign.rewards import combine_rewards

        cols = {}
        off, scale, clip = self.standardize
        for t in self.terms:
            if t.rule is not None:
                cols[t.name] = np.asarray([t.rule(self.prompts.texts[row_prompts[r]], text,
                                                  self.prompts.answers[row_prompts[r]],
                                                  self.prompts.examples[row_prompts[r]])
                                           for r, text in zip(index, texts)], np.float32)
            elif f"rm:{t.name}" in per_row:
                c = (np.asarray(per_row.pop(f"rm:{t.name}"), np.float32) - np.float32(off)) / np.float32(scale)
                cols[t.name] = c if clip is None else np.clip(c, -clip, clip)
        if not cols:
            return {}
        if len(self.terms) == 1:
            return {"reward": cols[self.terms[0].name]}
        total, comps = combine_rewards(cols, {t.name: t.weight for t in self.terms if t.name in cols})
        return {"reward": total, **{f"reward/{k}": v for k, v in comps.items()}}

    def __call__(self, params, cfg, roles, step: int = 0) -> dict:
        if self.n == 0:
            return {}
        modes = [m for m, on in (("greedy", self.e.greedy), ("sampled", self.e.sampled)) if on]
        sums, logged = {}, []
        rm_roles = [r for r in self.model_roles if r in roles]
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
                rms = roles.on_device(rm_roles) if rm_roles else {}
                score = self._program(cfg, roles.config(self.kl_role) if ref is not None else None,
                                      tuple((r, roles.config(r)) for r in rm_roles))
                per_row = score(params, ref, rms, out)
                tokens, index = xp.local_rows(out["tokens"])
                lengths, ended = xp.local_rows(out["lengths"])[0], xp.local_rows(out["ended_with_eos"])[0]
                texts = xp.decode_responses(self.tokenizer, tokens, lengths, ended)
                row_prompts = list(idx)
                cols = {k: xp.local_rows(v)[0] for k, v in per_row.items()}
                cols.update(self._reward_columns(cols, texts, index, row_prompts))
                cols["repetition_rate"] = np.asarray([monitors.repetition_rate([row[:int(n) - int(bool(e))]])
                                                      for row, n, e in zip(tokens, lengths, ended)], np.float32)
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
        for mode in modes:
            _per_token_figures(out, sums, mode)
        self._log_samples(logged, step)
        return out

    # ---- the monitor hook ---------------------------------------------------------------------------
    def _mode(self) -> str:
        return "sampled" if self.e.sampled else "greedy"

    def gold_signal(self) -> Optional[str]:
        """The eval metric the optimised reward is checked against (see :class:`MonitorConfig`), or None."""
        c = self.monitor_cfg
        if c is None or c.gold == "none":
            return None
        mode = self._mode()
        names = {t.name for t in self.terms}
        if c.gold == "exact_match":
            return _metric_name("exact_match", mode)
        if c.gold != "auto":
            if c.gold not in names:
                raise ValueError(f"algorithm.monitor.gold={c.gold!r} is not a reward term ({', '.join(sorted(names))}), "
                                 "'exact_match', 'auto' or 'none'")
            return _metric_name(_term_column(c.gold, len(self.terms)), mode)
        zero = [t for t in self.terms if t.weight == 0]
        if zero:
            return _metric_name(_term_column(zero[0].name, len(self.terms)), mode)
        if any(t.role is not None for t in self.terms) and self.prompts.has_answers:
            return _metric_name("exact_match", mode)
        return None

    def observe(self, step: int, metrics: dict, train_metrics: Optional[dict] = None) -> dict:
        """The monitors of one evaluation (``metrics``: this evaluation's, ``train_metrics``: the latest training
        step's): ``monitor/*`` metrics, and a warning in the log when the hacking alarm or entropy collapse fires."""
        if self.monitor is None:
            return {}
        mode = self._mode()
        opt_key, gold_key = _metric_name("reward", mode), self.gold_signal()
        opt, gold = metrics.get(opt_key), metrics.get(gold_key) if gold_key else None
        if opt is None:
            gold = None
        out = self.monitor.update(step, reward=opt, gold=gold, entropy=metrics.get(_metric_name("entropy", mode)),
                                  length=metrics.get(_metric_name("length", mode)),
                                  kl=metrics.get(_metric_name("kl_per_token", mode)))
        train_reward = (train_metrics or {}).get("reward_mean")
        if gold is not None and train_reward is not None:
            t = self.train_monitor.update(step, reward=train_reward, gold=gold)
            out.update({f"train_{k}": t[k] for k in ("reward_gold_corr", "reward_trend", "hacking_alarm",
                                                     "first_alarm_step")})
        self._warn(step, out, opt_key, gold_key)
        return {f"monitor/{k}": v for k, v in out.items()}

    def _warn(self, step, out, opt_key, gold_key) -> None:
        w = self.monitor.window
        for prefix, what in (("", f"held-out {opt_key}"), ("train_", "training reward_mean")):
            if out.get(prefix + "hacking_alarm"):
                mon = self.monitor if not prefix else self.train_monitor
                rise = monitors.trend(mon.reward[-w:]) * (w - 1)
                drop = -monitors.trend(mon.gold[-w:]) * (w - 1)
                self.rt.log(f"WARNING: possible reward hacking at step {step}: the optimised reward ({what}) rose "
                            f"by {rise:.3g} over the last {w} evaluations while the gold signal ({gold_key}) fell by "
                            f"{drop:.3g} (correlation so far {out[prefix + 'reward_gold_corr']:.2f}); see the "
                            f"completions in {Path(self.rt.run_dir) / 'samples.jsonl'}")
        if out.get("entropy_collapse"):
            self.rt.log(f"WARNING: entropy collapse at step {step}: the policy's entropy on held-out answers is "
                        f"{out['entropy_ratio']:.3g} of its first value")

    def state_dict(self) -> dict:
        """The monitors' series (JSON), for the checkpoint's metadata."""
        if self.monitor is None:
            return {}
        return {"monitor": self.monitor.state_dict(), "train_monitor": self.train_monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.monitor is None or not state:
            return
        self.monitor = monitors.HackingMonitor.from_state_dict(state["monitor"])
        self.train_monitor = monitors.HackingMonitor.from_state_dict(state["train_monitor"])

    # ---- samples --------------------------------------------------------------------------------
    def _log_samples(self, rows: list, step: int) -> None:
        if not rows or jax.process_index() != 0:
            return
        path = Path(self.rt.run_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            tb.add_text("samples", samples_markdown(rows), step)
            tb.flush()

    def _tensorboard(self):
        if self._tb is None and getattr(self.rt.cfg.train, "tensorboard", False):
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional, like the loop's scalars
                self._tb = False
                return None
            self._tb = SummaryWriter(str(Path(self.rt.run_dir) / "tensorboard"), filename_suffix=".samples")
        return self._tb or None


def samples_markdown(rows: list) -> str:
    """The completions of one evaluation as a Markdown table (prompt, response, reference, every score)."""
    skip = {"step", "prompt", "response", "reference", "mode"}
    cols = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]

    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", "⏎")

    head = ["mode", "prompt", "response", "reference", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r.get("mode"), r.get("prompt"), r.get("response"), r.get("reference")]
        vals += [f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k) for k in cols]
        lines.append("| " + " | ".join(cell(v) for v in vals) + " |")
    return "\n".join(lines)


def _per_token_figures(out: dict, sums: dict, mode: str) -> None:
    """Ratios of sums: KL and entropy per token (over every response token of the evaluation), truncated fraction."""
    length = sums.get(_metric_name("length", mode))
    if length:
        for col, name in (("kl", "kl_per_token"), ("entropy_sum", "entropy")):
            if _metric_name(col, mode) in sums:
                out[_metric_name(name, mode)] = sums[_metric_name(col, mode)] / length
        out.pop(_metric_name("entropy_sum", mode), None)
    ended = out.get(_metric_name("ended", mode))
    if ended is not None:
        out[_metric_name("truncated_fraction", mode)] = 1.0 - ended


def _term_column(name: str, n_terms: int) -> str:
    return "reward" if n_terms == 1 else f"reward/{name}"


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


def host_state(algo) -> dict:
    """What the loop saves in a checkpoint's metadata for the evaluation (the monitors' series)."""
    ge = getattr(algo, "generation_eval", None)
    state = ge.state_dict() if ge is not None else {}
    return {EVAL_STATE_KEY: state} if state else {}


def load_host_state(algo, meta: dict) -> None:
    """Restore :func:`host_state` from a checkpoint's metadata (absent in older checkpoints: nothing to do)."""
    ge = getattr(algo, "generation_eval", None)
    if ge is not None and meta and meta.get(EVAL_STATE_KEY):
        ge.load_state_dict(meta[EVAL_STATE_KEY])
