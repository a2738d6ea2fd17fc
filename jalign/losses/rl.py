"""Newer RL policy objectives and helpers: DAPO (clip-higher, overlong penalty, dynamic sampling), GSPO, CISPO,
dual-clip PPO, REINFORCE++, and training/rollout mismatch correction (truncated / masked importance sampling).

Conventions as in :mod:`jalign.losses.ppo`: token arrays [B, T] with a response ``mask``; token losses divide
by ``num_tokens`` (valid tokens of the *global* optimizer batch, default this batch's) and sequence losses by
``num_seqs`` (valid sequences of the global batch; a sequence is valid when its mask has a token); metrics
are contributions to that same mean except the local counts and the ``*_max`` metrics (combine those with a
max over micro-batches). Log-ratios are zeroed under the mask and clamped to +-``max_log_ratio`` before
``exp``. Advantages are [B] per sequence or [B, T] per token and are treated as constants.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide
from jalign.losses.ppo import (_MAX_LOG_RATIO, _f32, _per_token, gae, kl_k3, masked_moments, moments_to_mean_var,
                               token_rewards, whiten_with_moments)


def _log_ratio(logp, old_logp, m, max_log_ratio):
    return jnp.clip(jnp.where(m > 0, logp - old_logp, 0.0), -max_log_ratio, max_log_ratio)


def _asym_clipped_pg(logp, old_logp, adv, m, eps_low, eps_high, max_log_ratio):
    """Same arithmetic as ``ppo._clipped_pg`` with separate bounds (bit-identical when they are equal)."""
    logr = _log_ratio(logp, old_logp, m, max_log_ratio)
    ratio = jnp.exp(logr)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.maximum(pg1, pg2), (pg2 > pg1).astype(jnp.float32), ratio, logr


def _pg_metrics(per, clipped, ratio, logr, adv, m, n):
    return {
        "policy_loss": safe_divide(_wsum(per, m), n),
        "clip_fraction": safe_divide(_wsum(clipped, m), n),
        # which side the clip acted on: ratio above 1 + eps_high (A > 0) or below 1 - eps_low (A < 0)
        "clip_fraction_high": safe_divide(_wsum(clipped * (adv > 0), m), n),
        "clip_fraction_low": safe_divide(_wsum(clipped * (adv < 0), m), n),
        "approx_kl": safe_divide(_wsum(ratio - 1.0 - logr, m), n),
        "ratio_mean": safe_divide(_wsum(ratio, m), n),
        "num_tokens": jnp.sum(m),
    }


# ----------------------------------------------------------------------------- DAPO
def dapo_policy_loss(logp, old_logp, advantages, mask, num_tokens: Optional[float] = None, *,
                     clip_eps_low: float = 0.2, clip_eps_high: float = 0.28,
                     max_log_ratio: float = _MAX_LOG_RATIO):
    """Clipped surrogate with decoupled clip ranges ("Clip-Higher"), token mean.

        rho_t = exp(logp_t - old_logp_t)
        L = (1/N) sum_{b,t} m_{b,t} max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Sec. 3.1 (Clip-Higher,
    eps_low = 0.2, eps_high = 0.28) and Sec. 3.3 (token-level aggregation: N = all valid tokens of the batch);
    the DAPO objective has no KL term. With eps_low == eps_high it is :func:`jalign.losses.ppo_policy_loss`
    exactly. Metrics: those of ``ppo_policy_loss`` plus ``clip_fraction_high`` / ``clip_fraction_low``.
    """
    logp, old_logp = _f32(logp, old_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = _per_token(advantages, logp.shape)
    per, clipped, ratio, logr = _asym_clipped_pg(logp, old_logp, adv, m, clip_eps_low, clip_eps_high,
                                                 max_log_ratio)
    metrics = _pg_metrics(per, clipped, ratio, logr, adv, m, n)
    return metrics["policy_loss"], metrics


def grpo_clip_higher_loss(logp, old_logp, ref_logp, advantages, mask, num_tokens: Optional[float] = None, *,
                          beta_kl: float, clip_eps_low: float = 0.2, clip_eps_high: float = 0.28,
                          max_log_ratio: float = _MAX_LOG_RATIO):
    """GRPO's loss (clipped surrogate + k3 KL to the reference) with DAPO's decoupled clip ranges.

        L = (1/N) sum m [ max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) + beta_kl k3(pi, pi_ref) ]

    Shao et al. 2024, "DeepSeekMath", eq. 3/4 (GRPO, k3 KL) with the Clip-Higher bounds of Yu et al. 2025
    (DAPO, Sec. 3.1). With eps_low == eps_high it is :func:`jalign.losses.grpo_loss` exactly; beta_kl = 0 is
    DAPO's objective. Metrics: those of ``grpo_loss`` plus ``clip_fraction_high`` / ``clip_fraction_low``.
    """
    logp, old_logp, ref_logp = _f32(logp, old_logp, ref_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = _per_token(advantages, logp.shape)
    per, clipped, ratio, logr = _asym_clipped_pg(logp, old_logp, adv, m, clip_eps_low, clip_eps_high,
                                                 max_log_ratio)
    kl = kl_k3(logp, ref_logp, m, max_log_ratio)
    metrics = _pg_metrics(per, clipped, ratio, logr, adv, m, n)
    kl_mean = safe_divide(_wsum(kl, m), n)
    loss = metrics["policy_loss"] + beta_kl * kl_mean
    return loss, {"loss": loss, "kl": kl_mean, **metrics}


def overlong_penalty(lengths, *, max_length: int, overlong_buffer: int, penalty_factor: float = 1.0):
    """DAPO's soft overlong punishment, a length-dependent reward added to the task reward: [B] -> [B].

        R(|y|) = 0                                        |y| <= L_max - L_cache
                 ((L_max - L_cache) - |y|) / L_cache      L_max - L_cache < |y| <= L_max
                 -1                                       |y| > L_max
        (times ``penalty_factor``)

    Yu et al. 2025, "DAPO", Sec. 3.4 (Overlong Reward Shaping). L_max = ``max_length`` (the response budget),
    L_cache = ``overlong_buffer``; a response that reached the budget gets the full -1 * factor.
    """
    if not 0 < overlong_buffer <= max_length:
        raise ValueError(f"overlong_penalty: need 0 < overlong_buffer <= max_length, got {overlong_buffer}, "
                         f"{max_length}")
    (L,) = _f32(lengths)
    start = float(max_length - overlong_buffer)
    r = jnp.where(L <= start, 0.0, (start - L) / overlong_buffer)
    return penalty_factor * jnp.where(L > max_length, -1.0, r)


def dynamic_sampling_keep(rewards):
    """DAPO's dynamic sampling filter: which prompt groups carry a learning signal. [P, K] -> bool [P].

    A group whose K rewards are all equal (all right or all wrong) has zero group-normalised advantage, so it
    contributes nothing but dilutes the batch: Yu et al. 2025, "DAPO", Sec. 3.2 (keep groups with
    0 < #correct < K; here generalised to "not all rewards equal"). The algorithm refills the batch with new
    prompts until it is full.
    """
    (r,) = _f32(rewards)
    return jnp.max(r, axis=-1) > jnp.min(r, axis=-1)


# ----------------------------------------------------------------------------- GSPO
def _seq_valid(m, valid_seqs, num_seqs):
    has = (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
    if valid_seqs is not None:
        has = has * (jnp.asarray(valid_seqs, jnp.float32) > 0)
    n = jnp.sum(has) if num_seqs is None else jnp.asarray(num_seqs, jnp.float32)
    return has, n


def gspo_loss(logp, old_logp, advantages, mask, num_seqs: Optional[float] = None, *, clip_eps_low: float = 3e-4,
              clip_eps_high: float = 4e-4, max_log_ratio: float = _MAX_LOG_RATIO):
    """Group Sequence Policy Optimization: a length-normalised *sequence* importance ratio, clipped per sequence.

        s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp( (1/|y_i|) sum_t m_{i,t} (logp_{i,t} - old_logp_{i,t}) )
        L   = (1/G) sum_i max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))

    Zheng et al. 2025, "Group Sequence Policy Optimization", Sec. 4.1 (the GSPO objective and s_i; their
    clip range is ~1e-4 wide, the defaults here). ``advantages`` [B] per sequence (e.g. group-normalised);
    |y_i| = sum_t m_{i,t}; G = ``num_seqs`` (valid sequences of the global batch). With one token per
    sequence it equals the token-level PPO ratio loss. The mean log-ratio is clamped to +-``max_log_ratio``.
    Rows without a valid token contribute nothing.

    Metrics (sequence means over G): ``policy_loss``, ``clip_fraction`` (sequences whose clipped term is
    active), ``seq_ratio_mean``, ``approx_kl`` (k3 of the per-token mean log-ratio); ``num_seqs`` (local).
    """
    logp, old_logp = _f32(logp, old_logp)
    m = jnp.ones(logp.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    v, n = _seq_valid(m, None, num_seqs)
    adv = jnp.asarray(advantages, jnp.float32).reshape(-1)
    logr_tok = jnp.where(m > 0, logp - old_logp, 0.0)
    mean_logr = safe_divide(jnp.sum(logr_tok * m, axis=-1), jnp.sum(m, axis=-1))
    mean_logr = jnp.clip(mean_logr, -max_log_ratio, max_log_ratio)
    s = jnp.exp(mean_logr)
    pg1 = -adv * s
    pg2 = -adv * jnp.clip(s, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per = jnp.maximum(pg1, pg2)
    loss = safe_divide(_wsum(per, v), n)
    metrics = {
        "policy_loss": loss,
        "clip_fraction": safe_divide(_wsum((pg2 > pg1).astype(jnp.float32), v), n),
        "seq_ratio_mean": safe_divide(_wsum(s, v), n),
        "approx_kl": safe_divide(_wsum(s - 1.0 - mean_logr, v), n),
        "num_seqs": jnp.sum(v),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- CISPO, dual-clip PPO
def cispo_loss(logp, old_logp, advantages, mask, num_tokens: Optional[float] = None, *, clip_eps_high: float,
               clip_eps_low: float = 1.0, max_log_ratio: float = _MAX_LOG_RATIO):
    """Clipped IS-weight Policy Optimization: REINFORCE with clipped, stop-gradient importance weights.

        r_t  = exp(logp_t - old_logp_t),   w_t = stop_gradient(clip(r_t, 1 - eps_low, 1 + eps_high))
        L    = -(1/N) sum_{b,t} m_{b,t} w_t A_t logp_t

    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", Sec. 3.1
    (CISPO: the weight is clipped instead of the update, so every token keeps a gradient; the paper sets no
    lower bound, i.e. a large eps_low: the default 1.0 makes the lower bound 0, inactive). Token-level mean
    over N = ``num_tokens`` as in the paper. Metrics: ``policy_loss``, ``is_weight_mean``,
    ``clip_fraction`` (tokens whose weight was truncated), ``approx_kl``, ``ratio_mean``; ``num_tokens``.
    """
    logp, old_logp = _f32(logp, old_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = jax.lax.stop_gradient(_per_token(advantages, logp.shape))
    logr = jax.lax.stop_gradient(_log_ratio(logp, old_logp, m, max_log_ratio))
    ratio = jnp.exp(logr)
    w = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    lp = jnp.where(m > 0, logp, 0.0)
    loss = -safe_divide(_wsum(w * adv * lp, m), n)
    metrics = {
        "policy_loss": loss,
        "is_weight_mean": safe_divide(_wsum(w, m), n),
        "clip_fraction": safe_divide(_wsum((w != ratio).astype(jnp.float32), m), n),
        "approx_kl": safe_divide(_wsum(ratio - 1.0 - logr, m), n),
        "ratio_mean": safe_divide(_wsum(ratio, m), n),
        "num_tokens": jnp.sum(m),
    }
    return loss, metrics


def dual_clip_ppo_loss(logp, old_logp, advantages, mask, num_tokens: Optional[float] = None, *,
                       clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = 3.0,
                       max_log_ratio: float = _MAX_LOG_RATIO):
    """Dual-clip PPO: the clipped surrogate with a lower bound c on the objective for negative advantages.

        l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
        L   = (1/N) sum m_t [ min(l_t, -c A_t) if A_t < 0 else l_t ]

    Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", Sec. 3.2
    (dual-clip: for A < 0 the objective is max(min(rho A, clip(rho) A), c A), c > 1, so a huge ratio on a bad
    action cannot produce an unbounded update). c = ``dual_clip`` (3 in the paper and verl). Metrics: those
    of :func:`dapo_policy_loss` plus ``dual_clip_fraction`` (tokens where the lower bound is active).
    """
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip_ppo_loss: dual_clip must be > 1, got {dual_clip}")
    logp, old_logp = _f32(logp, old_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = _per_token(advantages, logp.shape)
    per, clipped, ratio, logr = _asym_clipped_pg(logp, old_logp, adv, m, clip_eps_low, clip_eps_high,
                                                 max_log_ratio)
    bound = -dual_clip * adv
    dual = (adv < 0) & (per > bound)
    per = jnp.where(dual, bound, per)
    metrics = _pg_metrics(per, clipped, ratio, logr, adv, m, n)
    metrics["dual_clip_fraction"] = safe_divide(_wsum(dual.astype(jnp.float32), m), n)
    return metrics["policy_loss"], metrics


# ----------------------------------------------------------------------------- REINFORCE++
def reinforce_pp_advantages(score, mask, kl, *, beta_kl: float, gamma: float = 1.0, moments=None,
                            eps: float = 1e-8):
    """REINFORCE++ advantages: discounted return of KL-shaped token rewards, normalised over the whole batch.

        r_t = 1[t = last] R - beta_kl KL_t,   G_t = sum_{s >= t} gamma^(s-t) r_s,
        A_t = (G_t - mean(G)) / sqrt(var(G) + eps),   mean and var over every valid token of the global batch

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", Sec. 3 (token-
    level KL penalty in the reward; global advantage normalisation instead of a critic or a per-prompt group
    baseline). ``score`` [B] sequence rewards, ``kl`` [B, T] a per-token KL estimate (e.g. ``kl_k1(old_logp,
    ref_logp)``), ``mask`` [B, T]. ``moments`` = (sum, sumsq, count) of G over the global batch
    (:func:`jalign.losses.masked_moments`, all-reduced) makes the statistics global; default: this batch's.
    Normalise the whole rollout batch before splitting it into micro-batches. Returns [B, T], 0 under the mask.
    """
    r = token_rewards(score, mask, kl, beta_kl)
    returns, _ = gae(r, jnp.zeros_like(r), mask, gamma=gamma, lam=1.0)  # values 0, lam 1: G_t
    if moments is None:
        moments = masked_moments(returns, mask)
    mean, var = moments_to_mean_var(*moments, unbiased=True)
    return whiten_with_moments(returns, mask, mean, var, eps=eps)


def reinforce_pp_baseline_advantages(rewards, mask, *, moments=None, eps: float = 1e-8):
    """REINFORCE++-baseline: subtract the prompt group's mean reward, then normalise over the whole batch.

        A_{p,i} = R_{p,i} - mean_j R_{p,j}  (broadcast over the response tokens),  then
        A <- (A - mean(A)) / sqrt(var(A) + eps) over every valid token of the global batch

    Hu 2025, "REINFORCE++", Sec. 3 (the group-baseline variant for several samples per prompt; OpenRLHF
    ``reinforce_baseline``). ``rewards`` [P, K] (rows of the token arrays are the P*K samples in order),
    ``mask`` [P*K, T]. The KL to the reference goes into the loss (e.g. ``grpo_loss``'s k3 term).
    ``moments`` as in :func:`reinforce_pp_advantages`. Returns [P*K, T].
    """
    (r,) = _f32(rewards)
    centred = (r - jnp.mean(r, axis=-1, keepdims=True)).reshape(-1)
    a = _per_token(centred, jnp.shape(mask))
    if moments is None:
        moments = masked_moments(a, mask)
    mean, var = moments_to_mean_var(*moments, unbiased=True)
    return whiten_with_moments(a, mask, mean, var, eps=eps)


def reinforce_pp_loss(logp, old_logp, advantages, mask, num_tokens: Optional[float] = None, *,
                      clip_eps: float = 0.2, max_log_ratio: float = _MAX_LOG_RATIO):
    """REINFORCE++ policy loss: PPO's clipped surrogate on the REINFORCE++ advantages, token mean.

        L = (1/N) sum_{b,t} m_{b,t} max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    Hu 2025, "REINFORCE++", Sec. 3 (it keeps PPO's token-level clipping; the difference from PPO is in the
    advantage, :func:`reinforce_pp_advantages`, with no critic). Schulman et al. 2017 eq. 7 for the surrogate.
    Metrics as :func:`dapo_policy_loss`.
    """
    return dapo_policy_loss(logp, old_logp, advantages, mask, num_tokens, clip_eps_low=clip_eps,
                            clip_eps_high=clip_eps, max_log_ratio=max_log_ratio)


# ----------------------------------------------------------------------------- rollout/trainer mismatch
def rollout_mismatch_metrics(old_logp, sampler_logp, mask, num_tokens: Optional[float] = None,
                             num_seqs: Optional[float] = None):
    """How far the sampler's log-probs are from the trainer's for the same sampled tokens.

        d_t = old_logp_t - sampler_logp_t      (trainer's pi_old vs the rollout engine's pi_sampler)

    Metrics: ``logprob_abs_diff_mean`` (token mean of |d|), ``logprob_abs_diff_max`` (a max: combine with max),
    ``mismatch_kl`` = token mean of -d, the k1 estimate of KL(pi_sampler || pi_old) on the sampler's tokens,
    ``mismatch_k3`` = token mean of exp(d) - 1 - d (non-negative estimate of the same KL),
    ``mismatch_seq_log_ratio`` = sequence mean of sum_t d_t; ``num_tokens``, ``num_seqs`` (local).
    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; Liu et al. 2025,
    "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch".
    """
    old, smp = _f32(old_logp, sampler_logp)
    m, n = _valid_and_count(mask, old.shape, num_tokens)
    d = jnp.clip(jnp.where(m > 0, old - smp, 0.0), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    v, ns = _seq_valid(m, None, num_seqs)
    return {
        "logprob_abs_diff_mean": safe_divide(_wsum(jnp.abs(d), m), n),
        "logprob_abs_diff_max": jnp.max(jnp.where(m > 0, jnp.abs(d), 0.0), initial=0.0),
        "mismatch_kl": safe_divide(_wsum(-d, m), n),
        "mismatch_k3": safe_divide(_wsum(jnp.expm1(d) - d, m), n),
        "mismatch_seq_log_ratio": safe_divide(_wsum(jnp.sum(d * m, axis=-1), v), ns),
        "num_tokens": jnp.sum(m),
        "num_seqs": jnp.sum(v),
    }


def token_tis_weights(old_logp, sampler_logp, mask, num_tokens: Optional[float] = None, *, cap: float = 2.0):
    """Token-level truncated importance sampling (TIS) weights for the rollout/trainer mismatch.

        w_t = stop_gradient(min(exp(old_logp_t - sampler_logp_t), C))

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (TIS, C = 2 by
    default); verl ``rollout_is: token``. Multiply the per-token policy loss by w (e.g. pass ``mask * w`` as
    the loss mask with ``num_tokens`` unchanged). Returns ``(w [B, T] (0 under the mask), metrics)``:
    ``is_weight_mean``, ``is_truncated_fraction`` (tokens with ratio > C), ``is_weight_max`` (before
    truncation; a max) and :func:`rollout_mismatch_metrics`.
    """
    old, smp = _f32(old_logp, sampler_logp)
    m, n = _valid_and_count(mask, old.shape, num_tokens)
    ratio = jnp.exp(jnp.clip(jnp.where(m > 0, old - smp, 0.0), -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    w = jax.lax.stop_gradient(jnp.where(m > 0, jnp.minimum(ratio, cap), 0.0))
    metrics = {
        "is_weight_mean": safe_divide(_wsum(w, m), n),
        "is_truncated_fraction": safe_divide(_wsum((ratio > cap).astype(jnp.float32), m), n),
        "is_weight_max": jnp.max(jnp.where(m > 0, ratio, 0.0), initial=0.0),
        **rollout_mismatch_metrics(old, smp, m, n),
    }
    return w, metrics


def _seq_is(old_logp, sampler_logp, mask, num_seqs):
    old, smp = _f32(old_logp, sampler_logp)
    m = jnp.ones(old.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    v, ns = _seq_valid(m, None, num_seqs)
    log_rho = jnp.sum(jnp.where(m > 0, old - smp, 0.0) * m, axis=-1)
    rho = jnp.exp(jnp.clip(log_rho, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return old, smp, m, v, ns, rho


def sequence_tis_weights(old_logp, sampler_logp, mask, num_seqs: Optional[float] = None, *, cap: float = 2.0):
    """Sequence-level truncated importance sampling weights.

        rho_i = prod_t pi_old(y_t) / pi_sampler(y_t) = exp(sum_t m_t (old_logp_t - sampler_logp_t)),
        w_i = stop_gradient(min(rho_i, C))

    Liu et al. 2025, "When Speed Kills Stability" (sequence-level IS: unbiased for sequence-level objectives;
    truncated for variance); verl ``rollout_is: sequence``. The log of rho is clamped to +-20 before exp.
    Returns ``(w [B], metrics)`` (0 for rows without a valid token): sequence means ``is_weight_mean``,
    ``is_truncated_fraction``; ``is_weight_max`` (before truncation; a max); ``num_seqs``. Broadcast w over
    the row's tokens to weight a token loss.
    """
    old, smp, m, v, ns, rho = _seq_is(old_logp, sampler_logp, mask, num_seqs)
    w = jax.lax.stop_gradient(jnp.where(v > 0, jnp.minimum(rho, cap), 0.0))
    return w, {
        "is_weight_mean": safe_divide(_wsum(w, v), ns),
        "is_truncated_fraction": safe_divide(_wsum((rho > cap).astype(jnp.float32), v), ns),
        "is_weight_max": jnp.max(jnp.where(v > 0, rho, 0.0), initial=0.0),
        "num_seqs": jnp.sum(v),
    }


def sequence_mis_weights(old_logp, sampler_logp, mask, num_seqs: Optional[float] = None, *, cap: float = 2.0,
                         lower: Optional[float] = None):
    """Sequence-level masked importance sampling (MIS): drop sequences whose ratio leaves the trust region.

        rho_i as in :func:`sequence_tis_weights`,   w_i = stop_gradient(rho_i * 1[lower <= rho_i <= C])

    Liu et al. 2025, "When Speed Kills Stability" (masked IS: rejecting, rather than truncating, the
    sequences with extreme ratios, which are mostly broken samples); verl ``rollout_rs`` / mask mode.
    ``lower`` defaults to 1 / C. Returns ``(w [B], metrics)``: ``is_weight_mean``, ``is_masked_fraction``
    (sequences dropped), ``is_weight_max`` (before masking; a max), ``num_seqs``.
    """
    lo = 1.0 / cap if lower is None else lower
    old, smp, m, v, ns, rho = _seq_is(old_logp, sampler_logp, mask, num_seqs)
    keep = (rho <= cap) & (rho >= lo) & (v > 0)
    w = jax.lax.stop_gradient(jnp.where(keep, rho, 0.0))
    return w, {
        "is_weight_mean": safe_divide(_wsum(w, v), ns),
        "is_masked_fraction": safe_divide(_wsum((~keep).astype(jnp.float32), v), ns),
        "is_weight_max": jnp.max(jnp.where(v > 0, rho, 0.0), initial=0.0),
        "num_seqs": jnp.sum(v),
    }
