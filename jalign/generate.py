"""Fast autoregressive generation inside JAX: jitted prefill + ``lax.while_loop`` decode with a KV cache.

    out = generate(params, cfg, [[1, 5, 9], [7, 3]], max_new_tokens=64, temperature=0.7, top_p=0.9, rng=0)
    out["tokens"], out["logprobs"], out["logprobs_tempered"], out["lengths"], out["ended_with_eos"]

Prompts are left-padded into one ``[B, P]`` block (pad slots have segment id 0 and are never attended;
positions start at 0 at each row's first real token), so every row's next token is predicted from the
same column. Prefill writes the prompt into the cache at slot 0; decode step ``i`` writes slot ``P + i``.
Shapes are bucketed (batch -> power of two, prompt -> multiple of ``prompt_bucket``, new tokens -> power
of two) and one jitted function is memoised per static setting, so varying lengths do not recompile.

The KV cache is allocated inside the jitted function (XLA reuses the buffer across decode steps) and
freed when it returns, so none is held between calls (PPO trains in that memory between rollouts).

Sampling at step i, with logits ``z`` of the next token:
  * ``logprobs_tempered`` = log_softmax(z / T)[token]: what a training forward pass at temperature T
    computes for the same token (PPO's behaviour log-probs);
  * ``logprobs`` = log-prob of the token under the distribution actually sampled from: z / T, with
    end tokens masked before ``min_new_tokens``, then top-k, then top-p (nucleus), renormalised.
``greedy`` (or ``temperature <= 0``) takes the argmax of that filtered distribution; the log-probs are
still reported under it (with T = 1 when temperature <= 0).
A row ends at its first token in ``eos_ids`` or ``stop_ids``; that token is kept (counted in ``lengths``,
``ended_with_eos`` = True) and later positions hold ``pad_id`` with log-probs 0. Randomness is drawn per
(seed, step, row), so a row's sample does not depend on the other rows or on the bucket sizes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.config import ModelConfig
from jalign.models.transformer import CACHE_AXES, forward, init_cache, lm_logits
from sharding.rules import DEFAULT_RULES, constrain, logical_to_spec, use_rules

_NEG_INF = -jnp.inf
_COMPILED: dict = {}  # static key -> jitted generate function (jax caches one executable per bucket shape)


def _pow2(n: int, minimum: int = 1) -> int:
    return 1 << (max(n, minimum) - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---- sampling -------------------------------------------------------------------------------------
def filter_logits(scaled: jax.Array, *, suppress: Optional[jax.Array] = None, end_ids: Sequence[int] = (),
                  top_k=0, top_p=None, top_k_max: int = 0) -> jax.Array:
    """Tempered logits [B, V] with disallowed tokens set to -inf: end tokens where ``suppress`` [B],
    then all but the ``top_k`` largest (ties at the k-th value kept), then all outside the smallest
    set of most-probable tokens whose probability reaches ``top_p`` (``None`` = no nucleus filter).

    Per-row settings (the rollout engine): ``end_ids`` [B, E] (padded with -1), ``top_k`` [B] with a
    static ``top_k_max`` >= every k (0 = no top-k for that row), ``top_p`` [B] (1 = no nucleus for that
    row). Scalars / a shared [E] behave as before.
    """
    x = scaled
    V = x.shape[-1]
    if suppress is not None and len(end_ids):
        end_ids = jnp.asarray(end_ids, jnp.int32)
        if end_ids.ndim == 2:  # per-row end ids: a [B, V] mask by scatter (-1 padding -> dropped)
            rows = jnp.arange(x.shape[0])[:, None]
            is_end = jnp.zeros(x.shape, bool).at[rows, jnp.where(end_ids >= 0, end_ids, V)].set(True, mode="drop")
        else:
            is_end = jnp.isin(jnp.arange(V), end_ids)[None, :]  # negative ids match nothing
        x = jnp.where(suppress[:, None] & is_end, _NEG_INF, x)
    if isinstance(top_k, int):
        if top_k and top_k < V:
            x = jnp.where(x < jax.lax.top_k(x, top_k)[0][:, -1:], _NEG_INF, x)
    elif top_k_max:
        kth = jnp.take_along_axis(jax.lax.top_k(x, min(top_k_max, V))[0],
                                  jnp.clip(top_k - 1, 0, min(top_k_max, V) - 1)[:, None], axis=-1)
        x = jnp.where((top_k[:, None] > 0) & (top_k[:, None] < V) & (x < kth), _NEG_INF, x)
    if top_p is not None:
        if jnp.ndim(top_p) == 1:
            x = jnp.where(top_p[:, None] < 1.0, jnp.where(x < _nucleus_threshold(x, top_p[:, None]), _NEG_INF, x), x)
        else:
            x = jnp.where(x < _nucleus_threshold(x, top_p), _NEG_INF, x)
    return x


def _nucleus_threshold(x: jax.Array, top_p, iters: int = 40) -> jax.Array:
    """[B, 1] logit threshold t with {x >= t} the smallest most-probable set of mass >= top_p.

    Bisection on t (mass(x >= t) only falls as t rises) keeps ``lo`` at mass >= top_p and ``hi`` below:
    O(iters * V) elementwise work instead of a full vocabulary sort, which is slow on CPU and TPU.
    40 halvings of the logit range reach float32 resolution, so the set is exact barring ties.
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    p = jnp.exp(x - m)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(jnp.isfinite(x), x, m), axis=-1, keepdims=True)
    hi = m + 1.0

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        enough = jnp.sum(jnp.where(x >= mid, p, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
    # snap to the smallest logit actually kept so ties with it stay in the set
    return jnp.min(jnp.where(x >= lo, x, jnp.inf), axis=-1, keepdims=True)


def _gather_rows(logp: jax.Array, tok: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature, greedy, *, method: str = "gumbel", **filters):
    """One sampling step shared by ``generate`` and the rollout engine.

    logits [B, V]; keys [B] (one per row); temperature scalar or [B, 1]; greedy scalar or [B];
    ``filters``: ``filter_logits`` keywords. Returns (token [B], log-prob under the filtered
    distribution, log_softmax(logits / T)[token]), as the module docstring defines them.
    ``method``: "gumbel" (``jax.random.categorical``: argmax of logits + Gumbel noise, one noise per
    vocabulary entry; generate's stream) or "inverse_cdf" (one uniform u per row, the first token whose
    cumulative probability exceeds u: the same distribution, another stream, and no per-entry random
    bits or logarithms, which dominate a small model's sampling cost on CPU).
    """
    if method not in ("gumbel", "inverse_cdf"):
        raise ValueError(f"sample_tokens: unknown method {method!r} (gumbel, inverse_cdf)")
    scaled = logits.astype(jnp.float32) / temperature
    filt = filter_logits(scaled, **filters)
    best = jnp.argmax(filt, axis=-1).astype(jnp.int32)
    draw = (lambda: jax.vmap(jax.random.categorical)(keys, filt).astype(jnp.int32)) if method == "gumbel" else (
        lambda: _inverse_cdf(keys, filt))
    # An all-greedy batch skips the draw: its noise costs more than the rest of a small model's step on CPU.
    sampled = jax.lax.cond(jnp.all(greedy), lambda: best, draw)
    tok = jnp.where(greedy, best, sampled).astype(jnp.int32)
    return tok, _gather_rows(jax.nn.log_softmax(filt, axis=-1), tok), _gather_rows(
        jax.nn.log_softmax(scaled, axis=-1), tok)


def _inverse_cdf(keys: jax.Array, filt: jax.Array) -> jax.Array:
    """Token j with c[j-1] <= u < c[j] for c = cumsum(softmax(filt)), u ~ U[0, c[-1]): P(j) = p[j].
    Entries with p = 0 never satisfy it (c is flat there); if rounding puts u at the very end, the last
    token with p > 0 is taken."""
    p = jax.nn.softmax(filt, axis=-1)
    c = jnp.cumsum(p, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)[:, None] * c[:, -1:]
    V = filt.shape[-1]
    tok = jnp.sum(c <= u, axis=-1)
    last = V - 1 - jnp.argmax((p > 0)[:, ::-1], axis=-1)
    return jnp.where(tok >= V, last, tok).astype(jnp.int32)


# ---- the jitted program ---------------------------------------------------------------------------
def _generate_impl(params, tokens, positions, segment_ids, prompt_lens, active, rng, temperature, top_p,
                   min_new, max_new, greedy, end_ids, pad_id, *, cfg: ModelConfig, new_len: int, top_k: int,
                   use_top_p: bool):
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + new_len)
    shard_cache = lambda c: {k: constrain(v, CACHE_AXES[k]) for k, v in c.items()}  # noqa: E731
    cache = shard_cache(cache)
    hidden, cache = forward(params, tokens, positions, segment_ids, cfg, cache=cache, cache_index=0)
    logits = lm_logits(params, hidden[:, -1:], cfg)[:, 0]
    rows = jnp.arange(B)

    def cond(c):
        return (c["i"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        i, logits, done = c["i"], c["logits"], c["done"]
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, i), r))(rows)
        tok, lp, lpt = sample_tokens(logits, keys, temperature, greedy, suppress=jnp.broadcast_to(i < min_new, (B,)),
                                     end_ids=end_ids, top_k=top_k, top_p=top_p if use_top_p else None)
        alive = ~done
        lp = jnp.where(alive, lp, 0.0)
        lpt = jnp.where(alive, lpt, 0.0)
        tok = jnp.where(alive, tok, pad_id)
        ended = alive & jnp.isin(tok, end_ids)
        seg = alive.astype(jnp.int32)[:, None]
        hidden, cache = forward(params, tok[:, None], (prompt_lens + i)[:, None], seg, cfg,
                                cache=c["cache"], cache_index=P + i)
        return dict(
            i=i + 1, cache=shard_cache(cache), logits=lm_logits(params, hidden, cfg)[:, 0], done=done | ended,
            tokens=c["tokens"].at[:, i].set(tok), logprobs=c["logprobs"].at[:, i].set(lp),
            logprobs_tempered=c["logprobs_tempered"].at[:, i].set(lpt), lengths=c["lengths"] + alive,
            ended=c["ended"] | ended)

    init = dict(i=jnp.int32(0), cache=cache, logits=logits, done=~active,
                tokens=jnp.full((B, new_len), pad_id, jnp.int32), logprobs=jnp.zeros((B, new_len), jnp.float32),
                logprobs_tempered=jnp.zeros((B, new_len), jnp.float32), lengths=jnp.zeros((B,), jnp.int32),
                ended=jnp.zeros((B,), bool))
    out = jax.lax.while_loop(cond, body, init)
    return {"tokens": out["tokens"], "logprobs": out["logprobs"], "logprobs_tempered": out["logprobs_tempered"],
            "lengths": out["lengths"], "ended_with_eos": out["ended"], "steps": out["i"]}


