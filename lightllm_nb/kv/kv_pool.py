"""LightLLM's token-level KV cache: one big K/V buffer handed out a page at a time.

With page_size 1 (the default) every token owns exactly one slot anywhere in the buffer, so
nothing is wasted to fragmentation (TokenAttention). Larger pages exist to compare against
paged attention. A request's positions map to slots through its row of `req_to_token`, which
is the only indexing the attention kernels know.

`page_owner` says who holds each page, for panels and leak checks: a request's row of
`req_to_token` for pages it alone uses (its own, or cached ones only it holds), FREE, CACHED for
prefix-cache pages no request uses (reclaimable), or SHARED for cached pages several requests use.
Every change to it marks the page's block, so that `page_map()` copies only what changed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.kv_buffers import KVBuffers
from .page_maps import BLOCK_SHIFT, PageMap, PageMapCopier

FREE = -1
CACHED = -2  # holds prefix-cache tokens that no running request uses: reclaimable
SHARED = -3  # holds prefix-cache tokens that several running requests use


class KVPool:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int,
                 page_size: int, max_requests: int, max_context: int, dtype: torch.dtype,
                 device: torch.device):
        if page_size < 1:
            raise ValueError(f"page_size={page_size} is invalid: it must be >= 1")
        if num_tokens < page_size:
            raise ValueError(f"kv_tokens={num_tokens} is too small: it must hold at least one page "
                             f"of page_size={page_size} tokens")
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self.capacity = self.num_pages * page_size
        self.max_requests = max_requests
        self.max_context = max_context
        # One extra page past the end and one extra row mapping every position to it: padding for
        # CUDA-graph batches writes and reads there, so padded entries never touch a live request's cache.
        shape = (num_layers, self.capacity + page_size, num_kv_heads, head_dim)
        self.dummy_slot = self.capacity
        self.dummy_row = max_requests
        # The models' view: created once, so a CUDA graph captured over it stays valid for good.
        self.buffers = KVBuffers(k_cache=torch.empty(shape, dtype=dtype, device=device),
                                 v_cache=torch.empty(shape, dtype=dtype, device=device),
                                 req_to_token=torch.zeros((max_requests + 1, max_context), dtype=torch.int32,
                                                          device=device))
        # Only this class writes it (the step's positions come through `map_positions`).
        self.req_to_token = self.buffers.req_to_token
        self.req_to_token[self.dummy_row].fill_(self.dummy_slot)
        self._free_pages = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() hands out page 0 first
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self.page_owner = np.full(self.num_pages, FREE, dtype=np.int32)  # only the methods below write it
        self._page_maps = PageMapCopier(self.page_owner)
        self._marks = self._page_maps.marks  # one byte a block, written after each change of `page_owner`

    # ---- pages -----------------------------------------------------------------------------
    @property
    def free_tokens(self) -> int:
        return len(self._free_pages) * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def alloc_pages(self, count: int, owner: int) -> list[int] | None:
        """`count` pages owned by `owner`, or None when fewer are free (the caller decides what to do)."""
        if count > len(self._free_pages):
            return None
        if count == 1:  # a request's next page, the commonest allocation: keep it cheap
            page = self._free_pages.pop()
            self.page_owner[page] = owner
            self._marks[page >> BLOCK_SHIFT] = 1
            return [page]
        if count <= 0:
            return []
        return self.alloc_page_each([owner] * count)

    def alloc_page_each(self, owners: list[int]) -> list[int] | None:
        """A page for each of `owners`, in one write: the pages alloc_pages(1, owner) would give one
        owner after another. None when fewer are free."""
        count = len(owners)
        if count > len(self._free_pages):
            return None
        if not count:
            return []
        pages = self._free_pages[-count:][::-1]  # the pages count pops would give, in one slice
        del self._free_pages[-count:]
        self.page_owner[pages] = owners
        self._page_maps.mark(pages)
        return pages

    def free_pages(self, pages: list[int]) -> None:
        if not pages:
            return
        owners = self.page_owner[pages]
        if (owners == FREE).any():
            raise RuntimeError(f"double free of KV pages {[p for p, o in zip(pages, owners) if o == FREE]}")
        self.page_owner[pages] = FREE
        self._page_maps.mark(pages)
        self._free_pages.extend(pages)

    def set_owner(self, pages: list[int], owner: int) -> None:
        self.page_owner[pages] = owner
        self._page_maps.mark(pages)

    def page_map(self) -> PageMap:
        """A read-only copy of `page_owner` as it is now, for readers on other threads. It shares the
        blocks nobody changed with the previous copy, so it costs what changed since then (issue 10).
        Thread-safe; a copy taken while the owner thread changes pages may show part of that change."""
        return self._page_maps.take()

    def slots(self, pages: list[int], start: int, end: int) -> np.ndarray:
        """Slot index of positions [start, end) of a sequence whose pages are `pages`."""
        positions = np.arange(start, end, dtype=np.int64)
        return np.asarray(pages, dtype=np.int64)[positions // self.page_size] * self.page_size \
            + positions % self.page_size

    # ---- rows of req_to_token ---------------------------------------------------------------
    def map_prefix(self, row: int, pages: list[int], length: int) -> None:
        """Point positions [0, length) of `row` at `pages`: a cached prefix the runner never computes,
        so it never writes these positions itself. One host-to-device copy."""
        slots = torch.from_numpy(self.slots(pages, 0, length)).to(self.req_to_token.device, torch.int32)
        self.req_to_token[row, :length] = slots

    def map_positions(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Point `positions` of `rows` at `slots` (device tensors, one entry per token): the
        positions a step computes, in one scatter on the device."""
        self.req_to_token[rows, positions] = slots.to(torch.int32)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def is_whole(self) -> bool:
        """Every page and row is back in the free lists: nothing leaked. Pages the prefix cache
        keeps are not free: clear the cache first."""
        return (len(self._free_pages) == self.num_pages and len(set(self._free_pages)) == self.num_pages
                and len(self._free_rows) == self.max_requests and (self.page_owner == FREE).all())
