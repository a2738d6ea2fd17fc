"""Continuous-batching decode engine: a fixed number of slots over a paged KV cache, refilled as requests end.

    eng = Engine(params, cfg, slots=16, page_size=16, mesh=mesh)
    results = eng.run([Request(prompt=[1, 5, 9], max_new_tokens=64, temperature=0.7, top_p=0.9, key=0), ...])
    results[r].tokens, .logprobs, .logprobs_tempered, .length, .ended_with_eos        # in request order
    eng.stats   # decode steps / calls, ms per step, slot occupancy, prefill rows and tokens, ...

The host scheduler runs two jitted programs (``jalign.rollout.programs``) on device state that stays on
the devices and is donated between calls:

* ``refill``: admit waiting requests into free slots (FIFO) and prefill their prompts in rows of
  ``prefill_chunk`` tokens written straight into the slots' pages; the last prompt token's logits
  become the slot's next-token logits.
* ``decode``: up to ``steps_per_call`` steps of one token for every live slot, leaving early as soon as
  a slot ends while requests wait, so the host can refill it.

A request ends at its first end token (``end_ids``: EOS and stop ids; the token is kept and counted,
``ended_with_eos``), or after ``max_new_tokens``; ``min_new_tokens`` masks the end tokens before that.
Sampling and both log-probs are ``jalign.generate``'s (``sample_tokens``): ``logprobs`` under the
filtered distribution, ``logprobs_tempered`` = log_softmax(z / T)[token]. Token i of a request is drawn
from ``fold_in(fold_in(key, i), stream)``: with ``sampler="gumbel"`` exactly what ``generate(rng=key)``
draws for row ``stream``; the default ``sampler="inverse_cdf"`` draws from the same distribution with
one uniform per token (several times cheaper on CPU; other samples for the same seed).

Pages: each slot holds ceil((prompt + max_new_tokens) / page_size) pages from its shard's pool from
admission to its end (admission waits while the pool is short, so a running slot never needs more).
Prefix sharing: requests with the same prompt on one shard (the K samples of a GRPO/RLOO prompt)
share its first ((len - 1) // page_size) full pages, prefilled once (refcounted by ``PagePool``); each
sample prefills only its own tail (1 to page_size tokens) in a private page, which also yields its
logits, so no page is ever copied and a later sample of the prompt can join at any time.

Several processes: every process calls ``run`` together, each with its *own* requests; a process
schedules only the slots of its own data-parallel shards, and the processes agree once per step on
the shapes of the next call (one small all-gather), so no rollout crosses hosts.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jalign.config import ModelConfig
from jalign.rollout import programs as prog
from jalign.rollout.paged import TRASH_PAGE, PageError, PagePool
from sharding.rules import DEFAULT_RULES, logical_to_spec


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to generate. ``temperature <= 0`` or ``greedy`` takes the argmax of the filtered
    distribution (log-probs then reported at T = 1). ``key``: int seed or a JAX key."""
    prompt: Sequence[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    end_ids: Sequence[int] = ()
    key: Any = 0
    stream: int = 0


@dataclasses.dataclass
class Result:
    tokens: np.ndarray  # int32 [length]
    logprobs: np.ndarray  # float32 [length]
    logprobs_tempered: np.ndarray
    ended_with_eos: bool

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass
class _Slot:
    request: int
    held: list  # pages this slot holds a reference to, in sequence order
    prefix: Optional[tuple]  # key of the shared prefix it reads, if any
    length: int  # tokens in the cache
    end: int  # prompt + max_new_tokens: the cache never grows past it
    chunks: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Prefix:
    pages: list
    tokens: int
    users: int = 0


class _Shard:
    def __init__(self, index: int, slots: int, pages: int):
        self.index = index
        self.pool = PagePool(pages)
        self.slots: list[Optional[_Slot]] = [None] * slots
        self.prefixes: dict[tuple, _Prefix] = {}

    def free_slots(self) -> list[int]:
        return [s for s, x in enumerate(self.slots) if x is None]


def _pow2(n: int, minimum: int = 1) -> int:
    return 1 << (max(int(n), minimum) - 1).bit_length()


def _key_data(key) -> np.ndarray:
    k = jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key
    if not jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key):
        k = jax.random.wrap_key_data(k)
    return np.asarray(jax.random.key_data(k), np.uint32)


