"""Reward-model losses: Bradley-Terry pairwise (plain, margin, scaled) and multi-attribute regression.

Conventions shared by every function here:

* Inputs are per-pair (or per-sequence) arrays; ``valid`` ([B], 0/1, optional) marks real pairs; a
  pair with ``valid = 0`` contributes nothing to the loss, the metrics or the gradients.
* ``num_pairs`` is the number of valid pairs in the *global* optimizer batch (all micro-batches, all
  processes). It defaults to ``sum(valid)`` of the given batch. The loss is ``sum(...) / num_pairs``,
  so summing the losses of the micro-batches equals the big-batch loss.
* Metrics are contributions to a mean (already divided by the same global count), so the training step
  can *sum* them over micro-batches. ``num_pairs`` (the local count) is the one extensive metric.
* **Accuracy** is ``1[r_chosen > r_rejected]`` (strict): a tie counts as wrong (0), as in NeMo-Aligner
  and TRL. Two identical rewards therefore score 0 accuracy, not 0.5.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide


def _pair_metrics(loss, r_c, r_r, v, n):
    return {
        "loss": loss,
        "accuracy": safe_divide(_wsum((r_c > r_r).astype(jnp.float32), v), n),
        "reward_chosen_mean": safe_divide(_wsum(r_c, v), n),
        "reward_rejected_mean": safe_divide(_wsum(r_r, v), n),
        "margin_mean": safe_divide(_wsum(r_c - r_r, v), n),
        "num_pairs": jnp.sum(v),
    }


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def bt_loss(r_chosen, r_rejected, valid=None, num_pairs: Optional[float] = None):
    """Bradley-Terry pairwise reward-model loss.

        L = (1/N) sum_i v_i * -log sigmoid(r_c,i - r_r,i)

    Ouyang et al. 2022 (InstructGPT), eq. 1; Bradley & Terry 1952. N = ``num_pairs`` (global count of
    valid pairs). ``r_chosen``, ``r_rejected``: [B] scalar rewards. Computed with ``log_sigmoid``, stable
    for any |r_c - r_r|.

    Returns ``(loss, metrics)`` with metrics ``loss, accuracy, reward_chosen_mean, reward_rejected_mean,
    margin_mean`` (each a contribution to the mean over N) and ``num_pairs`` (local count).
    """
    r_c, r_r = _f32(r_chosen, r_rejected)
    v, n = _valid_and_count(valid, r_c.shape, num_pairs)
    per = -jax.nn.log_sigmoid(r_c - r_r)
    loss = safe_divide(_wsum(per, v), n)
    return loss, _pair_metrics(loss, r_c, r_r, v, n)


def bt_margin_loss(r_chosen, r_rejected, margin, valid=None, num_pairs: Optional[float] = None):
    """Bradley-Terry loss with a per-pair margin (Llama 2 reward models).

        L = (1/N) sum_i v_i * -log sigmoid(r_c,i - r_r,i - m_i)

    Touvron et al. 2023 (Llama 2), Sec. 3.2.2, eq. 2: m(r) is a discrete function of the annotated
    preference strength (larger for "significantly better"). ``margin``: [B] or a scalar.
    Metrics as in :func:`bt_loss`; accuracy and ``margin_mean`` use r_c - r_r (without m).
    """
    r_c, r_r, m = _f32(r_chosen, r_rejected, margin)
    v, n = _valid_and_count(valid, r_c.shape, num_pairs)
    per = -jax.nn.log_sigmoid(r_c - r_r - m)
    loss = safe_divide(_wsum(per, v), n)
    return loss, _pair_metrics(loss, r_c, r_r, v, n)


def bt_scaled_loss(r_chosen, r_rejected, scale, valid=None, num_pairs: Optional[float] = None):
    """Scaled Bradley-Terry loss (HelpSteer2-Preference).

        L = (1/N) sum_i v_i * s_i * -log sigmoid(r_c,i - r_r,i)

    Wang et al. 2024, "HelpSteer2-Preference: Complementing Ratings with Preferences" (arXiv:2410.01257),
    the "Scaled Bradley-Terry" loss: s_i is the annotated preference magnitude (e.g. 1..3).
    The divisor is N = number of valid pairs (not the sum of scales). ``scale``: [B] or a scalar.
    Metrics as in :func:`bt_loss`.
    """
    r_c, r_r, s = _f32(r_chosen, r_rejected, scale)
    v, n = _valid_and_count(valid, r_c.shape, num_pairs)
    per = -jnp.broadcast_to(s, r_c.shape) * jax.nn.log_sigmoid(r_c - r_r)
    loss = safe_divide(_wsum(per, v), n)
    return loss, _pair_metrics(loss, r_c, r_r, v, n)


def regression_loss(pred, target, attr_mask=None, num_values: Optional[float] = None,
                    num_values_per_attr=None):
    """Masked mean-squared error over (sequence, attribute): multi-attribute regression reward model.

        L = (1/N) sum_{b,a} m_{b,a} (pred_{b,a} - target_{b,a})^2

    SteerLM (Dong et al. 2023, Sec. 3.1, attribute prediction model) and HelpSteer2 (Wang et al. 2024,
    Sec. 4) regression reward models; NeMo-Aligner ``MegatronGPTRegressionRewardModel.loss_func``
    (there an attribute is masked out when its label is -100: pass ``attr_mask = target != -100``).
    ``pred``, ``target``, ``attr_mask``: [B, A]. N = ``num_values`` = number of valid (b, a) entries in the
    global batch (default: sum(attr_mask) here).

    Metrics: ``loss``, ``mae`` = (1/N) sum m |pred - target|, and per attribute a (A is static)
    ``mae_attr_{a}`` = (1/N_a) sum_b m_{b,a} |pred - target| with N_a = ``num_values_per_attr[a]``
    (global valid count of attribute a, default the local one); plus ``num_values`` (local count).
    """
    p, t = _f32(pred, target)
    m, n = _valid_and_count(attr_mask, p.shape, num_values)
    err = p - t
    loss = safe_divide(_wsum(err * err, m), n)
    abs_err = jnp.where(m > 0, jnp.abs(err), 0.0) * m
    metrics = {"loss": loss, "mae": safe_divide(jnp.sum(abs_err), n), "num_values": jnp.sum(m)}
    n_a = jnp.sum(m, axis=0) if num_values_per_attr is None else jnp.asarray(num_values_per_attr, jnp.float32)
    per_attr = safe_divide(jnp.sum(abs_err, axis=0), n_a)
    for a in range(p.shape[-1]):
        metrics[f"mae_attr_{a}"] = per_attr[a]
    return loss, metrics
