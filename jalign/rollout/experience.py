"""Experience for every generate-then-train algorithm, on device, in the sampler's own layout.

    out = sample(params, cfg, prompt_ids, ...)       # generate(return_device=True): nothing leaves the devices
    rows = rollout_rows(out, pad_id)                 # inside the scoring program: training rows [B, S]
    score = rule_scores(rule, tokenizer, out, ...)   # only tokens and lengths go to the host, per process

Rollout layout: row b is its prompt left-padded to P tokens followed by the N sampled tokens
(``S = P + N``)::

    tokens     pad pad p0 p1 p2 | y0 y1 <eos> pad ...      segment_ids 0 0 1 1 1 | 1 1 1 0 ...
    positions    0   0  0  1  2 |  3  4   5    0 ...
    targets    pad p0 p1 p2 y0  | y1 <eos> pad ...         mask 0 0 0 0 1 | 1 1 0 ... (target is a response token)

The forward pass handles this layout as is (segment ids and causal-by-index masking), so the rollout never
crosses to the host and back. Log-probs, values, KL and advantages live on the positions whose target is a
response token, and the sequence reward sits on the last of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jalign.data.prompts import PromptSet


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def rollout_shape(longest_prompt: int, max_new_tokens: int, sequence_parallel: int = 1) -> tuple[int, int]:
    """(P, N): the prompt block is exactly the longest prompt of the data (fixed for the run, so nothing
    recompiles) and the response block leaves S = P + N a multiple of 8 * sequence (ring attention's zigzag
    layout needs 2 * sequence)."""
    P = longest_prompt
    S = round_up(P + max_new_tokens, 8 * sequence_parallel)
    return P, S - P


# ---- sampling -----------------------------------------------------------------------------------
def sample(params, cfg, prompt_ids: list, *, max_new_tokens: int, new_len: int, prompt_len: int, key,
           eos_ids, pad_id: int, mesh, rules, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, rollout=None) -> dict:
    """Sample continuations; everything stays on the devices (``return_device=True``).

    ``prompt_len`` fixes the prompt block (>= every prompt), ``new_len`` the response block; the batch is the
    given prompts exactly (its size must divide over the data-parallel axes). ``rollout`` (the config's
    ``rollout`` section, default its defaults) picks the continuous-batching engine (``jalign.rollout``: slots
    refilled as sequences end, a paged KV cache, the samples of one prompt sharing its pages) or one static
    batch (``jalign.generate``); both return the same layout."""
    from jalign.config import RolloutConfig

    r = rollout or RolloutConfig()
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
              eos_ids=eos_ids, pad_id=pad_id, rng=key, mesh=mesh, rules=rules, prompt_bucket=prompt_len,
              new_bucket=new_len, batch_bucket=False, return_device=True)
    if r.engine:
        from jalign.rollout.adapter import generate as engine_generate

        out = engine_generate(params, cfg, prompt_ids, slots=r.slots, page_size=r.page_size,
                              steps_per_call=r.steps_per_call, prefix_sharing=r.prefix_sharing, sampler=r.sampler,
                              **kw)
        return {k: v for k, v in out.items() if isinstance(v, jax.Array)}  # the layout, not the host copies
    from jalign.generate import generate

    return generate(params, cfg, prompt_ids, **kw)


def rollout_rows(out: dict, pad_id: int) -> dict:
    """The sampler's output (``return_device=True``) -> training rows [B, S] in the rollout layout (jittable).

    Returns tokens, targets, positions, segment_ids, ``mask`` (1 where the target is a response token),
    ``sampler_logps`` (the sampler's log_softmax(z/T) there), ``ended`` [B] and ``lengths`` [B]."""
    pt, pp, ps = out["prompt_tokens"], out["prompt_positions"], out["prompt_segment_ids"]
    B, P = pt.shape
    N = out["tokens"].shape[1]
    lengths = out["lengths"].astype(jnp.int32)
    j = jnp.arange(N, dtype=jnp.int32)[None, :]
    valid = j < lengths[:, None]
    resp = jnp.where(valid, out["tokens"], pad_id).astype(jnp.int32)
    tokens = jnp.concatenate([pt.astype(jnp.int32), resp], axis=1)
    seg = jnp.concatenate([ps.astype(jnp.int32), valid.astype(jnp.int32)], axis=1)
    positions = jnp.concatenate([pp.astype(jnp.int32), out["prompt_lengths"][:, None].astype(jnp.int32) + j], axis=1)
    positions = jnp.where(seg > 0, positions, 0)
    targets = jnp.concatenate([tokens[:, 1:], jnp.full((B, 1), pad_id, jnp.int32)], axis=1)
    # target at column c is token c+1: a response token when P <= c+1 < P + length
    col = jnp.arange(P + N, dtype=jnp.int32)[None, :]
    mask = ((col >= P - 1) & (col - (P - 1) < lengths[:, None])).astype(jnp.float32)
    glp = jnp.concatenate([jnp.zeros((B, P - 1), jnp.float32), out["logprobs_tempered"].astype(jnp.float32),
                           jnp.zeros((B, 1), jnp.float32)], axis=1)
    glp = jnp.where(mask > 0, glp, 0.0)
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": seg, "mask": mask,
            "sampler_logps": glp, "ended": out["ended_with_eos"].astype(jnp.float32), "lengths": lengths}


