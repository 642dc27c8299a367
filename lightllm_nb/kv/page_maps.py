"""The KV pool's page map as readers get it: an immutable copy made of fixed blocks of pages, each
new copy sharing every block that did not change with the one before.

A whole copy of a GPU pool's map (3.7M int32 entries, 15 MB) cost the step thread milliseconds each
time a panel asked for one (issue 10). The pool marks the block of every page whose owner it
changes; a copy takes only the marked blocks, so it costs what changed since the last copy (a
decode step of 128 requests at page size 1 touches a block or two), not the pool. A reader joins
the blocks into one array on its own thread, once for every reader of that copy.
"""

from __future__ import annotations

import threading

import numpy as np

BLOCK_SHIFT = 12  # 4096 pages a block: ~900 blocks for a GPU pool of 3.7M pages, 16 KB each


class PageMap:
    """One copy of a page map: read-only blocks of BLOCK_SHIFT pages, joined on the first `array()`."""

    def __init__(self, blocks: tuple[np.ndarray, ...]):
        self.blocks = blocks
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()  # readers on several threads join it once

    def __len__(self) -> int:
        return sum(len(block) for block in self.blocks)

    def array(self) -> np.ndarray:
        """The whole map as one int32 array, the same array for every caller."""
        with self._lock:
            if self._array is None:
                self._array = np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.int32)
            return self._array


class PageMapCopier:
    """Copies of `owners` that copy only the blocks marked since the last copy.

    Whoever changes `owners` marks each changed page's block afterwards (`marks[page >>
    BLOCK_SHIFT] = 1`, or `mark(pages)`); `take` clears a block's mark before copying it, so a
    change racing a copy on another thread leaves its block marked and the next copy takes it."""

    def __init__(self, owners: np.ndarray):
        self.owners = owners
        count = (len(owners) + (1 << BLOCK_SHIFT) - 1) >> BLOCK_SHIFT
        self.marks = bytearray(b"\x01" * count)  # every block is new to the first copy
        self._marked = np.frombuffer(self.marks, dtype=np.uint8)  # the same bytes, for whole-array use
        self._blocks: list[np.ndarray | None] = [None] * count
        self._lock = threading.Lock()  # the step thread copies; a reader copies when no step came for a while

    def mark(self, pages) -> None:
        self._marked[np.asarray(pages, dtype=np.int64) >> BLOCK_SHIFT] = 1

    def take(self) -> PageMap:
        with self._lock:
            changed = np.flatnonzero(self._marked)
            self._marked[changed] = 0
            for block in changed.tolist():
                copy = self.owners[block << BLOCK_SHIFT:(block + 1) << BLOCK_SHIFT].copy()
                copy.flags.writeable = False  # shared by later copies: nobody may change it
                self._blocks[block] = copy
            return PageMap(tuple(self._blocks))
