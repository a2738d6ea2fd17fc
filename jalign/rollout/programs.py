"""The engine's device programs: state layout, ``refill`` (admit slots + chunked prefill) and ``decode``.

Device state (a dict, donated to every program, never leaves the devices between calls; S slots =
DP shards x slots per shard, the slots of shard d contiguous):

    k, v          [DP, L, KV, P, page_size, hd]  the page pools (``paged.PAGE_AXES``)
    table         [S, max_pages]                 page table per slot (page ids local to its shard)
    length        [S]  tokens in the slot's cache = sequence position of the next token
    i             [S]  tokens generated so far;   live [S] decoding;   eos [S] ended on an end token
    logits        [S, V] next-token logits (vocab over "tensor")
    temperature, greedy, top_k, top_p, min_new, max_new [S], ends [S, E] (-1 padded), key [S, 2], stream [S]

Sampling at a slot's i-th new token draws from ``fold_in(fold_in(key, i), stream)`` exactly like
``jalign.generate`` row ``stream`` with rng ``key``, so a request's sample depends on its own key and
stream only, never on its slot or the other requests.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jalign.config import ModelConfig
from jalign.generate import sample_tokens
from jalign.models.params import DTYPES
from jalign.models.transformer import forward, lm_logits
from jalign.rollout.paged import PAGE_AXES, PagedView, write_index
from sharding.rules import constrain, logical_to_spec, use_rules

SLOT_FIELDS = ("table", "length", "temperature", "greedy", "top_k", "top_p", "min_new", "max_new", "ends", "key",
               "stream")  # what an admission sets (besides i = 0, live, eos = False, and the prefill's logits)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every static shape of the programs (one compile per distinct Layout, refill rows and width)."""
    dp: int  # data-parallel shards
    slots: int  # slots per shard
    pages: int  # pages per shard, the trash page included
    page_size: int
    max_pages: int  # page-table width: pages of the longest sequence
    prompt_pages: int  # page-table width of prefill rows (covers the longest prompt)
    chunk: int  # prefill tokens per row
    steps: int  # decode steps per call (at most)
    top_k_max: int  # 0: no request uses top-k
    use_top_p: bool
    end_width: int
    key_shape: tuple
    split_layers: bool = False  # slice the stacked layer weights once per call (CPU: no per-step copies)
    sampler: str = "inverse_cdf"  # jalign.generate.sample_tokens method

    @property
    def num_slots(self) -> int:
        return self.dp * self.slots


def state_axes(lay: Layout) -> dict:
    slot = ("batch",)
    return {"k": PAGE_AXES, "v": PAGE_AXES, "table": ("batch", None), "length": slot, "i": slot, "live": slot,
            "eos": slot, "logits": ("batch", "vocab"), "temperature": slot, "greedy": slot, "top_k": slot,
            "top_p": slot, "min_new": slot, "max_new": slot, "ends": ("batch", None),
            "key": ("batch",) + (None,) * len(lay.key_shape), "stream": slot}


def state_shapes(lay: Layout, cfg: ModelConfig) -> dict:
    S, f32, i32 = lay.num_slots, jnp.float32, jnp.int32
    pages = jax.ShapeDtypeStruct((lay.dp, cfg.layers, cfg.kv_heads, lay.pages, lay.page_size,
                                  cfg.resolved_head_dim), DTYPES[cfg.dtype])
    sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    return {"k": pages, "v": pages, "table": sd((S, lay.max_pages), i32), "length": sd((S,), i32),
            "i": sd((S,), i32), "live": sd((S,), bool), "eos": sd((S,), bool), "logits": sd((S, cfg.vocab_size), f32),
            "temperature": sd((S,), f32), "greedy": sd((S,), bool), "top_k": sd((S,), i32), "top_p": sd((S,), f32),
            "min_new": sd((S,), i32), "max_new": sd((S,), i32), "ends": sd((S, lay.end_width), i32),
            "key": sd((S,) + tuple(lay.key_shape), jnp.uint32), "stream": sd((S,), i32)}


def array_sharding(mesh, rules, axes, shape) -> NamedSharding:
    """NamedSharding by logical axes, leaving a dimension unsharded where its mesh axes do not divide it
    (the same rule as ``sharding.rules.constrain``)."""
    spec = logical_to_spec(axes, rules)
    fixed = []
    for size, ax in zip(shape, spec):
        n = 1
        for a in (() if ax is None else ax if isinstance(ax, tuple) else (ax,)):
            n *= mesh.shape[a]
        fixed.append(ax if size % n == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fixed))


def state_shardings(lay: Layout, cfg: ModelConfig, mesh, rules) -> dict:
    shapes, axes = state_shapes(lay, cfg), state_axes(lay)
    return {k: array_sharding(mesh, rules, axes[k], shapes[k].shape) for k in shapes}


def _constrain_state(st: dict, lay: Layout) -> dict:
    axes = state_axes(lay)
    return {k: constrain(v, axes[k]) for k, v in st.items()}


