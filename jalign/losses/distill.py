"""Knowledge distillation: teacher top-k, top-k KL (NeMo-Aligner's KD), generalised JSD (GKD), on-policy reverse KL.

Token arrays are [B, T] with a ``mask`` of the trained positions; token losses divide by ``num_tokens``, the
number of valid tokens in the *global* optimizer batch (default: this batch's), and metrics are contributions
to that token mean, as in :mod:`jalign.losses.ppo`.

Vocabulary sharding: in jalign the unembedding ``[D, V]`` (and so the logits) is sharded over its vocabulary
(logical axis ``vocab`` -> mesh axis ``tensor``). Nothing here gathers the vocabulary: log-probs at given ids are
a compare-and-sum over the vocabulary (as :func:`jalign.losses.token_logps`), the normaliser and the full-vocab
divergences are reductions over it, and the ops that start from hidden states compute ``chunk_size`` positions
at a time (rematerialised in the backward pass), so [tokens, vocab] logits never exist at once.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jalign.losses.ops import _valid_and_count, _wsum, safe_divide

# Log-probs are floored here before the KL sums: a token of probability 0 on both sides (e.g. vocabulary
# padding masked with -inf logits) then contributes 0 * finite = 0 in the forward *and* backward pass,
# instead of 0 * inf = NaN. exp(-1e4) is 0 in float32, so the floor changes no finite divergence.
_LOG_FLOOR = -1e4


# ----------------------------------------------------------------------------- chunking over positions
def _chunked(fn, arrays, chunk_size: int):
    """Apply ``fn`` to ``chunk_size`` positions at a time of [B, T, ...] arrays (padded to a multiple),
    under ``jax.checkpoint``; outputs are [B, chunk, ...] pytrees stitched back to [B, T, ...]."""
    B, T = arrays[0].shape[:2]
    c = max(1, min(chunk_size, T))
    pad = (-T) % c
    n = (T + pad) // c

    def split(a):
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape((B, n, c) + a.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(a) for a in arrays))

    def join(o):
        return o.swapaxes(0, 1).reshape((B, n * c) + o.shape[3:])[:, :T]

    return jax.tree_util.tree_map(join, out)


def _logits(h, unembed, temperature):
    z = jnp.einsum("bcd,dv->bcv", h, unembed.astype(h.dtype), preferred_element_type=jnp.float32)
    return z / temperature


def _pick(z, ids):
    """z[..., ids[..., k]] for each k by compare-and-sum over the vocabulary, one k at a time (no gather, no
    [..., K, V] intermediate): ids [..., K] -> [..., K]."""
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    one = lambda i: jnp.sum(jnp.where(iota == i[..., None], z, 0.0), axis=-1)
    return jnp.moveaxis(jax.lax.map(one, jnp.moveaxis(ids, -1, 0)), 0, -1)


def chunked_logps_at(hidden, unembed, ids, *, chunk_size: int = 512, temperature: float = 1.0):
    """log softmax(hidden @ unembed / T) at the given ids: [B, T, D], [D, V], int [B, T, K] -> [B, T, K] float32.

    The student side of top-k distillation: the student's log-probs at the teacher's top-k ids. Computed
    ``chunk_size`` positions at a time, with a compare-and-sum over the (possibly sharded) vocabulary for each
    of the K ids, so neither the vocabulary nor [B, T, V] logits are ever materialised whole.
    """
    ids = jnp.asarray(ids, jnp.int32)

    def one(h, i):
        z = _logits(h, unembed, temperature)
        return _pick(z, i) - jax.nn.logsumexp(z, axis=-1)[..., None]

    return _chunked(one, (hidden, ids), chunk_size)


def _reduction_top_k(z, k: int):
    """top_k over the last axis as k rounds of (max, smallest id attaining it, knock it out): only reductions
    over the vocabulary, which a vocabulary-sharded array does locally plus an all-reduce of [...]-sized
    results (``lax.top_k`` would make the SPMD partitioner gather the vocabulary). Ties go to the smaller id,
    as in ``lax.top_k``. Costs k passes over the chunk, small next to the unembedding matmul for k << D."""
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    V = z.shape[-1]
    if not 0 < k <= V:
        raise ValueError(f"teacher_topk: k must be in [1, vocab size {V}], got {k}")

    def step(zz, _):
        best = jnp.max(zz, axis=-1)
        idx = jnp.min(jnp.where(zz == best[..., None], iota, V), axis=-1)
        zz = jnp.where(iota == idx[..., None], -jnp.inf, zz)
        return zz, (best, idx)

    _, (vals, ids) = jax.lax.scan(step, z, None, length=k)
    return jnp.moveaxis(vals, 0, -1), jnp.moveaxis(ids, 0, -1)


def teacher_topk(hidden, unembed, k: int, *, temperature: float = 1.0, chunk_size: int = 512):
    """The teacher's top-k token ids and their log-probs log softmax(hidden @ unembed / T).

    hidden [B, T, D], unembed [D, V] -> ``(ids int32 [B, T, k], logps float32 [B, T, k])``, ids in decreasing
    probability. Chunked over positions like :func:`chunked_logps_at`. This is computed once per dataset and
    stored (NeMo-Aligner's ``compute_topk_logits``). The ranking does not depend on T; the log-probs do, so
    apply a temperature once: here, or in :func:`kd_topk_loss`, not both. The selection is k rounds of
    vocabulary reductions, so vocabulary-sharded logits are not gathered (``lax.top_k`` would gather them).
    """
    def one(h):
        z = _logits(h, unembed, temperature)
        vals, ids = _reduction_top_k(z, k)
        return ids.astype(jnp.int32), vals - jax.nn.logsumexp(z, axis=-1)[..., None]

    ids, logps = _chunked(one, (hidden,), chunk_size)
    return ids, jax.lax.stop_gradient(logps)


# ----------------------------------------------------------------------------- top-k KD
def _topk_terms(student_logps, teacher_logps, mask, num_tokens, temperature):
    s, t = (jnp.asarray(x, jnp.float32) for x in (student_logps, teacher_logps))
    m, n = _valid_and_count(mask, s.shape[:-1], num_tokens)
    valid = (m > 0)[..., None]
    s = jnp.where(valid, s, 0.0)  # padded positions: finite garbage-free values before any arithmetic
    t = jnp.where(valid, jax.lax.stop_gradient(t), 0.0)
    log_q = jnp.maximum(jax.nn.log_softmax(s / temperature, axis=-1), _LOG_FLOOR)
    log_p = jnp.maximum(jax.nn.log_softmax(t / temperature, axis=-1), _LOG_FLOOR)
    metrics = {
        # probability mass of the k ids before renormalisation (when the inputs are full-vocab log-probs)
        "teacher_topk_mass": safe_divide(_wsum(jnp.exp(jax.nn.logsumexp(t, axis=-1)), m), n),
        "student_topk_mass": safe_divide(_wsum(jnp.exp(jax.nn.logsumexp(s, axis=-1)), m), n),
        "num_tokens": jnp.sum(m),
    }
    return log_p, log_q, m, n, metrics


def kd_topk_loss(student_logps, teacher_logps, mask, num_tokens: Optional[float] = None, *,
                 temperature: float = 1.0):
    """Forward KL from the teacher's top-k distribution to the student's, per token, token mean.

        p_k = softmax_k(l^T_k / tau),  q_k = softmax_k(l^S_k / tau)     (both renormalised over the k ids)
        L   = (1/N) sum_{b,t} m_{b,t} sum_k p_k (log p_k - log q_k)

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Sec. 2 (soft targets at temperature
    tau); the top-k form of NeMo-Aligner's knowledge distillation (``_TopKLogitsCrossEntropy``, ``fwd_kl``),
    which renormalises teacher and student over the teacher's top-k ids. ``teacher_logps`` [B, T, K] are the
    teacher's log-probs (or logits) at its top-k ids (:func:`teacher_topk`), ``student_logps`` [B, T, K] the
    student's at the same ids (:func:`chunked_logps_at`); any per-token constant cancels in the
    renormalisation. With K = V this is the full-vocabulary KL(teacher || student) at temperature tau. The
    teacher is a constant (no gradient). Hinton's tau^2 gradient scale is left to the caller's ``kd_weight``.

    Metrics (token means over N): ``kd_loss``, ``teacher_topk_mass``, ``student_topk_mass`` (mass of the k
    ids before renormalisation, meaningful for full-vocab log-prob inputs); ``num_tokens``.
    """
    log_p, log_q, m, n, metrics = _topk_terms(student_logps, teacher_logps, mask, num_tokens, temperature)
    per = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    loss = safe_divide(_wsum(per, m), n)
    return loss, {"kd_loss": loss, **metrics}


def kd_topk_bwd_loss(student_logps, teacher_logps, mask, num_tokens: Optional[float] = None, *,
                     temperature: float = 1.0):
    """Reverse ("backward") KL on the teacher's top-k ids, per token, token mean.

        L = (1/N) sum_{b,t} m_{b,t} sum_k q_k (log q_k - log p_k)     (p, q as in :func:`kd_topk_loss`)

    NeMo-Aligner's ``kd_loss: bwd_kl`` (``_TopKLogitsCrossEntropy`` with ``bwd_kl=True``); mode-seeking, the
    student concentrates on the teacher's main modes. Inputs and metrics as :func:`kd_topk_loss`.
    """
    log_p, log_q, m, n, metrics = _topk_terms(student_logps, teacher_logps, mask, num_tokens, temperature)
    per = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    loss = safe_divide(_wsum(per, m), n)
    return loss, {"kd_loss": loss, **metrics}


# ----------------------------------------------------------------------------- GKD / on-policy distillation
def token_generalized_jsd(student_logits, teacher_logits, *, beta: float, temperature: float = 1.0):
    """Per-position generalised Jensen-Shannon divergence over the vocabulary: [..., V], [..., V] -> [...].

        S = softmax(z_S / tau), T = softmax(z_T / tau), M = beta T + (1 - beta) S
        JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M);   beta = 0: KL(T || S),   beta = 1: KL(S || T)

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), Sec. 3 (the generalised JSD); the mixture weight and the two endpoint KLs follow TRL's
    ``generalized_jsd_loss`` (beta = 0 forward KL, beta = 1 reverse KL, which JSD_beta / beta and
    JSD_beta / (1 - beta) tend to). The teacher is a constant. Reductions over the last axis only, so a
    vocabulary-sharded input is reduced in place.
    """
    log_s = jnp.maximum(jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1),
                        _LOG_FLOOR)
    log_t = jax.lax.stop_gradient(jnp.maximum(
        jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1), _LOG_FLOOR))
    if beta == 0.0:
        return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)
    log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
    kl_t = jnp.sum(jnp.exp(log_t) * (log_t - log_m), axis=-1)
    kl_s = jnp.sum(jnp.exp(log_s) * (log_s - log_m), axis=-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def generalized_jsd_loss(student_hidden, student_unembed, teacher_hidden, teacher_unembed, mask,
                         num_tokens: Optional[float] = None, *, beta: float, temperature: float = 1.0,
                         chunk_size: int = 512):
    """GKD's generalised JSD between student and teacher next-token distributions, token mean.

        L = (1/N) sum_{b,t} m_{b,t} JSD_beta( softmax(h^T_{b,t} W^T / tau) , softmax(h^S_{b,t} W^S / tau) )

    (:func:`token_generalized_jsd` for the divergence; Agarwal et al. 2024, GKD, Sec. 3.) From hidden states and
    unembedding matrices ([B, T, D_S] x [D_S, V] and [B, T, D_T] x [D_T, V]: the teacher may be of another
    size but must share the tokenizer), ``chunk_size`` positions at a time, so [B, T, V] logits never exist
    at once and vocabulary-sharded unembeddings are never gathered. On-policy (GKD proper) when the tokens
    are the student's own samples; supervised KD on data tokens otherwise. Gradients reach only the student.
    Metrics: ``jsd`` (token mean), ``num_tokens``.
    """
    m, n = _valid_and_count(mask, jnp.shape(student_hidden)[:2], num_tokens)
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_unembed = jax.lax.stop_gradient(teacher_unembed)

    def one(hs, ht):
        return token_generalized_jsd(_logits(hs, student_unembed, 1.0), _logits(ht, teacher_unembed, 1.0),
                                     beta=beta, temperature=temperature)

    per = _chunked(one, (student_hidden, teacher_hidden), chunk_size)
    loss = safe_divide(_wsum(per, m), n)
    return loss, {"jsd": loss, "num_tokens": jnp.sum(m)}


def reverse_kl_distill_loss(student_logp, teacher_logp, mask, num_tokens: Optional[float] = None):
    """On-policy distillation by sampled per-token reverse KL (policy-gradient form), token mean.

        A_{b,t} = -(log pi_S(y_t | .) - log pi_T(y_t | .))       (stop-gradient; y ~ pi_S)
        L       = -(1/N) sum_{b,t} m_{b,t} A_{b,t} log pi_S(y_t | .)

    Its gradient is the per-token (discount 0) score-function estimate of grad KL(pi_S || pi_T) on the
    student's own samples: Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models",
    Sec. 2 (reverse-KL policy gradient), Agarwal et al. 2024 (GKD, on-policy with the reverse KL), and the
    per-token advantage form of Thinking Machines' "On-Policy Distillation" (Lu et al. 2025). Needs only the
    two log-probs of the sampled tokens ([B, T]), not the vocabulary. For several updates per sample use
    ``-(old_logp - teacher_logp)`` as the advantage of a clipped objective (:func:`jalign.losses.cispo_loss`,
    :func:`jalign.losses.ppo_policy_loss`) instead.

    The loss value is a surrogate; the metric ``reverse_kl`` = (1/N) sum m (log pi_S - log pi_T) is the k1
    estimate of the per-token reverse KL. Metrics: ``policy_loss``, ``reverse_kl``, ``num_tokens``.
    """
    s, t = (jnp.asarray(x, jnp.float32) for x in (student_logp, teacher_logp))
    m, n = _valid_and_count(mask, s.shape, num_tokens)
    s = jnp.where(m > 0, s, 0.0)
    t = jnp.where(m > 0, t, 0.0)
    diff = jax.lax.stop_gradient(s - t)
    loss = safe_divide(_wsum(diff * s, m), n)
    return loss, {"policy_loss": loss, "reverse_kl": safe_divide(_wsum(diff, m), n), "num_tokens": jnp.sum(m)}
