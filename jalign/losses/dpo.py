"""Direct preference losses: DPO (and cDPO), IPO, RPO (squared, forward-KL, backward-KL), SFT term.

Inputs of every preference loss are per-sequence log-probabilities of the chosen and rejected response
under the policy and the frozen reference, ``pi_c, pi_r, ref_c, ref_r`` [B], either sums over response
tokens or length-averaged means (``sequence_logps(..., average=True)``): that choice is the caller's.
Define

    delta = (pi_c - ref_c) - (pi_r - ref_r)            (the implicit reward margin, without beta)

Conventions (same as :mod:`jalign.losses.reward`):

* ``valid`` [B] 0/1 marks real pairs; an invalid pair contributes nothing (loss, metrics, gradients).
* ``num_pairs`` = number of valid pairs in the *global* optimizer batch (default: sum(valid) here); loss
  and metrics are ``sum(...) / num_pairs``, so summing them over micro-batches gives the big-batch value.
* Metrics (NeMo-Aligner names): ``loss``, ``preference_loss`` (same value here; the algorithm adds the
  SFT term), ``accuracy`` = mean 1[delta > 0] (strict: a tie, e.g. policy == reference, counts 0),
  ``rewards_chosen_mean`` = mean beta*(pi_c - ref_c), ``rewards_rejected_mean`` = mean beta*(pi_r - ref_r),
  ``margin_mean`` = mean beta*delta; and ``num_pairs`` (local count, extensive).
* Hyper-parameters are keyword-only.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide
from jalign.losses.sft import sft_loss


def _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs):
    pi_c, pi_r, ref_c, ref_r = (jnp.asarray(x, jnp.float32) for x in (pi_c, pi_r, ref_c, ref_r))
    v, n = _valid_and_count(valid, pi_c.shape, num_pairs)
    # zero padded pairs before any arithmetic so garbage (e.g. -inf) there cannot leak
    rc = jnp.where(v > 0, pi_c - ref_c, 0.0)
    rr = jnp.where(v > 0, pi_r - ref_r, 0.0)
    return rc, rr, rc - rr, v, n


def _finish(per_pair, rc, rr, delta, v, n, beta):
    loss = safe_divide(_wsum(per_pair, v), n)
    metrics = {
        "loss": loss,
        "preference_loss": loss,
        "accuracy": safe_divide(_wsum((delta > 0).astype(jnp.float32), v), n),
        "rewards_chosen_mean": safe_divide(_wsum(beta * rc, v), n),
        "rewards_rejected_mean": safe_divide(_wsum(beta * rr, v), n),
        "margin_mean": safe_divide(_wsum(beta * delta, v), n),
        "num_pairs": jnp.sum(v),
    }
    return loss, metrics


def _target_margin(reward_chosen, reward_rejected, eta, shape):
    """delta* = eta * (R_c - R_r), with R_c = 1, R_r = 0 where not given."""
    r_c = jnp.ones(shape, jnp.float32) if reward_chosen is None else jnp.asarray(reward_chosen, jnp.float32)
    r_r = jnp.zeros(shape, jnp.float32) if reward_rejected is None else jnp.asarray(reward_rejected, jnp.float32)
    return eta * jnp.broadcast_to(r_c - r_r, shape)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
             label_smoothing: float = 0.0):
    """Direct Preference Optimization, with optional conservative label smoothing (cDPO).

        L = (1/N) sum_i v_i * [ -(1 - eps) log sigmoid(beta delta_i) - eps log sigmoid(-beta delta_i) ]

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7 (eps = 0); cDPO: Mitchell 2023, "A note
    on DPO with noisy preferences and relationship to IPO" (eps = probability that a label is flipped).
    Policy == reference (delta = 0) gives exactly log 2. Stable for any |beta delta| (log_sigmoid).
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    z = beta * delta
    eps = label_smoothing
    per = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    return _finish(per, rc, rr, delta, v, n, beta)


def ipo_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float):
    """Identity Preference Optimization.

        L = (1/N) sum_i v_i * (delta_i - 1 / (2 beta))^2

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17 (tau = beta); as in NeMo-Aligner ``preference_loss: ipo``. Policy == reference gives
    1 / (4 beta^2). The paper's h is a difference of *sequence* log-likelihood ratios (sums); some
    implementations use length-averaged log-probs instead: pass means (``sequence_logps(average=True)``)
    to get that, sums otherwise. The regression target 1/(2 beta) is on the same scale either way.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    per = jnp.square(delta - 1.0 / (2.0 * beta))
    return _finish(per, rc, rr, delta, v, n, beta)


def rpo_sq_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
                eta: float = 1.0, reward_chosen=None, reward_rejected=None):
    """Reward-aware Preference Optimization with squared distance.

        L = (1/N) sum_i v_i * (beta delta_i - delta*_i)^2,     delta*_i = eta (R_c,i - R_r,i)

    RPO: Nvidia 2024, "Nemotron-4 340B Technical Report", Sec. 3.4.2 (the RPO objective
    D[beta delta || eta (r*(x, y_c) - r*(x, y_l))]), here with the squared distance D(a||b) = (a - b)^2 of
    NeMo-Aligner ``preference_loss: rpo_sq`` (eta = ``gt_reward_scale``). ``reward_chosen``,
    ``reward_rejected`` [B] are the ground-truth rewards R; when None they default to R_c = 1, R_r = 0.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    target = _target_margin(reward_chosen, reward_rejected, eta, delta.shape)
    per = jnp.square(beta * delta - target)
    return _finish(per, rc, rr, delta, v, n, beta)