def local_numpy(x) -> np.ndarray:
    """A jax array on the host; on several processes the non-addressable rows are left as zeros."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)
    out = np.zeros(x.shape, x.dtype)
    for s in x.addressable_shards:
        out[s.index] = np.asarray(s.data)
    return out


def _agree_max(values: Sequence[int]) -> list[int]:
    """Elementwise max over processes (the shapes of the next call must be the same everywhere)."""
    if jax.process_count() == 1:
        return [int(v) for v in values]
    from jax.experimental import multihost_utils

    g = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return [int(v) for v in g.reshape(jax.process_count(), -1).max(0)]


class Engine:
    """Slots x paged KV cache decode engine on ``params`` (sharded by ``param_shardings`` on ``mesh``).

    slots: total slots (a multiple of the data-parallel size; each shard serves slots / dp).
    page_size: tokens per page. prefill_chunk: tokens per prefill row (default page_size).
    steps_per_call: decode steps per device call at most. pages_per_shard: page pool per shard incl. the
    trash page (default: every slot can hold the longest sequence, so pages never hold admission back).
    prefill_rows: rows per refill call per shard at most (more rows take several calls).
    prefix_sharing: share prompt pages between requests with identical prompts.
    check_pages: verify the page accounting (host and device tables) after every step (tests).
    split_layers: slice the stacked layer weights once per device call (default: on CPU, where XLA
    copies them out of the stack at every step otherwise; costs a copy of the weights during a call).
    sampler: "inverse_cdf" (default: one uniform per token; the Gumbel noise of one entry per vocabulary
    word cost more than the whole tiny-llama step at 32 slots on CPU) or "gumbel" (``jalign.generate``'s
    draws, sample for sample, for the same key and stream). Both sample the same filtered distribution.
    """

    def __init__(self, params, cfg: ModelConfig, *, slots: int = 16, page_size: int = 16,
                 prefill_chunk: Optional[int] = None, steps_per_call: int = 32, pages_per_shard: Optional[int] = None,
                 prefill_rows: int = 32, prefix_sharing: bool = True, mesh=None, rules=DEFAULT_RULES,
                 check_pages: bool = False, split_layers: Optional[bool] = None, sampler: str = "inverse_cdf"):
        self.params, self.cfg, self.mesh, self.rules = params, cfg, mesh, dict(rules)
        self.dp = 1
        if mesh is not None:
            spec = logical_to_spec(("batch",), rules)[0]
            for a in (spec if isinstance(spec, tuple) else (spec,)) if spec else ():
                self.dp *= mesh.shape[a]
        if slots < 1 or slots % self.dp:
            raise ValueError(f"Engine: slots={slots} must be a positive multiple of the data-parallel size {self.dp}")
        if page_size < 1 or steps_per_call < 1 or prefill_rows < 1:
            raise ValueError("Engine: page_size, steps_per_call and prefill_rows must be >= 1")
        self.slots_per_shard = slots // self.dp
        self.page_size = page_size
        self.chunk = prefill_chunk or page_size
        self.steps = steps_per_call
        self.pages_per_shard = pages_per_shard
        self.prefill_rows = prefill_rows
        self.prefix_sharing = prefix_sharing
        self.check_pages = check_pages
        self.split_layers = jax.default_backend() == "cpu" if split_layers is None else bool(split_layers)
        if sampler not in ("gumbel", "inverse_cdf"):
            raise ValueError(f"Engine: sampler must be 'gumbel' or 'inverse_cdf', got {sampler!r}")
        self.sampler = sampler
        self.local_shards = self._local_shards()
        self.stats: dict = {}

    def _local_shards(self) -> list[int]:
        if self.mesh is None:
            return [0]
        s = prog.array_sharding(self.mesh, self.rules, ("batch",), (self.dp,))
        return sorted({i for sl in s.addressable_devices_indices_map((self.dp,)).values()
                       for i in range(*sl[0].indices(self.dp))})

    # ---- layout -------------------------------------------------------------------------------
    def _validate(self, requests: Sequence[Request]) -> None:
        V, limit = self.cfg.vocab_size, self.cfg.max_seq_len
        for r, q in enumerate(requests):
            where = f"request {r}"
            if len(q.prompt) == 0:
                raise ValueError(f"{where}: the prompt is empty (every prompt needs at least one token)")
            if q.max_new_tokens < 1:
                raise ValueError(f"{where}: max_new_tokens must be >= 1, got {q.max_new_tokens}")
            if not 0.0 < q.top_p <= 1.0:
                raise ValueError(f"{where}: top_p must be in (0, 1], got {q.top_p}")
            if q.top_k < 0:
                raise ValueError(f"{where}: top_k must be >= 0, got {q.top_k}")
            if len(q.prompt) + q.max_new_tokens > limit:
                raise ValueError(f"{where}: prompt ({len(q.prompt)}) + max_new_tokens ({q.max_new_tokens}) exceeds "
                                 f"model.max_seq_len={limit}")
            bad = [t for t in q.prompt if not 0 <= int(t) < V]
            if bad:
                raise ValueError(f"{where}: prompt token {bad[0]} is outside the vocabulary [0, {V})")

    def _layout(self, requests: Sequence[Request]) -> prog.Layout:
        ps = self.page_size
        local = [max((len(q.prompt) + q.max_new_tokens for q in requests), default=1),
                 max((len(q.prompt) for q in requests), default=1),
                 max((q.top_k for q in requests), default=0),
                 int(any(q.top_p < 1.0 for q in requests)),
                 max((len(set(q.end_ids)) for q in requests), default=0)]
        max_len, max_prompt, top_k, top_p, ends = _agree_max(local)
        max_pages = -(-_pow2(max_len, 2 * ps) // ps)
        pages = self.pages_per_shard or 1 + self.slots_per_shard * max_pages
        if pages - 1 < -(-max_len // ps):
            raise PageError(f"Engine: pages_per_shard={pages} cannot hold the longest request "
                            f"({max_len} tokens = {-(-max_len // ps)} pages of {ps} + the trash page)")
        return prog.Layout(dp=self.dp, slots=self.slots_per_shard, pages=pages, page_size=ps, max_pages=max_pages,
                           prompt_pages=-(-_pow2(max_prompt, ps) // ps), chunk=self.chunk, steps=self.steps,
                           top_k_max=_pow2(top_k) if top_k else 0, use_top_p=bool(top_p),
                           end_width=_pow2(ends, 4), key_shape=tuple(_key_data(0).shape),
                           split_layers=self.split_layers, sampler=self.sampler)

    def largest_calls(self, requests: Sequence[Request]) -> tuple[prog.Layout, int, int]:
        """What ``run(requests)`` compiles at most, without running anything (``jalign plan``): its Layout,
        the prefill rows per shard of its largest refill call (the first admission, every slot free) and the
        widest page window a decode call reads (a slot about to end its longest request)."""
        requests = list(requests)
        self._validate(requests)
        lay = self._layout(requests)
        shards = {d: _Shard(d, lay.slots, lay.pages) for d in self.local_shards}
        remaining = collections.Counter(tuple(map(int, q.prompt)) for q in requests)
        _, rows = self._admit(requests, collections.deque(range(len(requests))), remaining, shards, lay)
        n_rows = max((len(v) for v in rows.values()), default=0)
        longest = max((len(q.prompt) + q.max_new_tokens for q in requests), default=1)
        quantum = -(-128 // lay.page_size)  # as _width
        width = min(-(-(-(-longest // lay.page_size)) // quantum) * quantum, lay.max_pages)
        return lay, min(_pow2(n_rows, 4), _pow2(self.prefill_rows)), width

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Serve ``requests`` (this process's own); returns their results in request order."""
        t_start = time.perf_counter()
        requests = list(requests)
        self._validate(requests)
        lay = self._layout(requests)
        self.lay = lay
        self.programs = prog.programs(self.cfg, lay, self.mesh, self.rules if self.mesh is not None else None)
        shards = {d: _Shard(d, lay.slots, lay.pages) for d in self.local_shards}
        self._requests, self._shards = requests, shards
        state = self.programs.init()
        queue = collections.deque(range(len(requests)))
        remaining = collections.Counter(tuple(map(int, q.prompt)) for q in requests)
        results: list[Optional[Result]] = [None] * len(requests)
        st = collections.Counter()
        t_dec = t_ref = 0.0
        while True:
            adm, rows = self._admit(requests, queue, remaining, shards, lay)
            st["pages_peak"] = max(st["pages_peak"], sum(sh.pool.capacity - sh.pool.free for sh in shards.values()))
            n_rows = max((len(v) for v in rows.values()), default=0)
            width = self._width(shards, lay)
            work = int(bool(queue) or any(s is not None for sh in shards.values() for s in sh.slots))
            work, n_rows, width, pending = _agree_max([work, n_rows, width, int(bool(queue))])
            if not work:
                break
            t0 = time.perf_counter()
            start, cap = 0, _pow2(self.prefill_rows)
            while start < n_rows:  # rows of one sequence in call order: later chunks see earlier ones
                R = min(_pow2(n_rows - start, 4), cap)
                state = self.programs.refill(state, self.params, *self._refill_inputs(
                    adm if start == 0 else None, rows, start, R, lay))
                st["refill_calls"] += 1
                st["prefill_rows"] += sum(len(v[start:start + R]) for v in rows.values())
                st["prefill_tokens"] += sum(r["count"] for v in rows.values() for r in v[start:start + R])
                start += R
            t1 = time.perf_counter()
            state, out, steps = self.programs.decode(state, self.params, lay.steps, bool(pending), width)
            if jax.process_count() > 1:
                out, steps = {k: local_numpy(v) for k, v in out.items()}, int(local_numpy(steps))
            else:
                out, steps = jax.device_get(out), int(steps)  # waits for the call
            t2 = time.perf_counter()
            t_ref, t_dec = t_ref + t1 - t0, t_dec + t2 - t1
            st["decode_calls"] += 1
            st["decode_steps"] += steps
            st["generated"] += self._collect(out, shards, requests, results, remaining, lay)
            if self.check_pages:
                self.check(shards, state, lay)
        total = time.perf_counter() - t_start
        local_slots = lay.slots * len(self.local_shards)
        self.stats = dict(st, requests=len(requests), time_total=total, time_decode=t_dec, time_refill=t_ref,
                          time_host=total - t_dec - t_ref,
                          ms_per_step=1e3 * t_dec / max(st["decode_steps"], 1),
                          slot_occupancy=st["generated"] / max(st["decode_steps"] * local_slots, 1),
                          tokens_per_s=st["generated"] / max(total, 1e-9))
        self.final_state = state if self.check_pages else None
        self._requests = self._shards = None
        return results

    def _need(self, q: Request, shared: int) -> int:
        return -(-(len(q.prompt) + q.max_new_tokens) // self.page_size) - shared

    def _admit(self, requests, queue, remaining, shards, lay):
        """FIFO admission into free slots. Returns ({global slot: request}, {shard: prefill rows})."""
        ps = self.page_size
        adm: dict[int, int] = {}
        rows: dict[int, list] = {d: [] for d in shards}
        free = {d: sh.free_slots() for d, sh in shards.items()}
        while queue:
            r = queue[0]
            q = requests[r]
            key = tuple(map(int, q.prompt))
            P = len(key)
            share_pages = (P - 1) // ps if self.prefix_sharing else 0
            choice = None
            for d in sorted(shards, key=lambda d: (key not in shards[d].prefixes, -len(free[d]))):
                if not free[d]:
                    continue
                sh = shards[d]
                if share_pages and key in sh.prefixes:
                    plan = ("join", self._need(q, share_pages))
                elif share_pages and remaining[key] > 1:
                    plan = ("new", self._need(q, 0))
                else:
                    plan = ("alone", self._need(q, 0))
                if plan[1] <= sh.pool.free:
                    choice = (d, plan[0])
                    break
            if choice is None:
                break  # head of line waits for pages or slots
            queue.popleft()
            remaining[key] -= 1
            d, how = choice
            sh = shards[d]
            s = free[d].pop(0)
            if how == "join":
                pre = sh.prefixes[key]
                sh.pool.share(pre.pages)
                held = pre.pages + sh.pool.alloc(self._need(q, share_pages))
            elif how == "new":
                pre = sh.prefixes[key] = _Prefix(sh.pool.alloc(share_pages), share_pages * ps)
                held = pre.pages + sh.pool.alloc(self._need(q, share_pages))
                rows[d] += self._rows(key, 0, pre.tokens, pre.pages, -1, lay)
            else:
                pre, held = None, sh.pool.alloc(self._need(q, 0))
            if pre is not None:
                pre.users += 1
            start = pre.tokens if pre is not None else 0
            rows[d] += self._rows(key, start, P, held, s, lay)
            sh.slots[s] = _Slot(r, held, key if pre is not None else None, P, P + q.max_new_tokens)
            adm[d * lay.slots + s] = r
        return adm, rows

    def _rows(self, prompt, start, end, pages, target, lay):
        """Prefill rows for prompt positions [start, end) written into ``pages`` (a page list in sequence
        order); the row holding position end - 1 delivers the logits to slot ``target`` (-1: none)."""
        table = np.full((lay.prompt_pages,), TRASH_PAGE, np.int32)
        n = min(len(pages), lay.prompt_pages)
        table[:n] = pages[:n]
        out = []
        for a in range(start, end, lay.chunk):
            b = min(a + lay.chunk, end)
            out.append({"tokens": prompt[a:b], "start": a, "count": b - a, "table": table,
                        "target": target if b == end else -1})
        return out

    def _width(self, shards, lay) -> int:
        """Page-table columns the next decode call reads: covers every position a live slot can write."""
        quantum = -(-128 // lay.page_size)  # widths in steps of 128 tokens: few programs, little waste
        need = 1
        for sh in shards.values():
            for s in sh.slots:
                if s is not None:
                    need = max(need, -(-min(s.length + lay.steps, s.end) // lay.page_size))
        return min(-(-need // quantum) * quantum, lay.max_pages)

    def _refill_inputs(self, adm, rows, start, R, lay):
        S, C, dp = lay.num_slots, lay.chunk, lay.dp
        a = {"admit": np.zeros((S,), bool), "table": np.zeros((S, lay.max_pages), np.int32),
             "length": np.zeros((S,), np.int32), "temperature": np.ones((S,), np.float32),
             "greedy": np.zeros((S,), bool), "top_k": np.zeros((S,), np.int32), "top_p": np.ones((S,), np.float32),
             "min_new": np.zeros((S,), np.int32), "max_new": np.zeros((S,), np.int32),
             "ends": np.full((S, lay.end_width), -1, np.int32),
             "key": np.zeros((S,) + lay.key_shape, np.uint32), "stream": np.zeros((S,), np.int32)}
        for g, r in (adm or {}).items():
            q = self._requests[r]
            greedy = bool(q.greedy or q.temperature <= 0)
            slot = self._shards[g // lay.slots].slots[g % lay.slots]
            a["admit"][g] = True
            a["table"][g, :len(slot.held)] = slot.held
            a["length"][g] = len(q.prompt)
            a["temperature"][g] = 1.0 if greedy else q.temperature
            a["greedy"][g] = greedy
            a["top_k"][g], a["top_p"][g] = q.top_k, q.top_p
            a["min_new"][g], a["max_new"][g] = q.min_new_tokens, q.max_new_tokens
            ends = sorted(set(map(int, q.end_ids)))
            a["ends"][g, :len(ends)] = ends
            a["key"][g] = _key_data(q.key)
            a["stream"][g] = q.stream
        b = {"tokens": np.zeros((dp * R, C), np.int32), "positions": np.zeros((dp * R, C), np.int32),
             "valid": np.zeros((dp * R, C), bool), "table": np.zeros((dp * R, lay.prompt_pages), np.int32),
             "target": np.full((dp * R,), -1, np.int32), "last": np.zeros((dp * R,), np.int32)}
        for d, rs in rows.items():
            for j, row in enumerate(rs[start:start + R]):
                i, n = d * R + j, row["count"]
                b["tokens"][i, :n] = row["tokens"]
                b["positions"][i] = row["start"] + np.arange(C)
                b["valid"][i, :n] = True
                b["table"][i] = row["table"]
                b["target"][i] = row["target"]
                b["last"][i] = n - 1
        axes_a = {k: ("batch",) + (None,) * (v.ndim - 1) for k, v in a.items()}
        axes_b = {k: ("batch",) + (None,) * (v.ndim - 1) for k, v in b.items()}
        return (prog.device_put_tree(a, self.mesh, self.rules, axes_a),
                prog.device_put_tree(b, self.mesh, self.rules, axes_b))

    def _collect(self, out, shards, requests, results, remaining, lay) -> int:
        """Append each live slot's new tokens; finish ended slots (results, page release)."""
        info = out["info"]
        produced = 0
        for d, sh in shards.items():
            for s, slot in enumerate(sh.slots):
                if slot is None:
                    continue
                g = d * lay.slots + s
                i, live, eos = (int(x) for x in info[g])
                n = i - (slot.length - len(requests[slot.request].prompt))
                if n:
                    slot.chunks.append((out["tokens"][g, :n], out["logprobs"][g, :n],
                                        out["logprobs_tempered"][g, :n]))
                    slot.length += n
                    produced += n
                if not live:
                    cat = [np.concatenate(c) if c else np.zeros((0,), dt) for c, dt in zip(
                        zip(*slot.chunks) if slot.chunks else ([], [], []), (np.int32, np.float32, np.float32))]
                    results[slot.request] = Result(cat[0].astype(np.int32), cat[1], cat[2], bool(eos))
                    sh.pool.release(slot.held)
                    if slot.prefix is not None:
                        pre = sh.prefixes[slot.prefix]
                        pre.users -= 1
                        if pre.users == 0:
                            del sh.prefixes[slot.prefix]
                    sh.slots[s] = None
        return produced

    def check(self, shards, state, lay) -> None:
        """Page accounting: refcounts equal the slots holding each page, the free list is exactly the
        unheld pages, shared pages are held only by slots of that prefix, and the device page tables of
        live slots equal the host's."""
        table = local_numpy(state["table"])
        live = local_numpy(state["live"])
        for d, sh in shards.items():
            holders = [s.held for s in sh.slots if s is not None]
            sh.pool.check(holders)
            shared = collections.Counter()
            for key, pre in sh.prefixes.items():
                users = [s for s in sh.slots if s is not None and s.prefix == key]
                if len(users) != pre.users or not users:
                    raise PageError(f"shard {d}: prefix with {pre.users} users has {len(users)} slots")
                if any(s.held[:len(pre.pages)] != pre.pages for s in users):
                    raise PageError(f"shard {d}: a slot does not read its prefix pages")
                shared.update(pre.pages)
            for s in sh.slots:
                if s is not None:
                    n = len(s.held) - (len(sh.prefixes[s.prefix].pages) if s.prefix is not None else 0)
                    private = s.held[len(s.held) - n:]
                    if any(sh.pool.refs[p] != 1 or p in shared for p in private):
                        raise PageError(f"shard {d}: a private page is shared")
            for j, s in enumerate(sh.slots):
                g = d * lay.slots + j
                if (s is not None) != bool(live[g]):
                    raise PageError(f"shard {d} slot {j}: host and device disagree on whether it is live")
                if s is not None:
                    want = np.full((lay.max_pages,), TRASH_PAGE, np.int32)
                    want[:len(s.held)] = s.held
                    if not np.array_equal(table[g], want):
                        raise PageError(f"shard {d} slot {j}: device page table differs from the host's")
