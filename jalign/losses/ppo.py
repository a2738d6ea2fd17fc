"""RL math for PPO / RLOO / REINFORCE / GRPO on token arrays.

Token arrays are [B, T] with a response mask ``mask`` (1 on response tokens whose log-prob/value is
trained, 0 on prompt and padding). Token-level losses divide by ``num_tokens`` = the number of valid
tokens in the *global* optimizer batch (default: sum(mask) here), so summing the losses and the metrics
of micro-batches gives the big-batch values. Metrics are contributions to a token mean (divided by the
same count), except ``num_tokens`` (local count). Positions with mask 0 never contribute, whatever
their values (log-ratios there are zeroed before ``exp``).

A mask may also carry weights: every loss computes sum(mask * per_token) / num_tokens, so e.g.
``mask / |o_i|`` with ``num_tokens = number of sequences`` gives the per-sequence-then-batch mean of the
original GRPO objective (DeepSeekMath eq. 3) instead of the global token mean.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 4.9e8: finite in f32 and bf16; log-ratios are clamped to +-this before exp


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _mask_out(x, mask):
    return x if mask is None else jnp.where(jnp.asarray(mask) > 0, x, 0.0)


def _per_token(a, shape):
    """Per-sequence [B] values broadcast to [B, T]; [B, T] passed through."""
    a = jnp.asarray(a, jnp.float32)
    return jnp.broadcast_to(a[:, None] if a.ndim == 1 else a, shape)


# ----------------------------------------------------------------------------- KL estimators
def kl_k1(logp, ref_logp, mask=None):
    """k1 = log pi(x) - log pi_ref(x), x ~ pi: unbiased estimator of KL(pi || pi_ref) (can be < 0).
    Schulman 2020, "Approximating KL Divergence". Zero where ``mask`` is 0 (if given)."""
    logp, ref_logp = _f32(logp, ref_logp)
    return _mask_out(logp - ref_logp, mask)


def kl_abs(logp, ref_logp, mask=None):
    """|log pi(x) - log pi_ref(x)| (a biased, non-negative penalty). Zero where ``mask`` is 0."""
    logp, ref_logp = _f32(logp, ref_logp)
    return _mask_out(jnp.abs(logp - ref_logp), mask)


def kl_k2(logp, ref_logp, mask=None):
    """k2 = 0.5 (log pi(x) - log pi_ref(x))^2, x ~ pi: low-variance, biased estimator of KL(pi || pi_ref).
    Schulman 2020, "Approximating KL Divergence". Zero where ``mask`` is 0."""
    logp, ref_logp = _f32(logp, ref_logp)
    return _mask_out(0.5 * jnp.square(logp - ref_logp), mask)


def kl_k3(logp, ref_logp, mask=None, max_log_ratio: float = _MAX_LOG_RATIO):
    """k3 = exp(d) - d - 1 with d = log pi_ref(x) - log pi(x), x ~ pi: unbiased, non-negative estimator
    of KL(pi || pi_ref). Schulman 2020, "Approximating KL Divergence"; DeepSeekMath (Shao et al. 2024)
    eq. 4. d is clamped to +-``max_log_ratio`` before exp (no overflow; zero gradient beyond).
    Computed as expm1(d) - d (accurate near d = 0). Zero where ``mask`` is 0."""
    logp, ref_logp = _f32(logp, ref_logp)
    d = ref_logp - logp
    if mask is not None:
        d = jnp.where(jnp.asarray(mask) > 0, d, 0.0)
    d = jnp.clip(d, -max_log_ratio, max_log_ratio)
    return jnp.expm1(d) - d


# ----------------------------------------------------------------------------- rewards, GAE, whitening
def token_rewards(score, mask, kl, beta_kl):
    """Per-token PPO reward: the sequence score on the last valid token, minus the KL penalty everywhere.

        r_{b,t} = m_{b,t} * ( R_b * 1[t = last valid token of row b] - beta_kl * kl_{b,t} )

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2 (R(x, y) =
    r(x, y) - beta log(pi / rho)); Ouyang et al. 2022, eq. 2. score [B], mask/kl [B, T]. A row with no
    valid token gets all zeros (its score is dropped). Returns [B, T] float32.
    """
    score, kl, m = _f32(score, kl, mask)
    T = m.shape[-1]
    idx = jnp.arange(T)
    last = jnp.max(jnp.where(m > 0, idx, -1), axis=-1)  # -1 for an empty row
    is_last = (idx[None, :] == last[:, None]).astype(jnp.float32)
    r = score[:, None] * is_last - beta_kl * kl
    return jnp.where(m > 0, r, 0.0)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation over the valid tokens of each row.

        delta_t = r_t + gamma V_{t'} - V_t,     A_t = delta_t + gamma lam A_{t'}

    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16 (delta_t is the TD residual
    of its Sec. 3), where t' is the next *valid* position after t. After the last valid token V = 0 and
    A = 0 (the episode ends with the response: bootstrap 0). Masked positions are skipped, i.e. the result
    equals GAE on the row with its masked positions removed; for right-padded rows that is the usual
    recursion with zero values/rewards on the padding. rewards/values/mask [B, T]. Returns
    ``(advantages, returns)`` [B, T], returns = A + V, both 0 where mask = 0. Computed with a reverse
    ``lax.scan`` over T. Gradients flow through ``values``: wrap in ``stop_gradient`` if unwanted.
    """
    r, v, m = _f32(rewards, values, mask)
    r = jnp.where(m > 0, r, 0.0)
    v = jnp.where(m > 0, v, 0.0)

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        valid = m_t > 0
        carry = (jnp.where(valid, v_t, next_v), jnp.where(valid, a_t, next_a))
        return carry, jnp.where(valid, a_t, 0.0)

    zeros = jnp.zeros(r.shape[:1], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(m > 0, adv + v, 0.0)


def masked_moments(x, mask, shift=0.0):
    """(sum, sum of squares, count) of ``x - shift`` over mask > 0, weighted by mask: the three numbers to
    all-reduce (``lax.psum``) across devices/processes/micro-batches before :func:`moments_to_mean_var`.

    ``shift`` (any value every shard agrees on, e.g. one of the samples) only moves the origin: the
    variance is unchanged, the mean comes out as ``mean - shift``. Around a value of the data the
    one-pass variance does not cancel catastrophically, and constant data give exactly 0."""
    x, m = _f32(x, mask)
    xm = jnp.where(m > 0, x - jnp.asarray(shift, jnp.float32), 0.0)
    return jnp.sum(xm * m), jnp.sum(xm * xm * m), jnp.sum(m)


def moments_to_mean_var(total, total_sq, count, unbiased: bool = True):
    """Mean and variance from (sum, sum of squares, count): var = (sumsq/n - mean^2), times n/(n-1) when
    ``unbiased`` (Bessel, as torch.var / TRL ``masked_var``). 0 when the count is too small."""
    mean = safe_divide(total, count)
    var = jnp.maximum(safe_divide(total_sq, count) - mean * mean, 0.0)
    if unbiased:
        var = jnp.where(count > 1, var * safe_divide(count, count - 1.0), 0.0)
    return mean, var


def whiten_with_moments(x, mask, mean, var, shift_mean: bool = True, eps: float = 1e-8, shift=0.0):
    """(x - shift - mean) / sqrt(var + eps), plus ``mean + shift`` back if not ``shift_mean``; 0 where
    mask = 0. ``mean``/``var`` as from :func:`moments_to_mean_var` of moments taken with the same ``shift``."""
    x, m = _f32(x, mask)
    shift = jnp.asarray(shift, jnp.float32)
    w = (x - shift - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        w = w + mean + shift
    return jnp.where(m > 0, w, 0.0)


def _first_valid(x, mask):
    """The first x with mask > 0 (0 if none): a shift all shards of a global array agree on."""
    x, m = _f32(x, mask)
    x, m = x.reshape(-1), m.reshape(-1)
    i = jnp.argmax(m > 0)
    return jnp.where(m[i] > 0, x[i], 0.0)


def whiten(x, mask, shift_mean: bool = True, moments=None, unbiased: bool = True, eps: float = 1e-8,
           shift=None):
    """Masked whitening (PPO advantage normalisation; TRL/Ziegler ``whiten``).

        mean = sum(m x) / sum(m),  var = sum(m (x - mean)^2) / (sum(m) - 1),
        out = m * [(x - mean) / sqrt(var + eps) (+ mean if not shift_mean)]

    The statistics are taken around ``shift`` (default: the first valid element), which changes
    nothing mathematically but keeps f32 exact for constant inputs (all outputs exactly 0; around 0
    the f32 mean of equal values is an ulp off, and ``1/sqrt(eps)`` = 1e4 would blow that up).
    ``moments`` = (sum, sumsq, count), e.g. :func:`masked_moments` all-reduced across processes, makes
    the statistics global; pass the ``shift`` they were taken with (default 0 then). Note a micro-batch
    split changes local statistics, so whiten the whole rollout batch (or pass global moments) before
    splitting.
    """
    if moments is None:
        shift = _first_valid(x, mask) if shift is None else shift
        moments = masked_moments(x, mask, shift)
    shift = 0.0 if shift is None else shift
    mean, var = moments_to_mean_var(*moments, unbiased=unbiased)
    return whiten_with_moments(x, mask, mean, var, shift_mean=shift_mean, eps=eps, shift=shift)


# ----------------------------------------------------------------------------- PPO losses
def _clipped_pg(logp, old_logp, adv, m, clip_eps, max_log_ratio):
    logr = jnp.where(m > 0, logp - old_logp, 0.0)
    logr = jnp.clip(logr, -max_log_ratio, max_log_ratio)
    ratio = jnp.exp(logr)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(pg1, pg2), (pg2 > pg1).astype(jnp.float32), ratio, logr


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, num_tokens: Optional[float] = None,
                    max_log_ratio: float = _MAX_LOG_RATIO):
    """PPO clipped surrogate, token mean.

        rho_t = exp(logp_t - old_logp_t)
        L = (1/N) sum_{b,t} m_{b,t} max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (negated to a loss).
    advantages: [B, T] (or [B], broadcast over tokens). N = ``num_tokens``. The log-ratio is clamped to
    +-``max_log_ratio`` before exp.

    Metrics (token means over N): ``policy_loss``, ``clip_fraction`` (tokens where the clipped term is
    strictly larger, i.e. the clip is active and the token has zero gradient), ``approx_kl`` = k3 estimate
    of KL(pi_old || pi) = rho - 1 - log rho (Schulman 2020; non-negative), ``ratio_mean``; ``num_tokens``.
    """
    logp, old_logp = _f32(logp, old_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = _per_token(advantages, logp.shape)
    per, clipped, ratio, logr = _clipped_pg(logp, old_logp, adv, m, clip_eps, max_log_ratio)
    loss = safe_divide(_wsum(per, m), n)
    metrics = {
        "policy_loss": loss,
        "clip_fraction": safe_divide(_wsum(clipped, m), n),
        "approx_kl": safe_divide(_wsum(ratio - 1.0 - logr, m), n),
        "ratio_mean": safe_divide(_wsum(ratio, m), n),
        "num_tokens": jnp.sum(m),
    }
    return loss, metrics


def entropy_bonus(entropy, mask, coef: float, num_tokens: Optional[float] = None):
    """Entropy bonus as a loss term: L = -coef (1/N) sum m_t H_t.

    Schulman et al. 2017, eq. 9 (the c2 S[pi](s_t) term). ``entropy`` [B, T] per-token entropies (e.g. from
    ``chunked_token_logps(..., return_entropy=True)``). Metrics: ``entropy`` (token mean), ``entropy_loss``.
    """
    (h,) = _f32(entropy)
    m, n = _valid_and_count(mask, h.shape, num_tokens)
    ent = safe_divide(_wsum(h, m), n)
    loss = -coef * ent
    return loss, {"entropy": ent, "entropy_loss": loss}


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2, num_tokens: Optional[float] = None):
    """Clipped value loss, token mean.

        V^clip_t = clip(V_t, V^old_t - c, V^old_t + c)
        L = (1/N) sum m_t 0.5 max((V_t - G_t)^2, (V^clip_t - G_t)^2)

    Schulman et al. 2017 (baselines PPO2 value clipping; the paper's eq. 9 L^VF term, c1 left to the
    caller); as in Ziegler et al. 2019 / TRL. Metrics: ``value_loss``, ``value_clip_fraction`` (tokens
    where the clipped term is strictly larger), ``value_mean``, ``return_mean``; ``num_tokens``.
    """
    v, v_old, g = _f32(values, old_values, returns)
    m, n = _valid_and_count(mask, v.shape, num_tokens)
    v_clip = jnp.clip(v, v_old - clip, v_old + clip)
    l1, l2 = jnp.square(v - g), jnp.square(v_clip - g)
    loss = safe_divide(_wsum(0.5 * jnp.maximum(l1, l2), m), n)
    metrics = {
        "value_loss": loss,
        "value_clip_fraction": safe_divide(_wsum((l2 > l1).astype(jnp.float32), m), n),
        "value_mean": safe_divide(_wsum(v, m), n),
        "return_mean": safe_divide(_wsum(g, m), n),
        "num_tokens": jnp.sum(m),
    }
    return loss, metrics


def explained_variance(values, returns, mask):
    """1 - Var[G - V] / Var[G] over mask > 0 (biased variances); 0 if Var[G] = 0.

    A diagnostic, not additive over micro-batches: compute it on the whole rollout batch (local to the
    process). Returns a scalar.
    """
    v, g = _f32(values, returns)
    _, var_g = moments_to_mean_var(*masked_moments(g, mask), unbiased=False)
    _, var_r = moments_to_mean_var(*masked_moments(g - v, mask), unbiased=False)
    return jnp.where(var_g > 0, 1.0 - var_r / jnp.where(var_g > 0, var_g, 1.0), 0.0)


# ----------------------------------------------------------------------------- RLOO / REINFORCE / GRPO
def rloo_advantages(rewards):
    """REINFORCE leave-one-out advantages, per group of K samples of one prompt.

        A_{p,i} = R_{p,i} - (1/(K-1)) sum_{j != i} R_{p,j}  =  K/(K-1) (R_{p,i} - mean_j R_{p,j})

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", eq. 5/6 (RLOO; after Kool et al. 2019). rewards [P, K] with K >= 2. Returns [P, K].
    """
    (r,) = _f32(rewards)
    K = r.shape[-1]
    if K < 2:
        raise ValueError(f"rloo_advantages needs K >= 2 samples per prompt, got K={K}")
    d = r - r[..., :1]  # the baseline is shift-invariant; around a group member equal rewards give exactly 0
    return d - (jnp.sum(d, axis=-1, keepdims=True) - d) / (K - 1)


def reinforce_loss(logp, advantages, mask, num_tokens: Optional[float] = None):
    """REINFORCE (policy-gradient) loss with a given advantage, token mean.

        L = -(1/N) sum_{b,t} m_{b,t} A_b logp_{b,t}

    Williams 1992; used with RLOO advantages in Ahmadian et al. 2024 (eq. 5/6). ``advantages`` [B] per
    sequence (or [B, T]), treated as constants (``stop_gradient``). N = ``num_tokens``; passing
    ``num_tokens`` = the global number of sequences gives the paper's sequence form
    -(1/B) sum_b A_b log pi(y_b | x_b). Metrics: ``policy_loss``, ``advantage_mean`` (token mean),
    ``num_tokens``.
    """
    (lp,) = _f32(logp)
    m, n = _valid_and_count(mask, lp.shape, num_tokens)
    adv = jax.lax.stop_gradient(_per_token(advantages, lp.shape))
    loss = -safe_divide(_wsum(adv * lp, m), n)
    return loss, {"policy_loss": loss, "advantage_mean": safe_divide(_wsum(adv, m), n), "num_tokens": jnp.sum(m)}


def grpo_advantages(rewards, eps: float = 1e-6, scale: bool = True, unbiased: bool = True):
    """GRPO group-normalised outcome advantages.

        A_{p,i} = (R_{p,i} - mean_j R_{p,j}) / (std_j R_{p,j} + eps)     (``scale=True``)
        A_{p,i} =  R_{p,i} - mean_j R_{p,j}                              (``scale=False``, Dr. GRPO)

    Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2 (outcome supervision, the advantage used in eq. 3);
    ``scale=False``: Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO). std is the sample
    std (Bessel, ``unbiased=True``, as torch.std in TRL/verl) or the population std. rewards [P, K];
    a group with identical rewards gets exactly 0 (all correct or all wrong: common in GRPO). Returns [P, K].

    The mean is taken around the group's first reward (mathematically the same): in f32 the mean of
    K equal values is not always that value (5.3 x 8 gives an ulp less), and dividing such an ulp by
    ``std + eps`` ~ 1e-6 would give every sample an advantage of ~0.3.
    """
    (r,) = _f32(rewards)
    K = r.shape[-1]
    d = r - r[..., :1]
    mean = jnp.mean(d, axis=-1, keepdims=True)
    centered = d - mean
    if not scale:
        return centered
    dof = K - 1 if unbiased else K
    std = jnp.sqrt(jnp.sum(centered * centered, axis=-1, keepdims=True) / dof) if dof > 0 else jnp.zeros_like(mean)
    return centered / (std + eps)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float = 0.2, beta_kl: float = 0.04,
              num_tokens: Optional[float] = None, max_log_ratio: float = _MAX_LOG_RATIO):
    """GRPO loss: PPO clipped surrogate with group advantages plus a k3 KL penalty to the reference.

        rho_t = exp(logp_t - old_logp_t)
        L = (1/N) sum_{b,t} m_{b,t} [ max(-A_b rho_t, -A_b clip(rho_t, 1-eps, 1+eps))
                                       + beta_kl * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1) ]

    Shao et al. 2024, "DeepSeekMath", eq. 3 (objective, negated) and eq. 4 (k3 KL estimator). The paper
    averages per sequence then over the group; with N = global token count this is the token-level mean
    (DAPO, Yu et al. 2025, Sec. 3.3 "token-level policy gradient loss"); see the module docstring for the per-sequence form via mask weights.
    advantages [B] (e.g. :func:`grpo_advantages` flattened) or [B, T].

    Metrics: ``loss``, ``policy_loss``, ``kl`` (token-mean k3 to the reference), ``clip_fraction``,
    ``approx_kl`` (k3 of KL(pi_old || pi)), ``ratio_mean``; ``num_tokens``.
    """
    logp, old_logp, ref_logp = _f32(logp, old_logp, ref_logp)
    m, n = _valid_and_count(mask, logp.shape, num_tokens)
    adv = _per_token(advantages, logp.shape)
    pg, clipped, ratio, logr = _clipped_pg(logp, old_logp, adv, m, clip_eps, max_log_ratio)
    kl = kl_k3(logp, ref_logp, m, max_log_ratio)
    pg_loss = safe_divide(_wsum(pg, m), n)
    kl_mean = safe_divide(_wsum(kl, m), n)
    loss = pg_loss + beta_kl * kl_mean
    metrics = {
        "loss": loss,
        "policy_loss": pg_loss,
        "kl": kl_mean,
        "clip_fraction": safe_divide(_wsum(clipped, m), n),
        "approx_kl": safe_divide(_wsum(ratio - 1.0 - logr, m), n),
        "ratio_mean": safe_divide(_wsum(ratio, m), n),
        "num_tokens": jnp.sum(m),
    }
    return loss, metrics


def adaptive_kl_coef(current, kl, target: float, horizon: float, n_steps: float):
    """Adaptive KL coefficient (proportional controller).

        e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2 (K_beta =
    n_steps / horizon, as in their code and TRL's ``AdaptiveKLController``). ``kl`` is the measured
    mean KL per sequence of the last batch, ``n_steps`` the number of samples (or steps) it covers.
    Pure and jittable; returns a float32 scalar array (``float()`` it on the host).
    """
    err = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(current, jnp.float32) * (1.0 + err * n_steps / horizon)
