"""The reward of the RL algorithms: one or several weighted terms (rules on the host, reward models on device),
shaped into the sequence reward the advantage estimator sees.

    algorithm.rewards: [{fn: math_verify, weight: 1.0}, {fn: format, weight: 0.2}, {model: reward, weight: 0.5}]

``{model: reward}`` names the ``reward`` role (``roles.reward: run:DIR``); any other ``model`` value is a weights
source (``run:DIR``, ``hf:DIR`` or a directory) loaded as a frozen role of its own. ``algorithm.reward_fn`` (a
rule) or ``roles.reward`` alone are the one-term shorthand. A term with weight 0 is scored and logged but not
optimised: a gold signal for the reward-hacking monitor.

Shaping, in this order (:func:`shape_rewards`; the same function in the scoring program and, with dynamic
sampling, in each rollout round):

    c_i   = standardise(raw_i)  for reward-model terms (reward_offset / reward_scale / reward_clip), raw_i for rules
    R     = sum_i w_i c_i                                           (jalign.rewards.combine_rewards, on device)
    R    += overlong_penalty(|y|)                                   (DAPO Sec. 3.4, when overlong_buffer is set)
    R     = truncation_penalty where the response did not end        (truncated_response: penalize)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jalign.config import ConfigError
from jalign.losses import overlong_penalty
from jalign.models.heads import sequence_scores
from jalign.rewards import Reward, RewardError, get_reward, parse_reward_specs, score_rules
from jalign.rollout import experience as xp

REWARD_ROLE = "reward"


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One resolved term: a rule (``rule``) or a reward model (``role``, read at ``attribute``)."""

    name: str
    weight: float
    rule: Optional[Reward] = None
    role: Optional[str] = None
    source: Optional[str] = None  # weights of a role this term brings itself (not roles.reward)
    attribute: int = 0


def reward_terms(cfg) -> list[RewardTerm]:
    """The terms of ``algorithm.rewards`` (or the one-term shorthand); errors name the config keys."""
    a, src = cfg.algorithm, cfg.source or "<config>"
    has_rm = REWARD_ROLE in cfg.roles
    try:
        if a.rewards is None:
            if has_rm == (a.reward_fn is not None):
                raise ConfigError(f"{src}: set exactly one of roles.reward (a reward-model run: roles.reward=run:DIR), "
                                  "algorithm.reward_fn (a rule-based reward, e.g. exact_match), or a list "
                                  "algorithm.rewards of weighted terms")
            if a.reward_fn is not None:
                return [RewardTerm(a.reward_fn.rpartition(":")[2], 1.0, rule=get_reward(a.reward_fn))]
            return [RewardTerm("rm", 1.0, role=REWARD_ROLE, attribute=a.reward_attribute)]
        if a.reward_fn is not None:
            raise ConfigError(f"{src}: algorithm.reward_fn and algorithm.rewards are both set: give the rule as an "
                              f"entry of algorithm.rewards ({{fn: {a.reward_fn}, weight: 1.0}})")
        terms = []
        for i, s in enumerate(parse_reward_specs(a.rewards)):
            if s.fn is not None:
                terms.append(RewardTerm(s.name, s.weight, rule=get_reward(s.fn, s.options,
                                                                            key=f"algorithm.rewards[{i}].fn")))
            elif s.model == REWARD_ROLE:
                if not has_rm:
                    raise ConfigError(f"{src}: algorithm.rewards[{i}]: {{model: reward}} names the reward role, "
                                      "but roles.reward is not set (roles.reward=run:DIR)")
                terms.append(RewardTerm(s.name, s.weight, role=REWARD_ROLE, attribute=a.reward_attribute))
            else:
                terms.append(RewardTerm(s.name, s.weight, role=f"reward_{s.name}", source=s.model,
                                        attribute=a.reward_attribute))
    except RewardError as e:
        raise ConfigError(f"{src}: {e}") from None
    if has_rm and not any(t.role == REWARD_ROLE for t in terms):
        raise ConfigError(f"{src}: roles.reward is set but no algorithm.rewards entry uses it; add "
                          "{model: reward, weight: ...} (weight 0 logs it without optimising it)")
    if not any(t.weight != 0 for t in terms):
        raise ConfigError(f"{src}: algorithm.rewards: every weight is 0, nothing would be optimised")
    return terms


def model_terms(terms) -> list[RewardTerm]:
    return [t for t in terms if t.role is not None]


