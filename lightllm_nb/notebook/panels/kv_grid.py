"""The KV pool as a grid of cells, each cell a run of pages: what KVCachePanel draws.

A real GPU pool has about a million token slots; a browser cannot draw (nor a comm carry) that
many every tenth of a second. So pages are aggregated into at most `max_cells` cells, and each
render sends only the cells that changed since the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Cell codes: an owner row (>= 0), or one of these. Ordered so that the largest code in a cell is
# what the cell shows: a request's pages first, then shared prefix pages, then cached, then free.
SHARED_CELL = -1
CACHED_CELL = -2
FREE_CELL = -3
# page_owner's codes (kv_pool: -1 free, -2 cached, -3 shared) -> cell codes, by index (code + 3).
_PAGE_TO_CELL = np.array([SHARED_CELL, CACHED_CELL, FREE_CELL], dtype=np.int32)


@dataclass
class GridPatch:
    """What changed since the last patch: cell indices with their new owner code and fill (0-255)."""

    indices: np.ndarray   # int32
    owners: np.ndarray    # int32
    fills: np.ndarray     # uint8
    full: bool            # True: a new layout, every cell is in the patch


class KVGrid:
    def __init__(self, max_cells: int = 4096):
        if max_cells < 1:
            raise ValueError(f"max_cells={max_cells} must be at least 1")
        self.max_cells = max_cells
        self.pages_per_cell = 1
        self.num_pages = 0
        self.owners = np.zeros(0, dtype=np.int32)
        self.fills = np.zeros(0, dtype=np.uint8)
        self.row_pages: dict[int, int] = {}     # owner row -> pages it alone holds
        self.utilization = 0.0                  # pages in use by requests or the prefix cache
        self.fragmentation = 0.0                # 1 - largest free run / free pages
        self._sent_owners: np.ndarray | None = None
        self._sent_fills: np.ndarray | None = None

    def update(self, page_owner) -> None:
        """Recompute the cells from one event's `page_owner` (one entry per page)."""
        pages = np.asarray(page_owner, dtype=np.int32)
        if len(pages) != self.num_pages:
            self.num_pages = len(pages)
            self.pages_per_cell = max(1, math.ceil(self.num_pages / self.max_cells))
            self._sent_owners = None  # a new layout: the next patch is a full one
        per = self.pages_per_cell
        cells = math.ceil(self.num_pages / per)
        padded = np.full(cells * per, -1, dtype=np.int32)  # the last cell's tail counts as free
        padded[: self.num_pages] = pages
        codes = np.where(padded >= 0, padded, _PAGE_TO_CELL[np.clip(padded + 3, 0, 2)]).reshape(cells, per)
        self.owners = codes.max(axis=1)
        used = (codes != FREE_CELL).sum(axis=1)
        self.fills = (used * 255 // per).astype(np.uint8)
        owned = pages[pages >= 0]
        rows, counts = np.unique(owned, return_counts=True)
        self.row_pages = dict(zip(rows.tolist(), counts.tolist()))
        free = pages == -1
        self.utilization = 1.0 - free.sum() / max(1, self.num_pages)
        self.fragmentation = _fragmentation(free)

    def patch(self) -> GridPatch:
        """The cells that changed since the last patch (all of them after a layout change)."""
        full = self._sent_owners is None or len(self._sent_owners) != len(self.owners)
        if full:
            changed = np.arange(len(self.owners), dtype=np.int32)
        else:
            changed = np.flatnonzero((self.owners != self._sent_owners) | (self.fills != self._sent_fills))
            changed = changed.astype(np.int32)
        self._sent_owners, self._sent_fills = self.owners.copy(), self.fills.copy()
        return GridPatch(changed, self.owners[changed], self.fills[changed], full)

    def resend(self) -> None:
        """Make the next patch a full one (a new view opened and knows nothing yet)."""
        self._sent_owners = None


def _fragmentation(free: np.ndarray) -> float:
    """How scattered the free pages are: 0 when they form one run, near 1 when none touch."""
    total = int(free.sum())
    if total == 0:
        return 0.0
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return 1.0 - int((ends - starts).max()) / total
