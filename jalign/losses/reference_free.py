"""Reference-free preference losses: ORPO, SimPO, CPO (no reference model is needed at all).

Inputs are per-sequence policy log-probabilities of the chosen and rejected responses: *length-averaged*
means for ORPO and SimPO (``sequence_logps(..., average=True)``; the argument names say so), sums for CPO.
ORPO and CPO add a token-level NLL on the chosen response, which has its own global divisor ``num_tokens``
(valid chosen tokens in the optimizer batch), next to ``num_pairs``; both terms are micro-batch additive.
Other conventions (``valid``, zeroed padding, metric names and meaning) as in :mod:`jalign.losses.dpo`, with
``rewards_*`` the method's own implicit rewards.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide
from jalign.losses.sft import sft_loss


def _pair(x_c, x_r, valid, num_pairs):
    x_c, x_r = (jnp.asarray(x, jnp.float32) for x in (x_c, x_r))
    v, n = _valid_and_count(valid, x_c.shape, num_pairs)
    return jnp.where(v > 0, x_c, 0.0), jnp.where(v > 0, x_r, 0.0), v, n


def _metrics(loss, pref_loss, r_c, r_r, v, n):
    return {
        "loss": loss,
        "preference_loss": pref_loss,
        "accuracy": safe_divide(_wsum((r_c > r_r).astype(jnp.float32), v), n),
        "rewards_chosen_mean": safe_divide(_wsum(r_c, v), n),
        "rewards_rejected_mean": safe_divide(_wsum(r_r, v), n),
        "margin_mean": safe_divide(_wsum(r_c - r_r, v), n),
        "num_pairs": jnp.sum(v),
    }


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012); x is clamped to
    <= -1e-6 so that a sequence of probability ~1 gives a large finite log-odds instead of inf."""
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(avg_logp_chosen, avg_logp_rejected, chosen_token_logps, chosen_mask, valid=None,
              num_pairs: Optional[float] = None, num_tokens: Optional[float] = None, *, lam: float):
    """Odds Ratio Preference Optimization: NLL on the chosen response plus an odds-ratio term.

        log odds(y|x) = log P(y|x) - log(1 - P(y|x)),   P(y|x) = exp(mean_t log pi(y_t | x, y_<t))
        L_OR  = (1/N) sum_i v_i -log sigmoid(log odds(y_c,i) - log odds(y_r,i))
        L     = L_SFT + lam L_OR,   L_SFT = -(1/M) sum_{b,t} m_{b,t} log pi(y^c_{b,t})

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 6-8 (P is the
    length-normalised likelihood; TRL ``ORPOTrainer``, whose ``beta`` is lam). N = ``num_pairs``,
    M = ``num_tokens`` (valid chosen tokens of the global batch). ``avg_logp_*`` [B] length-averaged
    log-probs (< 0); ``chosen_token_logps``, ``chosen_mask`` [B, T].

    Metrics: ``loss``, ``preference_loss`` (lam L_OR), ``nll_loss``, ``log_odds_ratio`` (mean),
    ``accuracy`` (log odds ratio > 0), ``rewards_*`` = lam * avg log-probs (TRL's), ``num_pairs``,
    ``num_tokens``.
    """
    lc, lr, v, n = _pair(avg_logp_chosen, avg_logp_rejected, valid, num_pairs)
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    pref = lam * safe_divide(_wsum(-jax.nn.log_sigmoid(log_odds), v), n)
    nll, nll_m = sft_loss(chosen_token_logps, jnp.asarray(chosen_mask), num_tokens=num_tokens)
    loss = nll + pref
    metrics = _metrics(loss, pref, lam * lc, lam * lr, v, n)
    metrics.update(nll_loss=nll, log_odds_ratio=safe_divide(_wsum(log_odds, v), n),
                   accuracy=safe_divide(_wsum((log_odds > 0).astype(jnp.float32), v), n),
                   num_tokens=nll_m["num_tokens"])
    return loss, metrics


def simpo_loss(avg_logp_chosen, avg_logp_rejected, valid=None, num_pairs: Optional[float] = None, *, beta: float,
               gamma: float, label_smoothing: float = 0.0):
    """Simple Preference Optimization: length-normalised implicit reward with a target margin, no reference.

        r(y) = (beta / |y|) log pi(y|x)     (= beta * the length-averaged log-prob)
        L = (1/N) sum_i v_i [ -(1 - eps) log sigmoid(r_c - r_r - gamma) - eps log sigmoid(-(r_c - r_r - gamma)) ]

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6 (eps = 0;
    label smoothing as in TRL's CPO/SimPO). gamma is the target reward margin in reward units (TRL's
    ``simpo_gamma``; its ``gamma_beta_ratio`` is gamma / beta). Metrics: ``rewards_*`` = r.
    """
    lc, lr, v, n = _pair(avg_logp_chosen, avg_logp_rejected, valid, num_pairs)
    r_c, r_r = beta * lc, beta * lr
    z = r_c - r_r - gamma
    eps = label_smoothing
    per = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    loss = safe_divide(_wsum(per, v), n)
    return loss, _metrics(loss, loss, r_c, r_r, v, n)


def cpo_loss(logp_chosen, logp_rejected, chosen_token_logps, chosen_mask, valid=None,
             num_pairs: Optional[float] = None, num_tokens: Optional[float] = None, *, beta: float,
             nll_weight: float = 1.0, label_smoothing: float = 0.0):
    """Contrastive Preference Optimization: a reference-free DPO term plus behaviour cloning (NLL).

        L_prefer = (1/N) sum_i v_i -log sigmoid(beta log pi(y_c,i|x) - beta log pi(y_r,i|x))
        L        = L_prefer + nll_weight * L_NLL,     L_NLL = -(1/M) sum_{b,t} m_{b,t} log pi(y^c_{b,t})

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation", Sec. 3 (L_CPO = L_prefer + L_NLL, the NLL being the behaviour-cloning regulariser; TRL
    ``CPOTrainer`` with ``cpo_alpha`` = nll_weight; optional label smoothing eps as cDPO). ``logp_*`` [B] are
    log-prob *sums*; N = ``num_pairs``, M = ``num_tokens``. Metrics: ``rewards_*`` = beta log pi(y|x),
    ``nll_loss``, ``preference_loss``, ``num_tokens``.
    """
    lc, lr, v, n = _pair(logp_chosen, logp_rejected, valid, num_pairs)
    z = beta * (lc - lr)
    eps = label_smoothing
    pref = safe_divide(_wsum(-(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z), v), n)
    nll, nll_m = sft_loss(chosen_token_logps, jnp.asarray(chosen_mask), num_tokens=num_tokens)
    loss = pref + nll_weight * nll
    metrics = _metrics(loss, pref, beta * lc, beta * lr, v, n)
    metrics.update(nll_loss=nll, num_tokens=nll_m["num_tokens"])
    return loss, metrics