# ---- host side: per process ---------------------------------------------------------------------
def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(this process's rows of a batch-sharded array, their global row indices), each row once."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return x, np.arange(x.shape[0])
    seen, rows, index = set(), [], []
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            if start + i not in seen:
                seen.add(start + i)
                rows.append(data[i])
                index.append(start + i)
    order = np.argsort(index)
    return np.stack([rows[i] for i in order]), np.asarray(index)[order]


def put_local_rows(values: np.ndarray, index: np.ndarray, like: jax.Array) -> jax.Array:
    """A [B] array sharded like ``like`` from this process's rows (``values[i]`` is global row ``index[i]``)."""
    if not isinstance(like, jax.Array):
        return jnp.asarray(values)
    where = {int(r): i for i, r in enumerate(index)}

    def cb(idx):
        sl = idx[0]
        rows = range(*sl.indices(like.shape[0]))
        return np.asarray([values[where[r]] for r in rows], values.dtype)

    return jax.make_array_from_callback(like.shape, like.sharding, cb)


def decode_responses(tokenizer, responses: np.ndarray, lengths: np.ndarray, ended: np.ndarray) -> list[str]:
    """Response texts without the end token. Ids the tokenizer does not know (a model's vocabulary is often
    padded beyond the tokenizer's) are dropped rather than failing the rollout."""
    out, V = [], getattr(tokenizer, "vocab_size", None)
    for row, n, e in zip(responses, lengths, ended):
        n = int(n) - int(bool(e))
        out.append(tokenizer.decode([int(t) for t in row[:n] if V is None or 0 <= int(t) < V]))
    return out


def local_texts(tokenizer, out: dict) -> tuple[list[str], np.ndarray]:
    """(decoded responses of this process's rows, their global row indices): only tokens and lengths move."""
    tokens, index = local_rows(out["tokens"])
    lengths, _ = local_rows(out["lengths"])
    ended, _ = local_rows(out["ended_with_eos"])
    return decode_responses(tokenizer, tokens, lengths, ended), index


def rule_scores(fn, tokenizer, out: dict, row_prompts: list, prompts: "PromptSet") -> tuple[jax.Array, list, np.ndarray]:
    """Rule reward of every row, computed by each process for its own rows: (device scores [B] sharded like
    the rollout, this process's response texts, their global row indices). ``row_prompts[b]`` is the prompt
    index (into ``prompts``) of global row b; rows past ``len(row_prompts)`` are padding (score 0)."""
    texts, index = local_texts(tokenizer, out)
    scores = np.zeros(len(index), np.float32)
    for i, (r, text) in enumerate(zip(index, texts)):
        if r < len(row_prompts):
            p = row_prompts[r]
            scores[i] = fn(prompts.texts[p], text, prompts.answers[p], prompts.examples[p])
    return put_local_rows(scores, index, out["lengths"]), texts, index


def exact_matches(texts: list, index: np.ndarray, row_prompts: list, prompts: "PromptSet") -> np.ndarray:
    """1/0 per local row: the stripped response equals the stripped reference answer (nan: no answer)."""
    out = np.full(len(index), np.nan, np.float32)
    for i, (r, text) in enumerate(zip(index, texts)):
        if r < len(row_prompts):
            ref = prompts.answers[row_prompts[r]]
            if ref is not None:
                out[i] = float(text.strip() == str(ref).strip())
    return out


def gather_rows_to_host(values: np.ndarray, index: np.ndarray, total: int) -> Optional[np.ndarray]:
    """Every process's local rows assembled into the global [total] vector on every process (a collective
    on several processes)."""
    if jax.process_count() == 1:
        full = np.zeros(total, values.dtype)
        full[index] = values
        return full
    from jax.experimental import multihost_utils

    padded = np.zeros(total, np.float64)
    have = np.zeros(total, np.float64)
    padded[index] = values
    have[index] = 1.0
    s = multihost_utils.process_allgather(np.stack([padded, have]))  # [P, 2, total]
    counts = np.maximum(s[:, 1].sum(0), 1.0)
    return (s[:, 0].sum(0) / counts).astype(values.dtype)
