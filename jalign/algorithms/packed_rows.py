"""Packed rows for the RL score and update passes (``algorithm.pack_rows``).

The rollout layout (:mod:`jalign.rollout.experience`) is one row of ``S = P + N`` slots per sample: a group of
short answers pays for the longest one. With ``pack_rows`` the forward passes (policy old log-probs, reference
log-probs, critic values, reward-model scores; the actor's and critic's losses) run instead on ``R`` packed
rows of ``C`` tokens, several whole samples (prompt + response) per row, each sample its own segment
(segment id = its index in the group + 1, so ids are distinct within a row without a per-row sample cap) and
its own positions (the rollout's, which already restart per sample). Attention masks by segment, so a sample
never sees another (``jalign.models.attention``).

Every per-token result is read back into the rollout layout by one gather (:func:`unpack`; its transpose, a
scatter-add, carries the gradient), so the objectives, advantage estimators, KL terms and metrics run on the
same [n, S] arrays as unpacked and are unchanged by construction: token means, per-sequence means, GSPO's
sequence ratios, PPO's value loss and GAE only ever read positions with a trained target, all of which are real
tokens and hence packed.

Static shapes: ``R`` and ``C`` come from the config, so the packed programs compile once. The plan (which row
and offset each sample gets) is first-fit decreasing (Johnson 1973; NeMo-RL's sequence packing uses the
same heuristic) computed on device from the rows' segment ids, inside the program that packs, so neither the
lengths nor the plan cross to the host (on several processes the samples of a row may come from any process:
an all-to-all the compiler inserts). Whether a plan fits is one replicated boolean the RL step reads before
scoring (:func:`rollout_fits`); when it is False the step scores and trains on unpacked rows and logs a line --
a sample is never dropped.

Compared with verl (``use_remove_padding``, ``use_dynamic_bsz``) and OpenRLHF (``packing_samples``), which
concatenate a micro-batch into one variable-length stream for a varlen flash-attention kernel: the same
per-sample segments and restarted positions, but a fixed budget of ``R x C`` tokens per micro-batch instead of
a shape that changes every step (XLA would recompile).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jalign.config import ConfigError
from jalign.models import transformer as tfm


@dataclasses.dataclass(frozen=True)
class PackShape:
    """The static packed shapes of a run: ``micro_rows`` rows of ``row_len`` tokens per accumulation step,
    ``score_rows`` for the whole rollout in the score pass."""

    row_len: int
    micro_rows: int
    score_rows: int


def pack_shape(cfg, sizes, rollout_row_len: int, sequence_parallel: int) -> Optional[PackShape]:
    """The packed shapes ``algorithm.pack_rows`` asks for (None when it is off), every key checked."""
    a, src = cfg.algorithm, cfg.source or "<config>"
    if not a.pack_rows:
        return None
    C = a.pack_row_len or rollout_row_len
    dp = sizes.data_parallel
    half = -(-sizes.micro // 2)
    R = a.pack_rows_per_micro or -(-half // dp) * dp
    multiple = 8 * sequence_parallel
    if C < 1 or C % multiple:
        raise ConfigError(f"{src}: algorithm.pack_row_len={C} must be a positive multiple of 8 * mesh.sequence = "
                          f"{multiple} (ring attention's layout)")
    if C > cfg.model.max_seq_len:
        raise ConfigError(f"{src}: algorithm.pack_row_len={C} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if R < 1 or R % dp:
        raise ConfigError(f"{src}: algorithm.pack_rows_per_micro={R} must be a positive multiple of the "
                          f"data-parallel size mesh.data*mesh.fsdp = {dp} (packed rows are split over it)")
    return PackShape(C, R, R * (sizes.rollout // sizes.micro))


def forward_rows(fn, mb: dict):
    """``fn(rows)`` on a minibatch: on its packed rows read back per sample when it carries them
    (``mb["packed"]``, ``mb["pack_dest"]``), else on its rows as they are."""
    if "packed" in mb:
        return per_token(fn, {"rows": mb["packed"], "dest": mb["pack_dest"]})
    return fn(mb)


def sample_lengths(segment_ids) -> jax.Array:
    """[..., n, S] -> [..., n] real tokens per sample (they are contiguous in the rollout layout)."""
    return jnp.sum(segment_ids > 0, axis=-1).astype(jnp.int32)


def first_fit_decreasing(lengths, num_rows: int, row_len: int):
    """Place samples of ``lengths`` [n] into ``num_rows`` rows of ``row_len`` tokens (jittable, static shapes).

    Longest first, each into the first row with room. Returns ``(row [n], offset [n], placed [n] bool)``; a
    sample that fits nowhere has ``placed`` False (its row/offset are meaningless)."""
    n = lengths.shape[0]
    order = jnp.argsort(-lengths, stable=True)

    def place(fill, length):
        room = fill + length <= row_len
        r = jnp.argmax(room)  # the first row with room (0 when there is none: ``ok`` says so)
        ok = room[r]
        off = fill[r]
        return fill.at[r].add(jnp.where(ok, length, 0)), (r.astype(jnp.int32), off, ok)

    _, (r, off, ok) = jax.lax.scan(place, jnp.zeros((num_rows,), jnp.int32), lengths[order])
    inv = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return r[inv], off[inv], ok[inv]


def plan_fits(segment_ids, num_rows: int, row_len: int) -> jax.Array:
    """True when every sample of rows [n, S] is placed by :func:`first_fit_decreasing`."""
    return jnp.all(first_fit_decreasing(sample_lengths(segment_ids), num_rows, row_len)[2])


def rollout_fits(segment_ids, order, micro: int, shape: PackShape) -> jax.Array:
    """True when the rollout rows [N, S] fit the packed score pass and every accumulation step of the updates:
    ``order`` [U, M] holds each update's row indices, split into accumulation steps of ``micro`` rows."""
    steps = segment_ids[order.reshape(-1)].reshape((-1, micro, segment_ids.shape[-1]))
    per_step = jax.vmap(lambda x: plan_fits(x, shape.micro_rows, shape.row_len))(steps)
    return plan_fits(segment_ids, shape.score_rows, shape.row_len) & jnp.all(per_step)