def rule_terms(terms) -> list[RewardTerm]:
    return [t for t in terms if t.rule is not None]


# ---- host: rule rewards of this process's rows ----------------------------------------------------
def rule_components(terms, tokenizer, out: dict, row_prompts, prompts) -> dict:
    """{name: device [B] sharded like the rollout} for every rule term, each process scoring its own rows
    (only tokens and lengths move to the host). ``row_prompts[b]``: the prompt index of global row b."""
    rules = {t.name: t.rule for t in rule_terms(terms)}
    if not rules:
        return {}
    texts, index = xp.local_texts(tokenizer, out)
    p = [int(row_prompts[r]) for r in index]
    fields = [getattr(prompts.examples[i], "fields", None) for i in p]
    cols = score_rules(rules, [prompts.texts[i] for i in p], texts, [prompts.answers[i] for i in p], fields)
    return {name: xp.put_local_rows(col, index, out["lengths"]) for name, col in cols.items()}


# ---- device: reward-model scores and shaping (jittable) ---------------------------------------------
def model_components(terms, rm_params: dict, rm_cfgs: dict, rows: dict, given: dict, view=None) -> dict:
    """{name: raw score [B] float32} of the reward-model terms not already in ``given``. ``view``: the packed
    rows of ``rows`` (``jalign.algorithms.packed_rows.packed_view``) the forwards run on instead."""
    from jalign.algorithms.packed_rows import packed_sequence_scores

    out = {}
    for t in model_terms(terms):
        if t.name in given:
            continue
        if view is not None:
            s = packed_sequence_scores(rm_params[t.role], rows, view, rm_cfgs[t.role])
        else:
            s = sequence_scores(rm_params[t.role], rows["tokens"], rows["positions"], rows["segment_ids"],
                                rm_cfgs[t.role])
        out[t.name] = s[:, t.attribute].astype(jnp.float32)
    return out


def standardize_reward(score, offset: float, scale: float, clip: Optional[float]):
    """``clip((score - offset) / scale, -clip, clip)`` (no clipping when ``clip`` is None)."""
    score = (score - offset) / scale
    return score if clip is None else jnp.clip(score, -clip, clip)


def shape_rewards(terms, a, raw: dict, lengths, ended) -> tuple[dict, jnp.ndarray, dict]:
    """(standardised components, the sequence reward [B], metrics): see the module docstring."""
    comps, total, raw_total = {}, None, None
    for t in terms:
        c = raw[t.name].astype(jnp.float32)
        if t.role is not None:
            c = standardize_reward(c, a.reward_offset, a.reward_scale, a.reward_clip)
        comps[t.name] = c
        w = jnp.float32(t.weight)
        term, raw_term = (c, raw[t.name]) if len(terms) == 1 and t.weight == 1.0 else (w * c, w * raw[t.name])
        total = term if total is None else total + term
        raw_total = raw_term if raw_total is None else raw_total + raw_term
    metrics = {f"reward/{k}": jnp.mean(v) for k, v in comps.items()} if len(terms) > 1 else {}
    metrics["reward_raw_mean"] = jnp.mean(raw_total)
    if a.overlong_buffer:
        pen = overlong_penalty(lengths, max_length=a.max_new_tokens, overlong_buffer=a.overlong_buffer,
                               penalty_factor=a.overlong_penalty_factor)
        total = total + pen
        metrics["overlong_penalty_mean"] = jnp.mean(pen)
    metrics["reward_ended_min"] = jnp.min(jnp.where(ended, total, jnp.inf))
    if a.truncated_response == "penalize":
        total = jnp.where(ended, total, a.truncation_penalty)
    return comps, total, metrics


def check_reward_keys(a, source: str) -> None:
    """The reward-shaping keys the config's value ranges do not cover."""
    if a.overlong_buffer is not None and not 0 <= a.overlong_buffer <= a.max_new_tokens:
        raise ConfigError(f"{source}: algorithm.overlong_buffer={a.overlong_buffer} must be in [0, "
                          f"algorithm.max_new_tokens={a.max_new_tokens}] (0 or null turns the overlong penalty off)")
    if not np.isfinite(a.overlong_penalty_factor) or a.overlong_penalty_factor < 0:
        raise ConfigError(f"{source}: algorithm.overlong_penalty_factor must be >= 0, got {a.overlong_penalty_factor}")
