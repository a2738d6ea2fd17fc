"""Preference labels from a judge model's choice-token log-probabilities, both orders (RLAIF).

The judge reads a multiple-choice prompt, "which response is better, (A) or (B)?", and the log-probabilities
it gives the two choice tokens are read off. Each pair is judged twice, with the answers in both orders,
so that a judge that simply prefers a position cancels out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def judge_preference(logp_a_first, logp_b_first, logp_a_swapped, logp_b_swapped):
    """Probability that response 1 is better, its 0/1 label and confidence, from both presentation orders.

        first order  (response 1 shown as A, response 2 as B):  p_1 = sigmoid(lA_first - lB_first)
        swapped order (response 2 shown as A, response 1 as B): p_2 = sigmoid(lB_swapped - lA_swapped)
        p = (p_1 + p_2) / 2,   label = 1[p > 1/2] (1: response 1 is chosen),   confidence = |2p - 1|

    Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback", Sec. 4.1 (the feedback model's
    normalised log-probabilities of the choice tokens are the soft preference label); averaging over the two
    orders is the usual cancellation of position bias (e.g. Zheng et al. 2023, "Judging LLM-as-a-Judge",
    Sec. 3.4, swapping positions). Each p_k renormalises the judge over the two choice tokens only, so the mass
    it puts on other tokens does not matter. Swapping the two responses maps p -> 1 - p exactly: the label
    follows the response, the confidence is unchanged. A tie (p = 1/2) gets label 0 and confidence 0: drop it
    with a threshold on the confidence.

    Inputs: arrays of the same shape (one entry per pair) of choice-token log-probs (or logits: only the
    differences are used). Returns a dict of arrays: ``prob_first`` (p), ``label`` (int32), ``confidence``,
    ``consistent`` (1 when both orders prefer the same response), ``position_bias`` = (p_1 - p_2) / 2, the
    judge's lean toward whatever is shown first.
    """
    la1, lb1, la2, lb2 = (jnp.asarray(x, jnp.float32) for x in (logp_a_first, logp_b_first, logp_a_swapped,
                                                                  logp_b_swapped))
    p1 = jax.nn.sigmoid(la1 - lb1)
    p2 = jax.nn.sigmoid(lb2 - la2)
    p = 0.5 * (p1 + p2)
    return {
        "prob_first": p,
        "label": (p > 0.5).astype(jnp.int32),
        "confidence": jnp.abs(2.0 * p - 1.0),
        "consistent": ((p1 > 0.5) == (p2 > 0.5)).astype(jnp.int32),
        "position_bias": 0.5 * (p1 - p2),
    }