# ---- programs -----------------------------------------------------------------------------------
def _layer_params(params: dict, lay: Layout, cfg: ModelConfig) -> dict:
    """With ``split_layers``, the stacked [L, ...] layer weights as L trees, sliced once per call outside the
    decode loop: XLA:CPU otherwise copies each layer's weights out of the stack at every step (about a
    fifth of a tiny-llama decode step). Costs one extra copy of the layer weights while a call runs.
    Left stacked when some leaf is not stacked on the layers (e.g. an adapter or quantisation scale)."""
    L, leaves = cfg.layers, jax.tree.leaves(params["layers"])
    if not lay.split_layers or not all(getattr(x, "ndim", 0) and x.shape[0] == L for x in leaves):
        return params
    return dict(params, layers=[jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(L)])


def _init_impl(*, cfg, lay):
    st = {k: jnp.zeros(s.shape, s.dtype) for k, s in state_shapes(lay, cfg).items()}
    st["temperature"] = jnp.ones_like(st["temperature"])
    st["ends"] = jnp.full_like(st["ends"], -1)
    return _constrain_state(st, lay)


def _refill_impl(state, params, adm, rows, *, cfg: ModelConfig, lay: Layout):
    """Admit slots (``adm["admit"]`` [S] with the SLOT_FIELDS of the new requests), then prefill
    ``rows`` ([DP * R, chunk] tokens at sequence ``positions``, ``valid``, their page ``table``
    [DP * R, prompt_pages]); a row with ``target`` >= 0 (a slot of its shard) ends its sequence's
    prompt: its ``last`` token's logits become that slot's next-token logits."""
    st = dict(state)
    params = _layer_params(params, lay, cfg)
    admit = adm["admit"]
    for k in SLOT_FIELDS:
        a = adm[k]
        st[k] = jnp.where(admit.reshape(admit.shape + (1,) * (a.ndim - 1)), a, st[k])
    st["i"] = jnp.where(admit, 0, st["i"])
    st["live"] = st["live"] | admit
    st["eos"] = st["eos"] & ~admit
    valid = rows["valid"]
    view = PagedView((st["k"], st["v"]), rows["table"], write_index(rows["table"], rows["positions"], valid,
                                                                  lay.page_size))
    hidden, (st["k"], st["v"]) = forward(params, rows["tokens"], rows["positions"], valid.astype(jnp.int32), cfg,
                                         paged=view)
    last = jnp.take_along_axis(hidden, rows["last"][:, None, None], axis=1)  # [DP*R, 1, D]
    logits = lm_logits(params, last, cfg)[:, 0]
    R = logits.shape[0] // lay.dp
    target = jnp.where(rows["target"] >= 0, rows["target"], lay.slots).reshape(lay.dp, R)  # -> dropped
    per_shard = st["logits"].reshape(lay.dp, lay.slots, -1)
    per_shard = jax.vmap(lambda dst, i, x: dst.at[i].set(x, mode="drop"))(
        per_shard, target, logits.reshape(lay.dp, R, -1))
    st["logits"] = per_shard.reshape(st["logits"].shape)
    return _constrain_state(st, lay)


def _decode_impl(state, params, n_steps, exit_on_free, *, cfg: ModelConfig, lay: Layout, width: int):
    """Up to ``n_steps`` decode steps of every live slot (one token each), stopping early once no slot
    is live, or (``exit_on_free``) once a slot has finished so the host can refill it. Attention reads
    the first ``width`` pages of each table (static; the host picks a bucket covering every write).

    Returns (state, {tokens, logprobs, logprobs_tempered} [S, steps] and info [S, 3] = (i, live, eos)
    after the call, steps run).
    """
    S, N = lay.num_slots, lay.steps
    params = _layer_params(params, lay, cfg)
    table = state["table"][:, :width]
    top_k = state["top_k"] if lay.top_k_max else 0

    def cond(c):
        return (c["t"] < n_steps) & jnp.any(c["st"]["live"]) & ~(exit_on_free & c["freed"])

    def body(c):
        st, t = dict(c["st"]), c["t"]
        live, i = st["live"], st["i"]
        keys = jax.vmap(lambda kd, n, s: jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(kd), n), s))(
            st["key"], i, st["stream"])
        tok, lp, lpt = sample_tokens(st["logits"], keys, st["temperature"][:, None], st["greedy"] | ~live,
                                     suppress=i < st["min_new"], end_ids=st["ends"], top_k=top_k,
                                     top_k_max=lay.top_k_max, top_p=st["top_p"] if lay.use_top_p else None,
                                     method=lay.sampler)
        ended = live & jnp.any(tok[:, None] == st["ends"], axis=-1)
        finished = live & (ended | (i + 1 >= st["max_new"]))
        pos = st["length"][:, None]
        view = PagedView((st["k"], st["v"]), table, write_index(table, pos, live[:, None], lay.page_size))
        hidden, (st["k"], st["v"]) = forward(params, tok[:, None], pos, live[:, None].astype(jnp.int32), cfg,
                                             paged=view)
        st["logits"] = lm_logits(params, hidden, cfg)[:, 0]
        st["length"] = st["length"] + live
        st["i"] = i + live
        st["live"] = live & ~finished
        st["eos"] = st["eos"] | ended
        out = {"tokens": c["out"]["tokens"].at[:, t].set(tok),
               "logprobs": c["out"]["logprobs"].at[:, t].set(jnp.where(live, lp, 0.0)),
               "logprobs_tempered": c["out"]["logprobs_tempered"].at[:, t].set(jnp.where(live, lpt, 0.0))}
        return {"st": _constrain_state(st, lay), "t": t + 1, "freed": c["freed"] | jnp.any(finished), "out": out}

    out0 = {"tokens": jnp.zeros((S, N), jnp.int32), "logprobs": jnp.zeros((S, N), jnp.float32),
            "logprobs_tempered": jnp.zeros((S, N), jnp.float32)}
    out0 = {k: constrain(v, ("batch", None)) for k, v in out0.items()}
    c = jax.lax.while_loop(cond, body, {"st": state, "t": jnp.int32(0), "freed": jnp.bool_(False), "out": out0})
    st = c["st"]
    info = jnp.stack([st["i"], st["live"].astype(jnp.int32), st["eos"].astype(jnp.int32)], axis=-1)
    return st, dict(c["out"], info=constrain(info, ("batch", None))), c["t"]