def destinations(segment_ids, num_rows: int, row_len: int) -> jax.Array:
    """[n, S] flat index into the packed [num_rows * row_len] tokens of every real token of rows [n, S]
    (``num_rows * row_len``, one past the end, for padding and for a sample that was not placed)."""
    n, S = segment_ids.shape
    real = segment_ids > 0
    row, off, ok = first_fit_decreasing(sample_lengths(segment_ids), num_rows, row_len)
    first = jnp.argmax(real, axis=-1).astype(jnp.int32)  # the sample's first real column
    col = jnp.arange(S, dtype=jnp.int32)[None, :]
    flat = row[:, None] * row_len + off[:, None] + (col - first[:, None])
    return jnp.where(real & ok[:, None], flat, num_rows * row_len).astype(jnp.int32)


def pack(rows: dict, dest, num_rows: int, row_len: int) -> dict:
    """Rows [n, S] -> packed rows [num_rows, row_len] of tokens, targets, positions and segment ids (sample
    index + 1); padding is 0 everywhere (segment 0 attends to nothing and is never read back)."""
    n, S = dest.shape
    size = num_rows * row_len
    src = jnp.full((size,), n * S, jnp.int32).at[dest.reshape(-1)].set(jnp.arange(n * S, dtype=jnp.int32),
                                                                       mode="drop")
    sample_id = jnp.where(rows["segment_ids"] > 0, jnp.arange(1, n + 1, dtype=jnp.int32)[:, None], 0)
    fields = dict(tokens=rows["tokens"], targets=rows["targets"], positions=rows["positions"], segment_ids=sample_id)

    def take(x):
        flat = jnp.concatenate([x.reshape(-1).astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
        return flat[src].reshape(num_rows, row_len)

    return {k: take(v) for k, v in fields.items()}


def unpack(x, dest):
    """Per-token values on packed rows [R, C, ...] -> the rollout layout [n, S, ...] (0 where ``dest`` is
    padding). A gather, so gradients flow back to the packed positions."""
    R, C = x.shape[:2]
    flat = x.reshape((R * C,) + x.shape[2:])
    flat = jnp.concatenate([flat, jnp.zeros((1,) + x.shape[2:], x.dtype)])
    return flat[dest]


def packed_view(rows: dict, num_rows: int, row_len: int) -> dict:
    """``{"rows": packed rows [R, C], "dest": [n, S]}``: what a per-token forward on packed rows needs."""
    dest = destinations(rows["segment_ids"], num_rows, row_len)
    return {"rows": pack(rows, dest, num_rows, row_len), "dest": dest}


def per_token(fn, view: dict):
    """``fn(packed rows) -> [R, C, ...]`` (or a tuple of such), read back as [n, S, ...] per sample."""
    out = fn(view["rows"])
    if isinstance(out, tuple):
        return tuple(unpack(o, view["dest"]) for o in out)
    return unpack(out, view["dest"])


def last_token_read(scores, segment_ids):
    """scores [n, S, A] read at each row's last real position -> [n, A] (``heads.sequence_scores``' read)."""
    S = segment_ids.shape[-1]
    pos = jnp.arange(S, dtype=jnp.int32)
    last = jnp.max(jnp.where(segment_ids > 0, pos, 0), axis=-1)
    pick = (pos[None, :] == last[:, None]).astype(scores.dtype)
    return jnp.einsum("bta,bt->ba", scores, pick)


def packed_sequence_scores(params, rows: dict, view: dict, cfg) -> jax.Array:
    """[n, A] reward-model scores of the samples of ``rows``, the forward run on the packed rows of ``view``."""
    def head(p):
        return tfm.score_head(params, tfm.forward(params, p["tokens"], p["positions"], p["segment_ids"], cfg))

    return last_token_read(per_token(head, view), rows["segment_ids"])


def padding_fraction(segment_ids) -> jax.Array:
    """Share of the row positions that are padding (segment 0)."""
    return jnp.mean((segment_ids == 0).astype(jnp.float32))
