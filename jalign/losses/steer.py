"""SteerLM 2.0: attribute-conditioned policy optimisation by self-normalised importance weights.

Wang et al. 2024, "HelpSteer2: Open-source dataset for training top-performing reward models" (arXiv
2406.08673), Sec. "SteerLM 2.0"; NeMo-Aligner's ``GPTSteerLMModel`` (``compute_baselilne_weights``,
``weight_loss_func``) and ``SteerLM2Dataset`` (the weights ``ws``). The policy Q_theta(y | a, x) is trained
to match the attribute-conditioned optimum

    P(y | a, x)  proportional to  P(a | x, y) P(y | x)

(an attribute model times an unconditioned response model) by minimising KL(P(.|a,x) || Q_theta(.|a,x)) with
n samples y_1..y_n per (prompt, target attributes) drawn from a proposal Q'(y | a, x) (the starting SteerLM
model, or the round's iterate). The gradient estimate is

    grad L  ~=  - sum_i (w'_i - b'_i) grad log Q_theta(y_i | a, x)

    w'_i = softmax_i( log P(a | x, y_i) + log P(y_i | x) - log Q'(y_i | a, x) )      (targets P(y | a, x))
    b'_i = softmax_i( log Q_theta(y_i | a, x) - log Q'(y_i | a, x) )                 (the baseline: targets
                                                                                       Q_theta itself, so
                                                                                       sum_i b'_i grad log Q_theta
                                                                                       estimates E_Q[grad log Q] = 0)

both self-normalised over the group's samples and held constant (b' is computed with the current policy and no
gradient, as NeMo-Aligner's forward-only pass). Each sample's log-likelihood is a sum over its tokens, divided
(as NeMo-Aligner does) by the mean response length of its group, and the loss is a mean over groups.

The attribute likelihood: NeMo-Aligner reads log P(a | x, y) from its data files and does not say how it is
made; :func:`gaussian_attribute_logps` gives the one a regression reward model implies (trained with squared
error = maximum likelihood of a Gaussian with fixed variance around its prediction).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses.ops import safe_divide


def gaussian_attribute_logps(predicted, target, target_mask, sigma: float = 1.0):
    """log P(a | x, y) up to a constant, the attributes independent Gaussians around a regression model's values.

        log P(a | x, y) = - sum_k m_k (a_k - r_k(x, y))^2 / (2 sigma^2)          (+ a constant in y)

    ``predicted`` r [..., A] (the reward model's outputs), ``target`` a [..., A], ``target_mask`` m [..., A]
    (1 for the attributes the target sets; an attribute left out constrains nothing). The dropped constant
    (-sum_k m_k log(sigma sqrt(2 pi))) is the same for every sample of a prompt, so the self-normalised weights
    of :func:`steerlm2_weights` do not see it. ``sigma`` is the assumed spread of the attributes around the
    prediction: smaller sharpens the target distribution (a temperature)."""
    d = (target.astype(jnp.float32) - predicted.astype(jnp.float32)) * target_mask
    return -jnp.sum(d * d, axis=-1) / (2.0 * sigma * sigma)


def _masked_softmax(logits, valid):
    """softmax over the last axis among ``valid`` entries (0 elsewhere; an all-invalid group is all 0)."""
    z = jnp.where(valid > 0, logits.astype(jnp.float32), -jnp.inf)
    top = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(valid > 0, jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    return safe_divide(e, jnp.sum(e, axis=-1, keepdims=True))


def steerlm2_weights(attribute_logps, prior_logps, proposal_logps, policy_logps, valid):
    """The importance weights w' and the baseline b' of each group's samples (HelpSteer2, SteerLM 2.0).

        w'_i = softmax_i( log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x) )
        b'_i = softmax_i( log Q_theta(y_i|a,x) - log Q'(y_i|a,x) )

    Every input is [G, n] (G groups = (prompt, target) pairs, n samples each; sequence log-probs summed over
    the response tokens); the softmax runs over the group's ``valid`` samples only (others get 0, a group
    without any gets all 0). Returns ``(w, b, metrics)`` with w, b [G, n] (no gradient flows through them)
    and, averaged over the groups with a valid sample: ``ess`` (1 / sum_i w_i^2, the weights' effective sample
    size, 1..n), ``ess_fraction`` (ess / valid samples) and ``baseline_distance`` (KL(w' || b'), NeMo-Aligner's
    ``distance``, with its 1e-8 guards)."""
    valid = valid.astype(jnp.float32)
    log_w = attribute_logps + prior_logps - proposal_logps
    log_b = policy_logps - proposal_logps
    w = jax.lax.stop_gradient(_masked_softmax(log_w, valid))
    b = jax.lax.stop_gradient(_masked_softmax(log_b, valid))
    n_valid = jnp.sum(valid, axis=-1)
    has = (n_valid > 0).astype(jnp.float32)
    groups = jnp.sum(has)
    ess = safe_divide(has, jnp.sum(w * w, axis=-1))
    eps = 1e-8
    distance = jnp.sum(jnp.where(valid > 0, (w + eps) * jnp.log((w + eps) / (b + eps)), 0.0), axis=-1)
    metrics = {"ess": safe_divide(jnp.sum(ess), groups),
               "ess_fraction": safe_divide(jnp.sum(safe_divide(ess, n_valid)), groups),
               "baseline_distance": safe_divide(jnp.sum(distance * has), groups)}
    return w, b, metrics


def group_mean_length(mask, valid):
    """[G, n, T] response masks and [G, n] valid -> [G, n]: the mean response length (tokens) of the valid
    samples of each sample's group (NeMo-Aligner's ``avg_num_valid_tokens_in_ub``), 0 where none is valid."""
    lengths = jnp.sum(mask, axis=-1)
    mean = safe_divide(jnp.sum(lengths * valid, axis=-1), jnp.sum(valid, axis=-1))
    return jnp.broadcast_to(mean[..., None], valid.shape)


def steerlm2_loss(token_logps, mask, w, b, group_length, num_groups):
    """SteerLM 2.0's weighted log-likelihood over rows (any split of the groups into rows and micro-batches).

        L = - (1 / G) sum_r (w'_r - b'_r) * sum_t m_rt log Q_theta(y_rt | y_r<t, a, x) / Lbar_r

    ``token_logps`` [R, T] (the trained policy's log-probs at temperature 1), ``mask`` [R, T] (1 on the
    response tokens), ``w``, ``b`` [R] (each row's weights from :func:`steerlm2_weights`), ``group_length`` [R]
    (Lbar: the mean response length of the row's group, :func:`group_mean_length`), ``num_groups`` G: the
    *global* number of groups of the step (pass it so micro-batches add up to the whole batch's loss). Its
    gradient is HelpSteer2's estimate ``- sum_i (w'_i - b'_i) grad log Q_theta(y_i)`` per group, length-scaled
    and averaged. Returns ``(loss, {"loss"})``."""
    coef = jax.lax.stop_gradient(safe_divide(w - b, group_length))
    seq = jnp.sum(jnp.where(mask > 0, token_logps, 0.0) * mask, axis=-1)
    loss = -safe_divide(jnp.sum(coef * seq), num_groups)
    return loss, {"loss": loss}
