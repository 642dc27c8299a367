"""A step's BatchRows and KVHolders as the step thread hands them out: it keeps only the numbers a
later step changes (a few microseconds); the rows themselves are built when a reader takes the event.

Building 128 BatchRows and 128 KVHolders every step cost ~80 us of a 2.1 ms GPU step (issue 10),
while a panel drawing 10 times a second reads them for one step in ~50. The hub builds them into
an event on the reader's thread (EventSubscription._view), so what reaches user code is plain
lists, and the requests held here live only while the event waits in a reader's mailbox.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from .events import BatchRow, KVHolder


class BuiltOnRead:
    """A list made by `build(*captured)` on first read, once, on whichever thread reads first."""

    __slots__ = ("_build", "_captured", "_items", "_lock")

    def __init__(self, build: Callable[..., list], *captured):
        self._build, self._captured = build, captured
        self._items: list | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items())

    def __iter__(self):
        return iter(self.items())

    def items(self) -> list:
        with self._lock:
            if self._items is None:
                self._items, self._captured = self._build(*self._captured), ()  # let go of the requests
            return self._items


# What is captured is a few flat lists and tuples, not a tuple or an object per request: an event
# waits ~50 steps in a panel's mailbox, and what it holds then is promoted by the GC, whose full
# collections stall every thread (~100 ms with torch loaded).

def batch_rows(items: Sequence[tuple[object, int]]) -> BuiltOnRead:
    """The BatchRows of a step's batch (request, tokens it computes), taken before the step computes them."""
    requests, tokens = zip(*items) if items else ((), ())
    return BuiltOnRead(_batch_rows, requests, tokens, [req.num_computed for req in requests])


def _batch_rows(requests, tokens, computed) -> list[BatchRow]:
    return [BatchRow(req.request_id, req.user, "decode" if before >= req.num_prompt else "prefill", n, before + n)
            for req, n, before in zip(requests, tokens, computed)]


def kv_holders(running: Sequence) -> BuiltOnRead:
    """The KVHolders of the running requests that hold a row, as they are now."""
    requests = tuple(running)
    return BuiltOnRead(_kv_holders, requests, [req.row for req in requests], [req.num_computed for req in requests])


def _kv_holders(requests, rows, computed) -> list[KVHolder]:
    return [KVHolder(row, req.request_id, req.user, tokens)
            for req, row, tokens in zip(requests, rows, computed) if row is not None]
