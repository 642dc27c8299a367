"""StepEvents leave the step thread here: the step only drops each event into its subscribers'
bounded mailboxes; redaction, callbacks and trace writing happen on the readers' side.

A slow reader loses its oldest events (counted in `dropped`), it never slows a step. The page map
is copied (int32, one entry per page) once per step, and only when a subscriber asked for it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import replace
from typing import Callable

import numpy as np

from .events import StepEvent
from .mailbox import Mailbox, MailboxClosed


class EventSubscription:
    """StepEvents, oldest first: iterate (blocking) or `async for` them; `close()` ends it.
    `user=None` sees everything (the operator); otherwise each event is redacted for `user`."""

    def __init__(self, hub: "EventHub", *, user: str | None, pages: bool, maxsize: int):
        self.user = user
        self.pages = pages
        self._hub = hub
        self._mailbox = Mailbox(maxsize)
        self._aliases: dict[str, str] = {}  # this reader's own random aliases for other users' ids

    @property
    def dropped(self) -> int:
        """Events this reader lost because it fell behind by more than `maxsize`."""
        return self._mailbox.dropped

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def get(self, timeout: float | None = None) -> StepEvent:
        """The next event; StopIteration once closed and drained, TimeoutError after `timeout`."""
        try:
            return self._view(self._mailbox.get(timeout))
        except MailboxClosed:
            raise StopIteration from None

    def __iter__(self):
        return self

    def __next__(self) -> StepEvent:
        return self.get()

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepEvent:
        try:
            return self._view(await self._mailbox.aget())
        except MailboxClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._hub._remove(self)
        self._mailbox.close()

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, event: StepEvent) -> None:
        self._mailbox.put(event)

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

    def subscribe(self, *, user: str | None = None, pages: bool = False, maxsize: int = 256) -> EventSubscription:
        subscription = EventSubscription(self, user=user, pages=pages, maxsize=maxsize)
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
