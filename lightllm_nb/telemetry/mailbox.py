"""A queue that one thread fills and a thread or an asyncio task reads: the sink of every request
output and every StepEvent that leaves the step thread, and a panel's backlog of events to draw.

Putting never blocks the writer (the step thread): a bounded mailbox drops its oldest item and
counts it. Readers block (threads) or await (asyncio: woken with `call_soon_threadsafe`, so a
tornado handler and a notebook thread read the same way).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque


class MailboxClosed(Exception):
    """The mailbox was closed and everything in it has been read."""


class Mailbox:
    def __init__(self, maxsize: int | None = None):
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1):
            raise ValueError(f"maxsize={maxsize!r} is invalid: it must be a positive integer (or None: unbounded)")
        self._items: deque = deque()
        self._maxsize = maxsize
        self._cond = threading.Condition(threading.Lock())
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closed = False
        self.dropped = 0      # items a slow reader lost, oldest first
        self._unhandled = 0   # put and not yet marked handled (see `join`)

    def put(self, item) -> None:
        """Add an item without ever blocking; ignored once closed."""
        with self._cond:
            if self._closed:
                return
            if self._maxsize is not None and len(self._items) >= self._maxsize:
                self._items.popleft()
                self.dropped += 1
                self._unhandled -= 1
            self._items.append(item)
            self._unhandled += 1
            self._wake()

    def close(self) -> None:
        """No more items; readers get what is left, then MailboxClosed."""
        with self._cond:
            self._closed = True
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def get(self, timeout: float | None = None):
        """The oldest item, waiting for one; MailboxClosed at the end, TimeoutError after `timeout`."""
        with self._cond:
            if not self._wait_for_items(timeout):
                raise TimeoutError(f"nothing arrived within {timeout} s")
            return self._items.popleft()

    def get_all(self, timeout: float | None = None) -> list:
        """Every item, oldest first, waiting for one; [] after `timeout` (0: no wait), MailboxClosed
        at the end. For a reader that handles whatever came since it last looked in one go."""
        with self._cond:
            if not self._wait_for_items(timeout):
                return []
            items = list(self._items)
            self._items.clear()
            return items

    async def aget(self):
        """`get` for asyncio: awaits without holding a thread."""
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                if self._closed:
                    raise MailboxClosed
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def task_done(self) -> None:
        """Mark one item taken with `get` (or `get_all`) as fully handled (for `join`)."""
        with self._cond:
            self._unhandled -= 1
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every item put so far was handled (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unhandled <= 0 or self._closed, timeout)

    def _wait_for_items(self, timeout: float | None) -> bool:
        """With the lock held: True once an item is in, False after `timeout`; MailboxClosed at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._items:
            if self._closed:
                raise MailboxClosed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._cond.wait(left)
        return True

    def _wake(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # a cancelled reader's future is already done
        future.set_result(None)