def _compiled(cfg, mesh, rules, **static):
    # Where the weights came from does not change the program: one compile per architecture.
    cfg = dataclasses.replace(cfg, init_from=None, hf_path=None, tokenizer="")
    key = (repr(cfg), mesh, tuple(sorted((k, str(v)) for k, v in rules.items())), tuple(sorted(static.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = jax.jit(partial(_generate_impl, cfg=cfg, **static))
    return fn


def prepare_prompts(prompt_ids, prompt_mask=None, *, pad_id: int = 0, batch: Optional[int] = None,
                    length: Optional[int] = None):
    """Left-pad prompts into numpy ``tokens, positions, segment_ids [batch, length]``, ``lengths [batch]``.

    ``prompt_ids``: a list of token lists, or a 2-D array with ``prompt_mask`` (1 = real token, any
    padding side). Rows beyond the real batch are dummy one-token prompts (length 0 in ``lengths``).
    """
    if prompt_mask is not None:
        ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
        rows = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
    else:
        rows = [list(map(int, r)) for r in prompt_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    batch = batch or len(rows)
    length = length or max(map(len, rows))
    tokens = np.full((batch, length), pad_id, np.int32)
    positions = np.zeros((batch, length), np.int32)
    seg = np.zeros((batch, length), np.int32)
    lens = np.zeros((batch,), np.int32)
    for b in range(batch):
        r = rows[b] if b < len(rows) else [pad_id]
        n = len(r)
        tokens[b, length - n:] = r
        positions[b, length - n:] = np.arange(n)
        seg[b, length - n:] = 1
        lens[b] = n if b < len(rows) else 0
    return tokens, positions, seg, lens


def generate(params, cfg: ModelConfig, prompt_ids, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_ids: Sequence[int] = (), stop_ids: Sequence[int] = (), pad_id: int = 0, rng=0,
             prompt_mask=None, mesh=None, rules=DEFAULT_RULES, prompt_bucket: int = 64,
             batch_bucket: bool = True, new_bucket: Optional[int] = None, return_device: bool = False) -> dict:
    """Sample continuations of a batch of prompts; returns numpy arrays (see the module docstring).

    tokens/logprobs/logprobs_tempered [B, max_new_tokens], lengths [B] (generated tokens including the
    end token), ended_with_eos [B]. ``rng``: an int seed or a JAX key. With ``mesh``, params should be
    sharded by ``param_shardings``; the batch and the KV cache are sharded over (data, fsdp) and the kv
    heads over tensor by ``rules``. On several processes, call with the same prompts everywhere.
    Buckets: batch -> power of two (times the data-parallel size), prompt -> multiple of
    ``prompt_bucket``, new tokens -> power of two, or ``new_bucket`` when given (the KV cache holds
    prompt bucket + new bucket slots; decoding stops as soon as every row has ended).

    ``return_device=True`` keeps everything on the devices, in the bucketed shapes (rows beyond the real
    batch are inactive, with length 0), and adds the left-padded prompt block the sampler used:
    ``prompt_tokens``, ``prompt_positions``, ``prompt_segment_ids`` [B, P], ``prompt_lengths`` [B] (jalign's
    rollout layout: ``jalign.rollout.experience.rollout_rows`` turns it into training rows on device).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        greedy, temperature = True, 1.0
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    n_rows = len(prompt_ids)
    longest = int(np.max(np.sum(np.asarray(prompt_mask), -1))) if prompt_mask is not None else max(
        len(r) for r in prompt_ids)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}")
    dp = 1
    if mesh is not None:
        spec = logical_to_spec(("batch",), rules)[0]
        for a in (spec if isinstance(spec, tuple) else (spec,)) if spec else ():
            dp *= mesh.shape[a]
    B = _round_up(_pow2(n_rows), dp) if batch_bucket else n_rows
    P = _round_up(longest, prompt_bucket)
    N = _pow2(max_new_tokens, 8) if new_bucket is None else max(int(new_bucket), max_new_tokens)
    tokens, positions, seg, lens = prepare_prompts(prompt_ids, prompt_mask, pad_id=pad_id, batch=B, length=P)
    active = np.arange(B) < n_rows
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    ends = sorted(set(map(int, eos_ids)) | set(map(int, stop_ids)))
    end_arr = np.full((_pow2(len(ends), 4),), -1, np.int32)  # padded with -1: no recompile per stop set
    end_arr[:len(ends)] = ends
    fn = _compiled(cfg, mesh, rules, new_len=N, top_k=int(top_k), use_top_p=top_p < 1.0)
    args = (tokens, positions, seg, lens, active)
    scalars = (key, jnp.float32(temperature), jnp.float32(top_p), jnp.int32(min_new_tokens),
               jnp.int32(max_new_tokens), jnp.bool_(greedy), jnp.asarray(end_arr), jnp.int32(pad_id))
    if mesh is None:
        args = tuple(jnp.asarray(a) for a in args)
        out = fn(params, *args, *scalars)
    else:
        spec = logical_to_spec(("batch",), rules) if B % dp == 0 else PartitionSpec()
        args = tuple(jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i, a=a: a[i])
                     for a in args)
        with use_rules(mesh, rules):
            out = fn(params, *args, *scalars)
    if return_device:
        return dict(out, prompt_tokens=args[0], prompt_positions=args[1], prompt_segment_ids=args[2],
                    prompt_lengths=args[3])
    out = {k: _to_host(v) for k, v in out.items()}
    res = {k: out[k][:n_rows, :max_new_tokens] for k in ("tokens", "logprobs", "logprobs_tempered")}
    res.update(lengths=out["lengths"][:n_rows], ended_with_eos=out["ended_with_eos"][:n_rows],
               steps=int(out["steps"]))
    return res


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def compiled_cache_size() -> int:
    """Executables compiled so far across all memoised generate functions (for tests / benchmarks)."""
    return sum(fn._cache_size() for fn in _COMPILED.values())


# ---- CLI: jalign generate -------------------------------------------------------------------------
def _load_model(spec: str, seed: int):
    """(params, cfg, tokenizer spec, default chat template) from an HF directory, a jalign run (its own newest
    checkpoint), a ``jalign convert --out`` directory or a jalign YAML config; weights through the one loader."""
    from pathlib import Path

    from jalign.config import ConfigError, load_config
    from jalign.models import load
    from jalign.models.architecture import resolve_architecture, source_with_tokenizer
    from jalign.models.params import DTYPES
    from jalign.models.transformer import declare_params
    from sharding.mesh import make_mesh
    from sharding.rules import make_rules

    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"--model {spec}: no such file or directory (expected a Hugging Face directory, a "
                          "training run directory or a jalign YAML config)")
    if p.is_dir() and not (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        raise ConfigError(f"--model {spec}: a directory with neither config.json (Hugging Face) nor config.yaml "
                          "(a jalign run or `jalign convert --out` directory)")
    mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    rules = make_rules()

    def weights(source, cfg):
        return load.load_params(source, declare_params(cfg), mesh=mesh, rules=rules, dtype=DTYPES[cfg.param_dtype],
                                seed=seed, role="model", where="--model", log=lambda *_: None)

    if p.is_dir() and (p / "config.json").is_file():
        source = load.parse_source(f"hf:{p}", where="--model")
        cfg = source_with_tokenizer(load.source_architecture(source, where="--model"), source)
        # the same rule as training's default data.chat_template: the tokenizer's own template, if any
        return weights(source, cfg), cfg, cfg.tokenizer, "auto"
    if p.is_dir():  # a training run (its own newest checkpoint, not the weights it started from) or a convert dir
        full = load_config(p / "config.yaml")
        return weights(load.parse_source(f"run:{p}", where="--model"), full.model), full.model, \
            full.model.tokenizer, full.data.chat_template
    full = load_config(spec)
    resolve_architecture(full)
    cfg, template = full.model, full.data.chat_template
    from jalign.roles import policy_source

    _, source = policy_source(full)
    if source.kind == "random":
        print("jalign generate: no model.hf_path / model.init_from: using random weights", file=sys.stderr)
    return weights(source, cfg), cfg, cfg.tokenizer, template


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="jalign generate", description="Sample continuations of prompts.")
    ap.add_argument("--model", required=True,
                    help="Hugging Face directory, jalign YAML config, or a `jalign convert --out` directory")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ap.add_argument("--prompts", help='JSONL file of {"prompt": ...} lines')
    ap.add_argument("--out", help="write JSONL results here (default: stdout)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--min-new-tokens", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0, help="<= 0 means greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--attributes", help="SteerLM: condition every prompt on these attribute values, e.g. "
                                         "correctness=4,verbosity=0 (rendered in the order the model was trained "
                                         "with, from its steerlm.json)")
    ap.add_argument("--chat-template", help="auto | tiny | none | hf | FILE.jinja (default: a run's "
                                            "data.chat_template; 'auto' for a Hugging Face directory: the "
                                            "tokenizer's own template if it has one, else none)")
    a = ap.parse_args(argv)
    from jalign.data.formats import DataError

    prompts = list(a.prompt)
    if a.prompts:
        with open(a.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(f"{a.prompts}:{n}: expected a JSON object with \"prompt\" ({e!r})") from None
    if not prompts:
        print("jalign generate: give --prompt TEXT or --prompts FILE.jsonl", file=sys.stderr)
        return 2
    params, cfg, tok_spec, template = _load_model(a.model, a.seed)
    from jalign.data.chat import describe_template, encode_prompt
    from jalign.data.tokenizer import check_vocab, load_tokenizer

    tok = load_tokenizer(tok_spec)
    check_vocab(cfg.vocab_size, tok, f"--model {a.model}: the model's vocab_size")
    template = a.chat_template or template
    print(f"jalign generate: {describe_template(template, tok)}", file=sys.stderr)
    eos = sorted(tok.eos_ids)
    pad = tok.pad_id if tok.pad_id is not None else 0
    if a.attributes:
        encoded = _steered(a.model, a.attributes, prompts, tok, template)
    else:
        encoded = [encode_prompt(p, template, tok) for p in prompts]  # template errors before any output
    longest = max(map(len, encoded))
    if longest + a.max_new_tokens > cfg.max_seq_len:
        from jalign.config import ConfigError

        raise ConfigError(f"--max-new-tokens {a.max_new_tokens}: the longest prompt ({longest} tokens) plus the "
                          f"new tokens exceeds the model's max_seq_len={cfg.max_seq_len}")
    with _output(a.out) as out_f:
        for start in range(0, len(prompts), a.batch_size):
            chunk = prompts[start:start + a.batch_size]
            res = generate(params, cfg, encoded[start:start + a.batch_size],
                           max_new_tokens=a.max_new_tokens, min_new_tokens=a.min_new_tokens,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_ids=eos, pad_id=pad,
                           rng=jax.random.fold_in(jax.random.key(a.seed), start))
            for j, p in enumerate(chunk):
                n = int(res["lengths"][j])
                ids = res["tokens"][j, :n].tolist()
                if res["ended_with_eos"][j]:
                    ids = ids[:-1]
                ids = [i for i in ids if i < tok.vocab_size]  # model vocab may be padded past the tokenizer's
                out_f.write(json.dumps({"prompt": p, "response": tok.decode(ids), "num_tokens": n,
                                        "ended_with_eos": bool(res["ended_with_eos"][j])}) + "\n")
    return 0


def _steered(model: str, attributes: str, prompts: list, tok, template) -> list[list[int]]:
    """Prompt ids conditioned on SteerLM attribute values, in the attribute order the model was trained with
    (``steerlm.json`` of a steerlm run or its export; without one, the order given)."""
    from pathlib import Path

    from jalign.data.steer import MAX_VALUE, parse_attribute_values, steered_prompt_ids

    values = parse_attribute_values(attributes)
    record = Path(model) / "steerlm.json"
    info = json.loads(record.read_text()) if Path(model).is_dir() and record.is_file() else {}
    if not info:
        print(f"jalign generate: {model} has no steerlm.json: rendering the attributes in the order given",
              file=sys.stderr)
    order, top = info.get("attributes", list(values)), int(info.get("max_value", MAX_VALUE))
    return [steered_prompt_ids(p, values, tok, template, order, max_value=top) for p in prompts]


@contextlib.contextmanager
def _output(path: Optional[str]):
    """stdout, or ``path`` written through a temporary file renamed over it only once all is written:
    a failure leaves an existing file as it was."""
    if path is None:
        yield sys.stdout
        return
    import os
    from pathlib import Path

    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(2, "no such directory for --out", str(target.parent))
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
