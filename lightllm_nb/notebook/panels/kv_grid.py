"""The KV pool as a grid of cells, each cell a run of pages: what KVCachePanel draws.

A real GPU pool has about a million token slots; a browser cannot draw (nor a comm carry) that
many every tenth of a second. So pages are aggregated into at most `max_cells` cells, and each
render sends only the cells that changed since the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Cell codes sent to the browser: an owner row (>= 0), or one of these (js/kv_grid.js knows them).
SHARED_CELL = -1
CACHED_CELL = -2
FREE_CELL = -3
# page_owner's codes (kv_pool)
FREE_PAGE, CACHED_PAGE, SHARED_PAGE = -1, -2, -3


def page_holders(row_pages: dict[int, int], holders) -> dict[int, dict]:
    """Per owner row holding pages: its pages, and whose it is, from an event's `kv_holders`.
    A redacted event calls other users' requests user "other" with an alias for an id: those show
    as anonymous, without the alias (a viewer has no use for it). `holders` None (a trace from
    before holders were recorded): rows only."""
    by_row = {h.row: h for h in holders or ()}
    shown = {}
    for row, pages in row_pages.items():
        h = by_row.get(row)
        if h is None:
            shown[row] = {"pages": pages, "who": "unknown" if holders is None else "gone", "request": None, "tokens": None}
        elif h.user == "other":
            shown[row] = {"pages": pages, "who": "other", "request": None, "tokens": h.tokens}
        else:
            shown[row] = {"pages": pages, "who": "mine", "request": h.request_id, "tokens": h.tokens}
    return shown


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
        highest, lowest, free_pages = _per_cell(pages, self.pages_per_cell)
        # A cell shows its most telling page: any request's, else shared, else cached prefix, else free.
        self.owners = np.where(highest >= 0, highest,
                               np.where(lowest == SHARED_PAGE, SHARED_CELL,
                                        np.where(lowest == CACHED_PAGE, CACHED_CELL, FREE_CELL))).astype(np.int32)
        per = self.pages_per_cell
        self.fills = ((per - free_pages) * 255 // per).astype(np.uint8)
        counts = np.bincount(pages.astype(np.intp) + 3, minlength=3)  # [shared, cached, free, row 0, row 1, ...]
        self.row_pages = {row: n for row, n in enumerate(counts[3:].tolist()) if n}
        self.utilization = 1.0 - int(counts[2]) / max(1, self.num_pages)
        self.fragmentation = _fragmentation(pages == FREE_PAGE)

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


def _per_cell(pages: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell of `per` pages: the highest and lowest owner code and the number of free pages
    (a short last cell is padded with free pages). Works on a view: no copy of a million pages."""
    full = len(pages) // per
    blocks = [pages[: full * per].reshape(full, per)]
    if len(pages) % per:
        tail = np.full(per, FREE_PAGE, dtype=np.int32)
        tail[: len(pages) - full * per] = pages[full * per:]
        blocks.append(tail.reshape(1, per))
    return (np.concatenate([b.max(axis=1) for b in blocks]), np.concatenate([b.min(axis=1) for b in blocks]),
            np.concatenate([(b == FREE_PAGE).sum(axis=1) for b in blocks]))


def _fragmentation(free: np.ndarray) -> float:
    """How scattered the free pages are: 0 when they form one run, near 1 when none touch."""
    total = int(free.sum())
    if total == 0:
        return 0.0
    starts = np.concatenate(([0], np.flatnonzero(free[1:] != free[:-1]) + 1))  # where each run begins
    lengths = np.diff(np.append(starts, len(free)))
    return 1.0 - int(lengths[free[starts]].max()) / total
