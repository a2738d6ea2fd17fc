"""Paged KV cache: fixed-size pages per data-parallel shard, a page table per row, and the host allocator.

Device layout (one pool of ``pages_per_shard`` pages per data-parallel shard, so a slot only ever
touches pages on its own devices and no page moves between devices):

    k, v      [DP, L, KV, pages_per_shard, page_size, hd]   DP over the "batch" mesh axes, KV over "tensor"
    table     [DP * rows_per_shard, max_pages]               page ids (local to the row's shard) in
                                                             sequence order: token at position p lives
                                                             in page table[p // page_size], offset p % page_size

Page 0 of every shard is the *trash page*: padding tokens, dead slots and table entries past a row's
allocation point at it, so static-shape programs can write every row every step without touching a
live page. Positions past a row's current length are never attended (causal masking by position), so
whatever the trash page holds is never read as context.

``PagedView`` is what ``jalign.models.transformer.forward(paged=...)`` consumes: each layer scatters its
new k/v into the pages and gathers each row's context ``[B, max_pages * page_size, KV, hd]`` in
sequence order for the model's own attention (``jalign.models.attention.attend``). Writes happen before
reads within a layer, so several rows of one call may extend the same sequence (chunked prefill of one
prompt, or a shared prefix and the per-sample tails that read it) and each sees the others' k/v.
The batched (vmapped over DP) scatter/gather is partitioned by XLA along DP without moving pages.
Why this layout: DP leads because batching the scatter over an inner axis made XLA:CPU copy the whole
pool at every layer; KV before the pages makes one head's context a run of whole pages
[pages, page_size, hd], the layout the attention dot reads K in, so the gather is a block copy.

``PagePool`` is the host-side allocator of one shard: free list plus reference counts (a shared
prompt prefix page is referenced by every slot that reads it); ``check`` verifies the accounting.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sharding.rules import constrain

TRASH_PAGE = 0
PAGE_AXES = ("batch", "layers", "kv_heads", None, None, "head_dim")


def write_index(table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int) -> jax.Array:
    """Flat slot ``page * page_size + offset`` in the shard's pool for every token [B, T]; padding
    tokens (``valid`` False) and positions past the table go to the trash page."""
    max_pages = table.shape[-1]
    page_no = positions // page_size
    ok = valid & (page_no < max_pages) & (positions >= 0)
    page = jnp.take_along_axis(table, jnp.clip(page_no, 0, max_pages - 1), axis=-1)
    return jnp.where(ok, page * page_size + positions % page_size, TRASH_PAGE * page_size)


@dataclasses.dataclass(frozen=True)
class PagedView:
    """Per-call view of the paged cache for ``forward(paged=...)``.

    pages: (k, v) [DP, L, KV, P, page_size, hd]; table: [B, max_pages] (B = DP * rows per shard, rows
    of shard d contiguous); slots: [B, T] flat write slots from ``write_index``.
    """
    pages: tuple
    table: jax.Array
    slots: jax.Array

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[4]

    def context_index(self, batch: int):
        """(kv segment ids, kv positions) [B, max_pages * page_size] of the gathered context: every
        entry is "valid"; causal masking by position hides everything past the query."""
        n = self.table.shape[-1] * self.page_size
        idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
        return jnp.ones((batch, n), jnp.int32), idx

    def update(self, k: jax.Array, v: jax.Array, pages, layer):
        """Write k/v [B, T, KV, hd] into layer ``layer`` of ``pages`` (k, v [DP, L, KV, P, page_size, hd],
        in place); return the rows' contexts [B, max_pages * page_size, KV, hd] and the new pages."""
        dp, L, KV, n_pages, ps, hd = pages[0].shape
        B, T = k.shape[:2]
        rows = B // dp
        slots = self.slots.reshape(dp, rows * T)
        table = self.table.reshape(dp, rows, -1)

        def write(pool, new):
            flat = pool.reshape(dp, L, KV, n_pages * ps, hd)
            new = new.reshape(dp, rows * T, KV, hd).astype(pool.dtype)
            flat = jax.vmap(lambda p, i, x: p.at[layer, :, i].set(x, mode="promise_in_bounds"))(flat, slots, new)
            return constrain(flat.reshape(pool.shape), PAGE_AXES)

        def context(pool):
            ctx = jax.vmap(lambda p, t: p[layer][:, t])(pool, table)  # [DP, KV, rows, max_pages, ps, hd]
            ctx = jnp.moveaxis(ctx, 1, 4).reshape(B, -1, KV, hd).astype(k.dtype)
            return constrain(ctx, ("batch", "cache_seq", "kv_heads", "head_dim"))

        pk, pv = write(pages[0], k), write(pages[1], v)
        return context(pk), context(pv), (pk, pv)


# ---- host-side allocator -------------------------------------------------------------------------
class PageError(RuntimeError):
    """The page accounting is inconsistent (a bug), or a request can never fit the pool."""


class PagePool:
    """Free list and reference counts of one shard's pages (page 0 is the trash page, never handed out).

    ``alloc(n)`` returns n pages with count 1; ``share(pages)`` adds a reference (another slot reading a
    prompt prefix); ``release(pages)`` drops one reference each and frees pages that reach 0.
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise PageError(f"a page pool needs at least 2 pages (one is the trash page), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PageError(f"page pool exhausted: {n} pages asked, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        self.refs[out] = 1
        return out

    def share(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.refs[p] <= 0:
                raise PageError(f"page {p} shared while free")
            self.refs[p] += 1

    def release(self, pages: Iterable[int]) -> None:
        for p in pages:
            if p == TRASH_PAGE or self.refs[p] <= 0:
                raise PageError(f"page {p} released while not held (refs {self.refs[p]})")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)

    def check(self, holders: Sequence[Sequence[int]]) -> None:
        """Raise unless the reference counts equal the number of ``holders`` (one page list per live
        slot) holding each page, and the free list is exactly the unreferenced pages, once each."""
        want = np.zeros(self.num_pages, np.int32)
        for pages in holders:
            if len(set(pages)) != len(pages):
                raise PageError(f"a slot holds a page twice: {sorted(pages)}")
            for p in pages:
                want[p] += 1
        if want[TRASH_PAGE]:
            raise PageError("the trash page is held by a slot")
        if not np.array_equal(want, self.refs):
            bad = np.flatnonzero(want != self.refs)[:8]
            raise PageError(f"page reference counts wrong at pages {bad.tolist()}: "
                            f"held {want[bad].tolist()} vs counted {self.refs[bad].tolist()}")
        free = sorted(self._free)
        if len(set(free)) != len(free) or free != np.flatnonzero(self.refs == 0)[1:].tolist():
            raise PageError("free list is not exactly the unreferenced pages")