# ---- compiled, memoised per static layout -------------------------------------------------------
_COMPILED: dict = {}


class Programs:
    """The jitted init / refill / decode of one (model architecture, mesh, rules, Layout)."""

    def __init__(self, cfg: ModelConfig, lay: Layout, mesh=None, rules=None):
        self.cfg, self.lay, self.mesh, self.rules = cfg, lay, mesh, rules
        sh = state_shardings(lay, cfg, mesh, rules) if mesh is not None else None
        self.state_sharding = sh
        kw = {} if mesh is None else {"out_shardings": sh}
        self._init = jax.jit(partial(_init_impl, cfg=cfg, lay=lay), **kw)
        self._refill = jax.jit(partial(_refill_impl, cfg=cfg, lay=lay), donate_argnums=(0,),
                               **({} if mesh is None else {"out_shardings": sh}))
        self._decode: dict = {}

    def _ctx(self):
        import contextlib

        return use_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def init(self) -> dict:
        with self._ctx():
            return self._init()

    def refill(self, state, params, adm, rows):
        with self._ctx():
            return self._refill(state, params, adm, rows)

    @property
    def refill_fn(self):
        """The jitted refill (trace it under ``use_rules(mesh, rules)``)."""
        return self._refill

    def decode(self, state, params, n_steps: int, exit_on_free: bool, width: int):
        fn = self.decode_fn(width)
        with self._ctx():
            return fn(state, params, jnp.int32(n_steps), jnp.bool_(exit_on_free))

    def decode_fn(self, width: int):
        """The jitted decode reading ``width`` page-table columns (one compile per width)."""
        fn = self._decode.get(width)
        if fn is None:
            kw = {}
            if self.mesh is not None:
                S = self.lay.num_slots
                out = array_sharding(self.mesh, self.rules, ("batch", None), (S, self.lay.steps))
                outs = {k: out for k in ("tokens", "logprobs", "logprobs_tempered")}
                outs["info"] = array_sharding(self.mesh, self.rules, ("batch", None), (S, 3))
                kw["out_shardings"] = (self.state_sharding, outs, NamedSharding(self.mesh, PartitionSpec()))
            fn = self._decode[width] = jax.jit(partial(_decode_impl, cfg=self.cfg, lay=self.lay, width=width),
                                               donate_argnums=(0,), **kw)
        return fn

    def cache_size(self) -> int:
        return self._init._cache_size() + self._refill._cache_size() + sum(
            f._cache_size() for f in self._decode.values())


def programs(cfg: ModelConfig, lay: Layout, mesh=None, rules=None) -> Programs:
    # Where the weights came from does not change the program: one compile per architecture.
    cfg = dataclasses.replace(cfg, init_from=None, hf_path=None, tokenizer="")
    key = (repr(cfg), lay, mesh, None if rules is None else tuple(sorted((k, str(v)) for k, v in rules.items())))
    p = _COMPILED.get(key)
    if p is None:
        p = _COMPILED[key] = Programs(cfg, lay, mesh, rules)
    return p


def compiled_cache_size() -> int:
    """Executables compiled so far by every engine program (for tests / benchmarks)."""
    return sum(p.cache_size() for p in _COMPILED.values())


def device_put_tree(tree: dict, mesh, rules, axes: dict, local: Optional[object] = None) -> dict:
    """Host numpy arrays (full global shape; on several processes only this process's rows need be
    right) -> jax arrays with the given logical axes."""
    import numpy as np

    if mesh is None:
        return {k: jnp.asarray(v) for k, v in tree.items()}
    out = {}
    for k, v in tree.items():
        v = np.asarray(v)
        s = array_sharding(mesh, rules, axes[k], v.shape)
        out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
    return out
