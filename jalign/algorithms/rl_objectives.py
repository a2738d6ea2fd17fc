"""The policy objectives, advantage estimators and mismatch corrections of the RL algorithms, each selected by
config from a small registry (``algorithm.policy_loss``, ``algorithm.advantage``, ``algorithm.mismatch_correction``):

    policy_loss   ppo_clip (clipped ratio, DAPO's clip_eps_low / clip_eps_high) | dual_clip | gspo | cispo | reinforce
    advantage     gae (critic; PPO) | group (GRPO, Dr. GRPO) | leave_one_out (RLOO) | reinforce_pp | reinforce_pp_baseline
    mismatch      none | token_tis | sequence_tis | sequence_mis

The math lives in :mod:`jalign.losses` (one pure function per variant, with its paper); this module only maps
config keys to those functions. A new entry is one decorated function: ``@policy_loss("name")`` taking
``(a, logps, old_logps, advantages, weight, norms)`` and returning ``(loss, metrics)``, or ``@advantage("name")``
taking ``(a, sizes, x: AdvantageInputs)`` and returning ``(extra batch fields, metrics, new kl_coef)``.

Where the KL to the reference goes (``algorithm.kl_in``): ``reward`` shapes the reward (token-level estimators put
``kl_estimator`` per token into the token rewards; sequence-level ones subtract ``kl_coef * sum_t k1``), ``loss``
adds ``kl_coef`` times the token-mean k3 to the loss (GRPO), ``none`` leaves it out (DAPO).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jalign.config import ConfigError
from jalign.losses import (adaptive_kl_coef, cispo_loss, dapo_policy_loss, dual_clip_ppo_loss, explained_variance,
                           gae, grpo_advantages, gspo_loss, kl_abs, kl_k1, kl_k3, masked_mean,
                           reinforce_loss, reinforce_pp_advantages, reinforce_pp_baseline_advantages,
                           rloo_advantages, sequence_mis_weights, sequence_tis_weights, token_rewards,
                           token_tis_weights, whiten)

KL_ESTIMATORS = {"k1": kl_k1, "abs": kl_abs, "k3": kl_k3}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered choice: its function and what the algorithm must provide for it."""

    fn: Callable
    sequence_level: bool = False  # policy loss: one ratio per sequence (needs [B] advantages and weights)
    token_level: bool = False  # advantage: per-token advantages [B, T]
    needs_critic: bool = False  # advantage: a value model (PPO's critic)
    min_per_prompt: int = 1  # advantage: samples per prompt its baseline needs


POLICY_LOSSES: dict[str, Entry] = {}
ADVANTAGES: dict[str, Entry] = {}
MISMATCH: dict[str, Entry] = {}


def _register(table: dict, name: str, **kw):
    def deco(fn):
        table[name] = Entry(fn, **kw)
        return fn

    return deco


def policy_loss(name: str, *, sequence_level: bool = False):
    return _register(POLICY_LOSSES, name, sequence_level=sequence_level)


def advantage(name: str, *, token_level: bool = False, needs_critic: bool = False, min_per_prompt: int = 1):
    return _register(ADVANTAGES, name, token_level=token_level, needs_critic=needs_critic,
                     min_per_prompt=min_per_prompt)


