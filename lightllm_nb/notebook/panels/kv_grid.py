"""The KV pool as a grid of cells, each cell a run of pages: what KVCachePanel draws.

A real GPU pool has millions of token slots; a browser cannot draw (nor a comm carry) that many
every tenth of a second. So pages are aggregated into at most `max_cells` cells, and each render
sends only the cells that changed since the last one.

The panel's thread shares the GIL with the engine's step thread (issue 10: a 3.7M-page map
recomputed from scratch ~9 times a second made every step wait). So an update compares the new map
with the last one in one pass, recomputes only the cells whose pages changed, keeps per-cell
summaries (owner codes, free pages, free runs at the edges) from which the pool's figures are
combined over cells, and does nothing when no page changed. Every step is a whole-array numpy call
(they release the GIL), never a loop over pages in Python.
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
CODES = 3  # page codes below 0: a page's count sits at index code + CODES


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


@dataclass
class CellSummaries:
    """Per cell: the owner code shown, its fill, and its free pages with the free runs at its two
    edges and inside it (what the pool's fragmentation is combined from)."""

    owners: np.ndarray    # int32 cell codes
    fills: np.ndarray     # uint8, 255 = no page free
    free: np.ndarray      # int64 free pages
    lead: np.ndarray      # free pages before its first used one
    trail: np.ndarray     # free pages after its last used one
    longest: np.ndarray   # its longest free run

    @classmethod
    def of(cls, block: np.ndarray) -> "CellSummaries":
        """The summaries of the cells that are the rows of `block` (cells x pages, int32)."""
        length = block.shape[1]
        highest, lowest = block.max(axis=1), block.min(axis=1)
        # A cell shows its most telling page: any request's, else shared, else cached prefix, else free.
        owners = np.where(highest >= 0, highest,
                          np.where(lowest == SHARED_PAGE, SHARED_CELL,
                                   np.where(lowest == CACHED_PAGE, CACHED_CELL, FREE_CELL))).astype(np.int32)
        free, lead, trail, longest = _free_runs(block == FREE_PAGE)
        fills = ((length - free) * 255 // length).astype(np.uint8)
        return cls(owners, fills, free, lead, trail, longest)

    def put(self, cells: np.ndarray, other: "CellSummaries") -> None:
        for name in ("owners", "fills", "free", "lead", "trail", "longest"):
            getattr(self, name)[cells] = getattr(other, name)

    @classmethod
    def join(cls, parts: list["CellSummaries"]) -> "CellSummaries":
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("owners", "fills", "free", "lead", "trail", "longest")))


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
        self._pages: np.ndarray | None = None   # our copy of the map the cells describe (a caller may reuse its array)
        self._cells: CellSummaries | None = None
        self._counts = np.zeros(CODES, dtype=np.int64)  # pages per code + CODES (shared, cached, free, row 0, ...)
        self._sent_owners: np.ndarray | None = None
        self._sent_fills: np.ndarray | None = None

    @property
    def cell_count(self) -> int:
        return len(self.owners)

    def update(self, page_owner) -> bool:
        """Bring the cells up to one event's `page_owner` (one entry per page); False when no page
        changed since the last update (nothing was recomputed)."""
        pages = np.asarray(page_owner, dtype=np.int32)
        if self._pages is None or len(pages) != self.num_pages:
            self._new_layout(pages)
        else:
            differs = pages != self._pages
            changed = self._changed_cells(differs)
            if not len(changed):
                return False
            self._recount(pages, np.flatnonzero(differs))
            if 4 * len(changed) > self.cell_count:  # most of the pool: whole-array passes beat gathering
                self._cells = self._summarize(pages)
            else:
                self._cells.put(changed, self._summarize(pages, changed))
            np.copyto(self._pages, pages)
        self._publish_figures()
        return True

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

    def _new_layout(self, pages: np.ndarray) -> None:
        self.num_pages = len(pages)
        self.pages_per_cell = max(1, math.ceil(self.num_pages / self.max_cells))
        self._sent_owners = None  # the next patch is a full one
        self._pages = pages.copy()
        self._count_pages(pages)
        self._cells = self._summarize(pages)

    def _changed_cells(self, differs: np.ndarray) -> np.ndarray:
        """Cells holding a page whose owner differs from our copy (`differs`: per page)."""
        per = self.pages_per_cell
        whole = self.num_pages // per
        changed = differs[: whole * per].reshape(whole, per).any(axis=1)
        if whole < self.cell_count:  # the short last cell
            changed = np.append(changed, differs[whole * per:].any())
        return np.flatnonzero(changed)

    def _summarize(self, pages: np.ndarray, cells: np.ndarray | None = None) -> CellSummaries:
        """The summaries of `cells` (None: all), read from views of the map or one gather of their pages."""
        per = self.pages_per_cell
        whole = self.num_pages // per
        if cells is None:
            parts = [CellSummaries.of(pages[: whole * per].reshape(whole, per))]
            has_tail = whole < math.ceil(self.num_pages / per)
        else:
            inner = cells[cells < whole]
            parts = [CellSummaries.of(pages[inner[:, None] * per + np.arange(per)])]
            has_tail = len(inner) < len(cells)
        if has_tail:
            parts.append(CellSummaries.of(pages[whole * per:].reshape(1, -1)))
        return CellSummaries.join(parts)

    def _count_pages(self, pages: np.ndarray) -> None:
        self._counts = np.bincount(pages + CODES, minlength=CODES).astype(np.int64)

    def _recount(self, pages: np.ndarray, moved: np.ndarray) -> None:
        """Move the pages `moved` from their old owners' counts to their new ones."""
        old = np.bincount(self._pages[moved] + CODES)
        new = np.bincount(pages[moved] + CODES)
        counts = np.zeros(max(len(self._counts), len(old), len(new)), dtype=np.int64)
        counts[: len(self._counts)] += self._counts
        counts[: len(new)] += new
        counts[: len(old)] -= old
        self._counts = counts

    def _publish_figures(self) -> None:
        cells = self._cells
        self.owners, self.fills = cells.owners, cells.fills
        self.row_pages = {row: n for row, n in enumerate(self._counts[CODES:].tolist()) if n}
        free_pages = int(cells.free.sum())
        self.utilization = 1.0 - free_pages / max(1, self.num_pages)
        self.fragmentation = 0.0 if free_pages == 0 else 1.0 - _longest_free_run(cells, self.num_pages,
                                                                                  self.pages_per_cell) / free_pages