def _bernoulli_kl(logit_p, logit_q):
    """KL(Bern(sigmoid(logit_p)) || Bern(sigmoid(logit_q))) from log_sigmoid, stable for large logits."""
    lp1, lp0 = jax.nn.log_sigmoid(logit_p), jax.nn.log_sigmoid(-logit_p)
    lq1, lq0 = jax.nn.log_sigmoid(logit_q), jax.nn.log_sigmoid(-logit_q)
    return jnp.exp(lp1) * (lp1 - lq1) + jnp.exp(lp0) * (lp0 - lq0)


def rpo_fwd_kl_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
                    eta: float = 1.0, reward_chosen=None, reward_rejected=None):
    """RPO with the "forward" Bernoulli KL, named and oriented as in NeMo-Aligner (``rpo_fwd_kl``):

        L = (1/N) sum_i v_i * KL( Bern(sigmoid(beta delta_i)) || Bern(sigmoid(delta*_i)) )
          = (1/N) sum_i v_i * [ q log(q / p) + (1 - q) log((1 - q) / (1 - p)) ],
        q = sigmoid(beta delta_i) (model),  p = sigmoid(delta*_i) (target),  delta*_i = eta (R_c,i - R_r,i)

    i.e. KL(p_model || p_target). NOTE the direction: NeMo-Aligner's ``rpo_fwd_kl`` puts the *model*
    first (``exp(logbeta_hat) * (logbeta_hat - logalpha_hat)``); we keep its naming so configs port
    unchanged. The Nemotron-4 340B report's D (Sec. 3.4.2) is the other one, :func:`rpo_bwd_kl_loss`.
    R_c = 1, R_r = 0 when rewards are None. Computed from log_sigmoid: finite for any |beta delta|.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    target = _target_margin(reward_chosen, reward_rejected, eta, delta.shape)
    per = _bernoulli_kl(beta * delta, target)
    return _finish(per, rc, rr, delta, v, n, beta)


def rpo_bwd_kl_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
                    eta: float = 1.0, reward_chosen=None, reward_rejected=None):
    """RPO with the "backward" Bernoulli KL, named and oriented as in NeMo-Aligner (``rpo_bwd_kl``):

        L = (1/N) sum_i v_i * KL( Bern(sigmoid(delta*_i)) || Bern(sigmoid(beta delta_i)) )
          = (1/N) sum_i v_i * [ p log(p / q) + (1 - p) log((1 - p) / (1 - q)) ],
        q = sigmoid(beta delta_i) (model),  p = sigmoid(delta*_i) (target),  delta*_i = eta (R_c,i - R_r,i)

    i.e. KL(p_target || p_model): the distance D(a || b) = sigma(b) log(sigma(b)/sigma(a)) +
    (1 - sigma(b)) log((1 - sigma(b))/(1 - sigma(a))) of Nvidia 2024, "Nemotron-4 340B Technical Report",
    Sec. 3.4.2 (RPO). Up to a constant in the model it is cross-entropy with soft labels p, so with
    eta -> inf (p -> 1) it tends to DPO. R_c = 1, R_r = 0 when rewards are None.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    target = _target_margin(reward_chosen, reward_rejected, eta, delta.shape)
    per = _bernoulli_kl(target, beta * delta)
    return _finish(per, rc, rr, delta, v, n, beta)


def dpo_sft_term(chosen_token_logps, chosen_mask, num_tokens: Optional[float] = None):
    """Token-level NLL on the chosen response, added to a preference loss (DPO + NLL, RPO + SFT).

        L = -(1/N) sum_{b,t} m_{b,t} log pi(y^c_{b,t} | ...)

    Pang et al. 2024, "Iterative Reasoning Preference Optimization" (the NLL term of L_DPO+NLL); Nemotron-4 340B
    report Sec. 3.4.2 (SFT loss mixed into DPO/RPO). N = ``num_tokens`` = valid chosen tokens in the global
    batch. A thin wrapper of :func:`jalign.losses.sft_loss`; metrics ``loss``, ``num_tokens``.
    Scale by the SFT weight in the algorithm.
    """
    return sft_loss(chosen_token_logps, chosen_mask, num_tokens=num_tokens)


def dpo_sft_seq_term(chosen_logps, valid=None, num_pairs: Optional[float] = None):
    """Sequence-level NLL on the chosen response, NeMo-Aligner's DPO ``sft_loss`` form.

        L = -(1/N) sum_i v_i * logp_c,i

    where logp_c is the per-sequence chosen log-prob (sum, or mean with ``sft_average_log_probs``) and
    N = ``num_pairs`` (global valid pairs). Metrics: ``loss``, ``num_pairs`` (local).
    """
    lp = jnp.asarray(chosen_logps, jnp.float32)
    v, n = _valid_and_count(valid, lp.shape, num_pairs)
    loss = -safe_divide(_wsum(lp, v), n)
    return loss, {"loss": loss, "num_pairs": jnp.sum(v)}
