"""More reference-based preference losses: KTO (unpaired), SLiC, robust DPO, APO, SPPO, NCA, BCO, SPIN.

Conventions are those of :mod:`jalign.losses.dpo`: inputs are per-sequence log-probabilities (sums over the
response tokens, or means: the caller's choice) of the policy and the frozen reference, ``valid`` [B] marks
real items, the divisor ``num_pairs`` / ``num_seqs`` is the *global* count of valid items (default: this
batch's), padded items are zeroed before any arithmetic, metrics are contributions to a mean over that same
count (summed over micro-batches), the local count is the one extensive metric, and hyper-parameters are
keyword-only. For a pair, ``a = pi_c - ref_c``, ``b = pi_r - ref_r`` and ``delta = a - b``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.losses.dpo import _finish, _prep
from jalign.losses.ops import _valid_and_count, _wsum, safe_divide


# ----------------------------------------------------------------------------- KTO (unpaired)
def kto_mismatched_indices(valid) -> tuple[np.ndarray, np.ndarray]:
    """The mismatched (prompt, completion) pairing KTO estimates its reference point on (host side, NumPy).

    Returns ``(completion_index, kl_valid)`` [B]: row i's prompt is paired with the completion of row
    ``completion_index[i]``, the previous valid row (cyclically), i.e. the completions of the valid rows
    shifted by one within the batch, as in Ethayarajh et al. 2024 (Sec. 4.1, z0 estimated from unrelated
    outputs y' of the same batch) and TRL (``KL_completion_ids = [c_last] + c[:-1]``). ``kl_valid`` is 1 on the
    valid rows when at least two rows are valid (with one there is no mismatched pair) and 0 elsewhere;
    invalid rows point to themselves. Run the policy and reference forward on
    ``(prompt[i], completion[completion_index[i]])`` to get the inputs of :func:`kto_kl_estimate`.
    """
    v = np.asarray(valid).reshape(-1) > 0
    idx = np.arange(v.shape[0])
    rows = idx[v]
    out = idx.copy()
    if rows.size >= 2:
        out[rows] = np.roll(rows, 1)
        return out, v.astype(np.float32)
    return out, np.zeros(v.shape[0], np.float32)


def kto_kl_estimate(kl_pi, kl_ref, valid=None, num_kl: Optional[float] = None):
    """KTO's batch estimate of KL(pi || ref) from mismatched pairs (a contribution to a global mean).

        kl = (1/N) sum_j v_j (log pi(y'_j | x_j) - log ref(y'_j | x_j))

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.1 (the reference
    point z0 = KL(pi || ref), estimated with mismatched pairs (x, y') of the batch). ``kl_pi``, ``kl_ref`` [B]
    are per-sequence log-prob sums of the mismatched pairs (:func:`kto_mismatched_indices`); N = ``num_kl``, the
    global number of valid mismatched pairs, so summing over micro-batches (or ``psum`` over processes, as TRL
    gathers it) gives the big-batch estimate. Not clamped and not detached here: :func:`kto_loss` does both.
    """
    kp, kr = (jnp.asarray(x, jnp.float32) for x in (kl_pi, kl_ref))
    v, n = _valid_and_count(valid, kp.shape, num_kl)
    return safe_divide(_wsum(kp - kr, v), n)


def kto_loss(pi_logps, ref_logps, desirable, kl, valid=None, num_seqs: Optional[float] = None, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Kahneman-Tversky Optimization on unpaired completions labelled desirable / undesirable.

        r_i = log pi(y_i | x_i) - log ref(y_i | x_i),        z0 = stop_gradient(max(0, kl))
        v_i = lambda_D sigmoid(beta (r_i - z0))    if y_i is desirable
              lambda_U sigmoid(beta (z0 - r_i))    if y_i is undesirable
        L   = (1/N) sum_i valid_i (lambda_{y_i} - v_i)

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.1 (the KTO loss
    L_KTO = E[lambda_y - v(x, y)], z0 = KL(pi || ref) detached and clamped at 0 as in the paper's code and TRL).
    lambda_D = ``desirable_weight``, lambda_U = ``undesirable_weight`` (the paper advises
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]). ``desirable`` [B] 1/0 labels, ``kl`` the scalar estimate of
    :func:`kto_kl_estimate` (over the global batch for micro-batch invariance, or per micro-batch as TRL).
    N = ``num_seqs`` (global valid completions). ``lambda - lambda sigmoid(x) = lambda sigmoid(-x)`` is what
    is computed (stable for any |x|).

    Metrics: ``loss``, ``kl`` (z0, weighted by this batch's share of N so that it sums to z0),
    ``rewards_desirable`` / ``rewards_undesirable`` (sum of beta r_i over that label / N),
    ``desirable_fraction``, ``accuracy`` (1[r_i > z0] on desirable, 1[r_i < z0] on undesirable);
    ``num_seqs`` (local).
    """
    pi, ref = (jnp.asarray(x, jnp.float32) for x in (pi_logps, ref_logps))
    v, n = _valid_and_count(valid, pi.shape, num_seqs)
    d = jnp.broadcast_to(jnp.asarray(desirable, jnp.float32), pi.shape) > 0
    r = jnp.where(v > 0, pi - ref, 0.0)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl, jnp.float32), 0.0))
    per = jnp.where(d, desirable_weight * jax.nn.sigmoid(-beta * (r - z0)),
                    undesirable_weight * jax.nn.sigmoid(-beta * (z0 - r)))
    loss = safe_divide(_wsum(per, v), n)
    df = d.astype(jnp.float32)
    metrics = {
        "loss": loss,
        "kl": z0 * safe_divide(jnp.sum(v), n),  # z0 as a contribution: sums to z0 over the micro-batches
        "rewards_desirable": safe_divide(_wsum(beta * r * df, v), n),
        "rewards_undesirable": safe_divide(_wsum(beta * r * (1.0 - df), v), n),
        "desirable_fraction": safe_divide(_wsum(df, v), n),
        "accuracy": safe_divide(_wsum(jnp.where(d, r > z0, r < z0).astype(jnp.float32), v), n),
        "num_seqs": jnp.sum(v),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- pairwise, reference-based
def slic_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
              margin: float = 1.0):
    """SLiC calibration hinge loss.

        L = (1/N) sum_i v_i max(0, margin - beta delta_i)

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Sec. 2 (the rank
    calibration loss max(0, delta - log P(y+|x) + log P(y-|x))); with the reference ratios as in the DPO
    paper's comparison and TRL ``loss_type="hinge"`` (margin 1). For the paper's reference-free form pass
    ``ref_c = ref_r = 0`` and beta = 1, margin = the paper's delta. Add the SLiC regulariser
    (:func:`jalign.losses.dpo_sft_term`) in the algorithm. Metrics as :func:`jalign.losses.dpo_loss`.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    per = jax.nn.relu(margin - beta * delta)
    return _finish(per, rc, rr, delta, v, n, beta)


def robust_dpo_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
                    label_smoothing: float):
    """Robust DPO: the unbiased DPO loss under preference labels flipped with probability eps.

        L = (1/N) sum_i v_i [ -(1 - eps) log sigmoid(beta delta_i) + eps log sigmoid(-beta delta_i) ] / (1 - 2 eps)

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", Sec. 3 (the
    de-biased loss; TRL ``loss_type="robust"``). eps = ``label_smoothing`` in [0, 0.5); eps = 0 is DPO.
    Unlike cDPO the per-pair loss is not bounded below. Metrics as :func:`jalign.losses.dpo_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    z = beta * delta
    eps = label_smoothing
    per = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return _finish(per, rc, rr, delta, v, n, beta)


def apo_zero_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float):
    """Anchored Preference Optimization, APO-zero (raise the chosen, lower the rejected likelihood).

        L = (1/N) sum_i v_i [ (1 - sigmoid(beta a_i)) + sigmoid(beta b_i) ]

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Sec. 3 (APO-zero,
    for when the chosen outputs are better than the model's own; TRL ``loss_type="apo_zero"``).
    a = pi_c - ref_c, b = pi_r - ref_r. Metrics as :func:`jalign.losses.dpo_loss`.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    per = jax.nn.sigmoid(-beta * rc) + jax.nn.sigmoid(beta * rr)
    return _finish(per, rc, rr, delta, v, n, beta)


def apo_down_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float):
    """Anchored Preference Optimization, APO-down (lower both, the rejected more).

        L = (1/N) sum_i v_i [ sigmoid(beta a_i) + (1 - sigmoid(beta (a_i - b_i))) ]

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Sec. 3 (APO-down,
    for when the model is better than the chosen outputs; TRL ``loss_type="apo_down"``). Metrics as
    :func:`jalign.losses.dpo_loss`.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    per = jax.nn.sigmoid(beta * rc) + jax.nn.sigmoid(-beta * delta)
    return _finish(per, rc, rr, delta, v, n, beta)


def sppo_hard_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float):
    """Self-Play Preference Optimization with hard (0/1) win probabilities.

        L = (1/N) sum_i v_i [ (a_i - 1/(2 beta))^2 + (b_i + 1/(2 beta))^2 ]

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Sec. 3 (the SPPO
    square loss (log(pi/ref) - eta (P(y > pi) - 1/2))^2 with P = 1 for the winner, 0 for the loser and
    eta = 1/beta; TRL ``loss_type="sppo_hard"``). Metrics as :func:`jalign.losses.dpo_loss`.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    h = 0.5 / beta
    per = jnp.square(rc - h) + jnp.square(rr + h)
    return _finish(per, rc, rr, delta, v, n, beta)


def nca_pair_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float):
    """Noise Contrastive Alignment, pairwise form.

        L = (1/N) sum_i v_i [ -log sigmoid(beta a_i) - 1/2 log sigmoid(-beta a_i) - 1/2 log sigmoid(-beta b_i) ]

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", Sec. 3 (NCA with
    K = 2 responses; TRL ``loss_type="nca_pair"``). Optimises absolute likelihoods: the chosen log-ratio is
    pushed up, not only the margin. Metrics as :func:`jalign.losses.dpo_loss`.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    per = (-jax.nn.log_sigmoid(beta * rc) - 0.5 * jax.nn.log_sigmoid(-beta * rc)
           - 0.5 * jax.nn.log_sigmoid(-beta * rr))
    return _finish(per, rc, rr, delta, v, n, beta)


def bco_pair_loss(pi_c, pi_r, ref_c, ref_r, valid=None, num_pairs: Optional[float] = None, *, beta: float,
                  delta_shift):
    """Binary Classifier Optimization on pairs: chosen vs rejected as a binary classifier with a reward shift.

        L = (1/N) sum_i v_i [ -log sigmoid(beta a_i - delta) - log sigmoid(-(beta b_i - delta)) ]

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", Sec. 4 (the reward
    shift delta = running mean of the implicit rewards beta a, beta b; TRL ``loss_type="bco_pair"``).
    ``delta_shift`` is that running mean, an explicit (constant) input: update it between steps with
    :func:`bco_delta_update` from the metric ``rewards_mean`` (the batch mean of (beta a + beta b) / 2). TRL
    updates it with the current batch *before* the loss; doing so is the caller's choice.
    Metrics as :func:`jalign.losses.dpo_loss` plus ``rewards_mean``.
    """
    rc, rr, delta, v, n = _prep(pi_c, pi_r, ref_c, ref_r, valid, num_pairs)
    s = jax.lax.stop_gradient(jnp.asarray(delta_shift, jnp.float32))
    per = -jax.nn.log_sigmoid(beta * rc - s) - jax.nn.log_sigmoid(-(beta * rr - s))
    loss, metrics = _finish(per, rc, rr, delta, v, n, beta)
    metrics["rewards_mean"] = safe_divide(_wsum(0.5 * beta * (rc + rr), v), n)
    return loss, metrics


def bco_delta_update(delta_shift, count, batch_mean, batch_count):
    """Running mean of the implicit rewards for :func:`bco_pair_loss`: returns ``(delta, count)``.

        delta <- (count delta + batch_count batch_mean) / (count + batch_count)

    (the mean part of TRL's ``RunningMoments``; ``batch_count`` = number of rewards averaged, 2 per pair).
    """
    delta_shift, count, batch_mean, batch_count = (jnp.asarray(x, jnp.float32)
                                                   for x in (delta_shift, count, batch_mean, batch_count))
    total = count + batch_count
    return safe_divide(count * delta_shift + batch_count * batch_mean, total), total


def spin_loss(pi_gold, pi_gen, opp_gold, opp_gen, valid=None, num_pairs: Optional[float] = None, *, lam: float):
    """Self-Play fIne-tuNing: tell the data's gold response from the previous iterate's own generation.

        L = (1/N) sum_i v_i l( lam [log pi(y_i|x_i) / pi_t(y_i|x_i)] - lam [log pi(y'_i|x_i) / pi_t(y'_i|x_i)] ),
        l(t) = log(1 + exp(-t))

    Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
    Sec. 4 (L_SPIN with the logistic loss l). y = the SFT data's gold response, y' ~ pi_t the opponent's
    generation, pi_t the opponent = the previous iterate (frozen). It has DPO's form with chosen = gold,
    rejected = generation, reference = opponent and beta = lam; what differs is where the pair and the
    "reference" come from (rebuilt every iteration). Metrics as :func:`jalign.losses.dpo_loss` (``accuracy``:
    the gold response's log-ratio exceeds the generation's).
    """
    rc, rr, delta, v, n = _prep(pi_gold, pi_gen, opp_gold, opp_gen, valid, num_pairs)
    per = -jax.nn.log_sigmoid(lam * delta)
    return _finish(per, rc, rr, delta, v, n, lam)