def lookup(table: dict, name: str, key: str, source: str) -> Entry:
    """The entry ``name`` of ``table``, or a ConfigError naming ``key`` with a suggestion."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{source}: algorithm.{key}: unknown choice {name!r}{hint} (known: {', '.join(table)})")


def clip_bounds(a) -> tuple[float, float]:
    """(eps_low, eps_high): ``clip_eps_low`` / ``clip_eps_high``, each ``clip_eps`` when unset."""
    lo = a.clip_eps if a.clip_eps_low is None else a.clip_eps_low
    hi = a.clip_eps if a.clip_eps_high is None else a.clip_eps_high
    return lo, hi


# ---- policy objectives: (a, logps, old, advantages, weight, norms) -> (loss, metrics) --------------
@policy_loss("ppo_clip")
def _ppo_clip(a, logps, old, adv, weight, norms):
    """PPO's clipped surrogate (Schulman et al. 2017 eq. 7) with DAPO's decoupled bounds (Yu et al. 2025 Sec. 3.1);
    equal bounds are ``ppo_policy_loss`` exactly."""
    lo, hi = clip_bounds(a)
    return dapo_policy_loss(logps, old, adv, weight, norms["n"], clip_eps_low=lo, clip_eps_high=hi)


@policy_loss("dual_clip")
def _dual_clip(a, logps, old, adv, weight, norms):
    """Dual-clip PPO (Ye et al. 2020 Sec. 3.2): the clipped surrogate bounded by ``dual_clip * |A|`` for A < 0."""
    lo, hi = clip_bounds(a)
    return dual_clip_ppo_loss(logps, old, adv, weight, norms["n"], clip_eps_low=lo, clip_eps_high=hi,
                              dual_clip=a.dual_clip)


@policy_loss("gspo", sequence_level=True)
def _gspo(a, logps, old, adv, weight, norms):
    """GSPO (Zheng et al. 2025 Sec. 4.1): length-normalised sequence ratio, clipped per sequence, mean over the
    valid sequences of the minibatch."""
    lo, hi = clip_bounds(a)
    loss, m = gspo_loss(logps, old, adv, weight, norms["seqs"], clip_eps_low=lo, clip_eps_high=hi)
    return loss, dict(m, num_tokens=jnp.sum(weight))


@policy_loss("cispo")
def _cispo(a, logps, old, adv, weight, norms):
    """CISPO (MiniMax 2025 Sec. 3.1): REINFORCE with stop-gradient importance weights clipped to
    [1 - clip_eps_low, 1 + clip_eps_high]."""
    lo, hi = clip_bounds(a)
    return cispo_loss(logps, old, adv, weight, norms["n"], clip_eps_high=hi, clip_eps_low=lo)


@policy_loss("reinforce")
def _reinforce(a, logps, old, adv, weight, norms):
    """REINFORCE (Williams 1992; with RLOO's baseline, Ahmadian et al. 2024 eq. 5/6): no ratio, no clipping."""
    return reinforce_loss(logps, adv, weight, norms["n"])


def kl_loss_term(logps, ref_logps, weight, n):
    """Token mean of k3 = exp(d) - d - 1, d = ref - logp (Schulman 2020; DeepSeekMath eq. 4): GRPO's KL term."""
    return masked_mean(kl_k3(logps, ref_logps, weight), weight, count=n)


def with_is_weight(adv, w):
    """Advantages times non-negative importance weights (sequence [B] or token [B, T] either way).

    For w >= 0 every objective here is positively homogeneous in A per token (or per sequence): scaling A by w
    scales that term of the loss by w and leaves its clipping decision unchanged, so this is the weighted loss
    without touching the normaliser or the KL / entropy terms."""
    if adv.ndim == w.ndim:
        return adv * w
    return adv[:, None] * w if adv.ndim == 1 else adv * w[:, None]


# ---- advantage estimators: (a, sizes, x) -> (extra fields, metrics, new kl_coef) --------------------
@dataclasses.dataclass
class AdvantageInputs:
    """What the scoring program hands an advantage estimator (arrays over the N = P*K rollout rows)."""

    old: Optional[jax.Array]  # behaviour log-probs [N, S] (None when the estimator and loss do not need them)
    ref: jax.Array  # reference log-probs [N, S]
    values: Optional[jax.Array]  # critic values [N, S]
    score: jax.Array  # sequence reward [N] (combined, shaped, truncation rule applied)
    mask: jax.Array  # trained tokens [N, S]
    seq_kl: Optional[jax.Array]  # sum_t k1(old, ref) [N]
    kl_coef: Any  # the state's KL coefficient (adaptive for PPO with kl_target)


def _sequence_reward(a, x: AdvantageInputs):
    """R - kl_coef * sum_t k1 when the KL goes into the reward (RLOO's default), else R."""
    return x.score - a.kl_coef * x.seq_kl if a.kl_in == "reward" else x.score


def _token_kl(a, x: AdvantageInputs):
    if a.kl_in != "reward":
        return jnp.zeros_like(x.mask), 0.0
    return KL_ESTIMATORS[a.kl_estimator](x.old, x.ref, x.mask), x.kl_coef


@advantage("gae", token_level=True, needs_critic=True)
def _gae(a, s, x: AdvantageInputs):
    """PPO-RLHF (Ziegler et al. 2019 Sec. 2.2; Ouyang et al. 2022 eq. 2): KL-penalised token rewards, GAE
    (Schulman et al. 2016 eq. 16), whitened over the rollout; the adaptive KL controller when kl_target is set."""
    kl, beta = _token_kl(a, x)
    rewards = token_rewards(x.score, x.mask, kl, beta)
    adv, returns = gae(rewards, jax.lax.stop_gradient(x.values), x.mask, a.gamma, a.lam)
    if a.whiten_advantages:
        adv = whiten(adv, x.mask)  # the whole rollout is one global array: global statistics
    new_kl = x.kl_coef
    if getattr(a, "kl_target", None) is not None:
        new_kl = adaptive_kl_coef(x.kl_coef, jnp.mean(x.seq_kl), a.kl_target, a.kl_horizon, s.rollout)
    metrics = {"explained_variance": explained_variance(x.values, returns, x.mask)}
    return {"advantages": adv, "returns": returns, "values": x.values}, metrics, new_kl


@advantage("group", min_per_prompt=2)
def _group(a, s, x: AdvantageInputs):
    """GRPO (Shao et al. 2024 Sec. 4.1.2): (R - mean_group) / (std_group + eps); Dr. GRPO (Liu et al. 2025)
    without the division (``scale_advantages: false``)."""
    r = _sequence_reward(a, x)
    adv = grpo_advantages(r.reshape(s.prompts, s.per_prompt), scale=a.scale_advantages).reshape(-1)
    return {"advantages": adv}, {}, x.kl_coef


@advantage("leave_one_out", min_per_prompt=2)
def _leave_one_out(a, s, x: AdvantageInputs):
    """RLOO (Ahmadian et al. 2024 eq. 5/6): R minus the mean of the other K-1 samples of the prompt."""
    r = _sequence_reward(a, x)
    return {"advantages": rloo_advantages(r.reshape(s.prompts, s.per_prompt)).reshape(-1)}, {}, x.kl_coef


@advantage("reinforce_pp", token_level=True)
def _reinforce_pp(a, s, x: AdvantageInputs):
    """REINFORCE++ (Hu 2025 Sec. 3): discounted return of the KL-shaped token rewards, normalised over every
    token of the rollout (one global array: the statistics are global)."""
    kl, beta = _token_kl(a, x)
    return {"advantages": reinforce_pp_advantages(x.score, x.mask, kl, beta_kl=beta, gamma=a.gamma)}, {}, x.kl_coef


@advantage("reinforce_pp_baseline", token_level=True, min_per_prompt=2)
def _reinforce_pp_baseline(a, s, x: AdvantageInputs):
    """REINFORCE++-baseline (Hu 2025 Sec. 3): R minus the group mean, then normalised over the rollout."""
    r = _sequence_reward(a, x).reshape(s.prompts, s.per_prompt)
    return {"advantages": reinforce_pp_baseline_advantages(r, x.mask)}, {}, x.kl_coef


# ---- training/rollout mismatch: (old, sampler_logps, mask, cap) -> (weights, metrics) --------------------
def _mismatch(name: str, *, sequence_level: bool):
    return _register(MISMATCH, name, sequence_level=sequence_level)


@_mismatch("token_tis", sequence_level=False)
def _token_tis(old, sampler, mask, cap):
    """Token TIS (Yao et al. 2025): min(pi_old / pi_sampler, C) per token."""
    return token_tis_weights(old, sampler, mask, cap=cap)


@_mismatch("sequence_tis", sequence_level=True)
def _sequence_tis(old, sampler, mask, cap):
    """Sequence TIS (Liu et al. 2025): min(prod_t pi_old / pi_sampler, C) per sequence."""
    return sequence_tis_weights(old, sampler, mask, cap=cap)


@_mismatch("sequence_mis", sequence_level=True)
def _sequence_mis(old, sampler, mask, cap):
    """Sequence MIS (Liu et al. 2025): the sequence ratio, 0 outside [1/C, C]."""
    return sequence_mis_weights(old, sampler, mask, cap=cap)


# ---- the combination a config selects ---------------------------------------------------------------
def check_objectives(a, source: str, has_critic_keys: bool) -> tuple[Entry, Entry, Optional[Entry]]:
    """(policy loss, advantage, mismatch correction or None) of ``a``; every impossible combination is a
    ConfigError naming the keys."""
    pl = lookup(POLICY_LOSSES, a.policy_loss, "policy_loss", source)
    adv = lookup(ADVANTAGES, a.advantage, "advantage", source)
    mm = None if a.mismatch_correction == "none" else lookup(MISMATCH, a.mismatch_correction,
                                                              "mismatch_correction", source)
    if adv.needs_critic and not has_critic_keys:
        raise ConfigError(f"{source}: algorithm.advantage={a.advantage} needs a critic (a value model); "
                          f"algorithm.name={a.name} has none: use algorithm.name=ppo, or a critic-free estimator "
                          f"({', '.join(k for k, e in ADVANTAGES.items() if not e.needs_critic)})")
    if pl.sequence_level and adv.token_level:
        raise ConfigError(f"{source}: algorithm.policy_loss={a.policy_loss} weighs whole sequences and needs one "
                          f"advantage per sequence; algorithm.advantage={a.advantage} gives one per token (use "
                          f"{', '.join(k for k, e in ADVANTAGES.items() if not e.token_level)})")
    if pl.sequence_level and mm is not None and not mm.sequence_level:
        raise ConfigError(f"{source}: algorithm.policy_loss={a.policy_loss} is sequence-level: use a sequence "
                          f"mismatch_correction (sequence_tis or sequence_mis), not {a.mismatch_correction}")
    if pl.sequence_level and a.loss_aggregation != "token":
        raise ConfigError(f"{source}: algorithm.policy_loss={a.policy_loss} already averages per sequence; "
                          "algorithm.loss_aggregation must stay 'token'")
    lo, hi = clip_bounds(a)
    for key, v in (("clip_eps_low", lo), ("clip_eps_high", hi)):
        if not v > 0:
            raise ConfigError(f"{source}: algorithm.{key} must be > 0, got {v}")
    if a.policy_loss == "dual_clip" and not a.dual_clip > 1.0:
        raise ConfigError(f"{source}: algorithm.dual_clip must be > 1 (the bound is dual_clip * |A|), got {a.dual_clip}")
    if mm is not None and not a.mismatch_cap > (1.0 if a.mismatch_correction == "sequence_mis" else 0.0):
        raise ConfigError(f"{source}: algorithm.mismatch_cap must be > {1 if a.mismatch_correction == 'sequence_mis' else 0}"
                          f", got {a.mismatch_cap}")
    return pl, adv, mm