def _free_runs(is_free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (cells x pages) bool array: its free pages, the run at its start, the run at
    its end and its longest run, all from the runs' edges (one pass; no per-row scans)."""
    rows, length = is_free.shape
    width = length + 1
    padded = np.zeros((rows, length + 2), dtype=np.int8)
    padded[:, 1:-1] = is_free
    edges = np.diff(padded, axis=1).ravel()  # +1 where a run begins, -1 just past its end; rows stay apart
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    free, lead, trail, longest = (np.zeros(rows, dtype=np.int64) for _ in range(4))
    if len(starts):
        row_of = starts // width
        runs = ends - starts
        first = np.flatnonzero(np.r_[True, row_of[1:] != row_of[:-1]])  # each row's first run
        present = row_of[first]
        free[present] = np.add.reduceat(runs, first)
        longest[present] = np.maximum.reduceat(runs, first)
        at_start = starts == row_of * width
        lead[row_of[at_start]] = runs[at_start]
        at_end = ends == row_of * width + length
        trail[row_of[at_end]] = runs[at_end]
    return free, lead, trail, longest


def _longest_free_run(cells: CellSummaries, num_pages: int, per: int) -> int:
    """The pool's longest free run from the cells' summaries: inside one cell, or across cell
    borders (a cell's trailing run, any wholly free cells, the next cell's leading run)."""
    lengths = np.full(len(cells.free), per, dtype=np.int64)
    lengths[-1] = num_pages - per * (len(lengths) - 1)
    whole_free = cells.free == lengths
    through = np.cumsum(np.where(whole_free, lengths, 0))   # free pages of wholly free cells so far
    index = np.arange(len(lengths))
    last_used = np.maximum.accumulate(np.where(whole_free, -1, index))  # the latest cell with a used page
    at = last_used.clip(0)
    # The free run that reaches the end of each cell.
    ending = np.where(last_used >= 0, cells.trail[at] + through - through[at], through)
    crossing = ending[:-1] + cells.lead[1:]
    return int(max(cells.longest.max(), ending[-1], crossing.max() if len(crossing) else 0))
