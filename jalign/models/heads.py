"""Reading heads off the trunk: sequence scores (reward models), per-token values (critics), token log-probs.

All take rows ``tokens, positions, segment_ids [B, T]`` (any padding side: ``segment_ids > 0`` marks real
tokens) and never gather a sharded axis: the last-token read is a one-hot reduction over the sequence, and
token log-probs are chunked with the vocabulary kept sharded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses import chunked_token_logps
from jalign.models import transformer as tfm

LOGPROB_CHUNK = 512


def last_valid_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B] index of the last position with ``segment_ids > 0`` (0 for an all-padding row)."""
    T = segment_ids.shape[-1]
    pos = jnp.arange(T, dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids > 0, pos, 0), axis=-1)


def sequence_scores(params, tokens, positions, segment_ids, cfg) -> jax.Array:
    """[B, A] float32 scores of each row, read at its last valid token (a reward model's output).

    Rows hold one sequence each (prompt + response, the final EOS included). The read is a one-hot reduction
    over the sequence axis, so a sequence-sharded hidden state is never gathered.
    """
    hidden = tfm.forward(params, tokens, positions, segment_ids, cfg)
    scores = tfm.score_head(params, hidden)  # [B, T, A]
    last = last_valid_index(segment_ids)
    pick = (jnp.arange(tokens.shape[-1], dtype=jnp.int32)[None, :] == last[:, None]).astype(scores.dtype)
    return jnp.einsum("bta,bt->ba", scores, pick)


def token_values(params, rows, cfg) -> jax.Array:
    """V(s_t) [B, T]: a critic's value head on the hidden state of position t (which predicts target t)."""
    hidden = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return tfm.score_head(params, hidden)[..., 0]


def token_logps(params, rows, cfg, temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(z/T)[target] at every position [B, T] (and the entropy of softmax(z/T) if asked)."""
    hidden = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return chunked_token_logps(hidden, tfm.unembed_matrix(params, cfg), rows["targets"], LOGPROB_CHUNK,
                               temperature, return_entropy=return_entropy)


# ---- packed rows: per-segment reads ---------------------------------------------------------------
def segment_onehot(segment_ids: jax.Array, num_segments: int, dtype=jnp.float32) -> jax.Array:
    """[R, T] -> [R, T, S]: 1 where position t belongs to segment s + 1 (segment 0 is padding)."""
    ids = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    return (segment_ids[..., None] == ids).astype(dtype)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """sum_t values[..., r, t] [segment_ids[..., r, t] == s + 1] -> [..., R, S] (a one-hot contraction over the row, so a
    sequence-sharded axis reduces locally; an absent segment sums to 0)."""
    return jnp.einsum("...t,...ts->...s", values, segment_onehot(segment_ids, num_segments, values.dtype))


def segment_last_scores(scores: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """scores [R, T, A] read at the last position of each segment -> [R, S, A] (0 for an absent segment):
    the reward model's read of :func:`sequence_scores`, per packed sequence."""
    T = segment_ids.shape[-1]
    hot = segment_onehot(segment_ids, num_segments, jnp.int32)  # [R, T, S]
    pos = jnp.arange(T, dtype=jnp.int32)[None, :, None]
    last = jnp.max(jnp.where(hot > 0, pos, -1), axis=1)  # [R, S]
    pick = (pos == last[:, None, :]).astype(scores.dtype)  # [R, T, S]; no position matches an absent segment
    return jnp.einsum("rta,rts->rsa", scores, pick)


def packed_segment_scores(params, tokens, positions, segment_ids, cfg, num_segments: int) -> jax.Array:
    """[R, S, A] reward-model scores of every packed sequence (the packed twin of :func:`sequence_scores`)."""
    hidden = tfm.forward(params, tokens, positions, segment_ids, cfg)
    return segment_last_scores(tfm.score_head(params, hidden), segment_ids, num_segments)
