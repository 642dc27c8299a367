"""StepEvents leave the step thread here: the step only drops each event into its subscribers'
bounded mailboxes; redaction, callbacks and trace writing happen on the readers' side.

A slow reader loses its oldest events (counted in `dropped`), it never slows a step. The page map
is copied (int32, one entry per page) once per step, and only when a subscriber asked for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from dataclasses import replace
from typing import Callable

import numpy as np

from .events import StepEvent
from .mailbox import Mailbox, MailboxClosed


class EventSubscription:
    """StepEvents, oldest first: iterate (blocking) or `async for` them; `close()` ends it.
    `user=None` sees everything (the operator); otherwise each event is redacted for `user`.

    With `max_rate` (events a second, for a reader that only draws) the latest event wins: the
    reader sleeps out the gap while steps queue up unread, then gets the newest step carrying every
    decision of the steps it skipped, redacted once. A reader at every step costs the step thread
    its redaction and encoding in GIL time (issue 8); at 10/s that is a few percent of it."""

    def __init__(self, hub: "EventHub", *, user: str | None, pages: bool, maxsize: int,
                 max_rate: float | None = None):
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate={max_rate!r} must be positive (events a second), or None for every step")
        self.user = user
        self.pages = pages
        self._hub = hub
        self._mailbox = Mailbox(maxsize)
        self._aliases: dict[str, str] = {}  # this reader's own random aliases for other users' ids
        self._gap = None if max_rate is None else 1.0 / max_rate
        self._next_due = 0.0  # time.monotonic() before which a rate-capped reader takes nothing

    @property
    def dropped(self) -> int:
        """Events this reader lost because it fell behind by more than `maxsize`."""
        return self._mailbox.dropped

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def get(self, timeout: float | None = None) -> StepEvent:
        """The next event; StopIteration once closed and drained, TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._gap is not None:
            due = self._next_due if deadline is None else min(self._next_due, deadline)
            time.sleep(max(0.0, due - time.monotonic()))
        try:
            first = self._mailbox.get(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except MailboxClosed:
            raise StopIteration from None
        return self._view(self._latest(first))

    def __iter__(self):
        return self

    def __next__(self) -> StepEvent:
        return self.get()

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepEvent:
        if self._gap is not None:
            await asyncio.sleep(max(0.0, self._next_due - time.monotonic()))
        try:
            first = await self._mailbox.aget()
        except MailboxClosed:
            raise StopAsyncIteration from None
        return self._view(self._latest(first))

    def close(self) -> None:
        self._hub._remove(self)
        self._mailbox.close()

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, event: StepEvent) -> None:
        self._mailbox.put(event)

    def _latest(self, first: StepEvent) -> StepEvent:
        """Rate-capped: the newest queued step with the decisions of every step before it since the
        last one delivered (none is lost unless the mailbox overflowed, which `dropped` counts)."""
        if self._gap is None:
            return first
        self._next_due = time.monotonic() + self._gap
        skipped = [first] + self._mailbox.get_all(timeout=0)
        if len(skipped) == 1:
            return first
        return replace(skipped[-1], decisions=[d for event in skipped for d in event.decisions])

    def _view(self, event: StepEvent) -> StepEvent:
        return event if self.user is None else event.redacted_for(self.user, self._aliases)


class CallbackSubscriber:
    """Calls `callback(event)` for every event on its own daemon thread; a callback that raises
    is unsubscribed with a warning, so a broken panel never costs anyone their results."""

    def __init__(self, subscription: EventSubscription, callback: Callable[[StepEvent], None]):
        self.subscription = subscription
        self.callback = callback
        self._thread = threading.Thread(target=self._run, name="lightllm-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        mailbox = self.subscription._mailbox
        while True:
            try:
                event = mailbox.get()
            except MailboxClosed:
                return
            try:
                self.callback(event)
            except Exception as err:
                self.subscription.close()
                warnings.warn(f"StepEvent subscriber {self.callback!r} raised {err!r} and was unsubscribed")
                return
            finally:
                mailbox.task_done()

    def flush(self, timeout: float) -> bool:
        return self.subscription._mailbox.join(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Unsubscribe once the callback has seen every event published so far, so that e.g. a
        TraceRecorder can be closed right after."""
        if threading.current_thread() is not self._thread:
            self.flush(timeout)
        self.subscription.close()


class EventHub:
    """The engine's subscribers. Subscribing and closing are thread-safe; `publish` runs on the step thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: tuple[EventSubscription, ...] = ()  # replaced, never mutated: publish reads it lock-free
        self._callbacks: tuple[CallbackSubscriber, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._subscriptions)

    def subscribe(self, *, user: str | None = None, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> EventSubscription:
        subscription = EventSubscription(self, user=user, pages=pages, maxsize=maxsize, max_rate=max_rate)
        with self._lock:
            self._subscriptions += (subscription,)
        return subscription

    def subscribe_callback(self, callback: Callable[[StepEvent], None], *, pages: bool = False,
                           maxsize: int = 4096) -> CallbackSubscriber:
        subscriber = CallbackSubscriber(self.subscribe(pages=pages, maxsize=maxsize), callback)
        with self._lock:
            self._callbacks += (subscriber,)
        return subscriber

    def publish(self, event: StepEvent, page_owner: Callable[[], np.ndarray]) -> None:
        """`page_owner` is called at most once, and only if a subscriber asked for pages."""
        with_pages = None
        for subscription in self._subscriptions:
            if subscription.pages:
                if with_pages is None:
                    with_pages = replace(event, page_owner=page_owner().astype(np.int32))
                subscription._put(with_pages)
            else:
                subscription._put(event)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every callback has seen every event published so far (for single-threaded
        use, where the caller reads what its callback collected right after a step)."""
        for subscriber in self._callbacks:
            subscriber.flush(timeout)

    def close(self) -> None:
        for subscription in self._subscriptions:
            subscription._mailbox.close()
        with self._lock:
            self._subscriptions, self._callbacks = (), ()

    def _remove(self, subscription: EventSubscription) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)
            self._callbacks = tuple(c for c in self._callbacks if c.subscription is not subscription)
