"""StepEvents leave the step thread here: the step only drops each event into its subscribers'
bounded mailboxes; redaction, callbacks and trace writing happen on the readers' side.

A slow reader loses its oldest events (counted in `dropped`), it never slows a step. The page map
is copied (int32, one entry per page) at most once per step, only on steps where a subscriber
that asked for it is due one: at most PAGE_MAPS_PER_SECOND a reader, and for a rate-capped one once
per gap (see `EventSubscription.wants_map`); an engine's copy takes only the blocks of pages that
changed (kv/page_maps.py). What an event leaves for readers to
build (its rows and KV holders: step_rows.py; the joined page map) is built on the thread of the
first reader that takes it, into the event, for every reader.

A front-end process (`serve --api-server-count N`) keeps a hub of its own, fed by one raw
subscription in the engine's process that carries what its subscribers together ask for (`demand`):
redaction and rate caps then cost the front end's GIL, not the engine's.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .events import StepEvent
from .mailbox import Mailbox, MailboxClosed
from ..kv.page_maps import PageMap
from .step_rows import BuiltOnRead

PAGE_MAPS_PER_SECOND = 20
"""The most page maps one reader gets a second, even a reader of every step: its other events carry
page_owner=None. Each map is joined (15 MB at a GPU pool's 3.7M pages) and, served, turned into bytes
on a reader's thread, holding the GIL against the step: a map every step made 8 subscribers' step
4.8x the step with none on an H200 (issue 8). A KV grid draws at most 10 a second (issue 10)."""


class EventSubscription:
    """StepEvents, oldest first: iterate (blocking) or `async for` them; `close()` ends it.
    `user=None` sees everything (the operator); otherwise each event is redacted for `user`.

    With `max_rate` (events a second, for a reader that only draws) the latest event wins: the
    reader sleeps out the gap while steps queue up unread, then gets the newest step carrying every
    decision of the steps it skipped, redacted once. A reader at every step costs the step thread
    its redaction and encoding in GIL time (issue 8); at 10/s that is a few percent of it."""

    def __init__(self, hub: "EventHub", *, user: str | None, pages: bool, maxsize: int,
                 max_rate: float | None = None):
        self.user = user
        self._hub = hub
        self._mailbox = Mailbox(maxsize)
        self._aliases: dict[str, str] = {}  # this reader's own random aliases for other users' ids
        self._next_due = 0.0  # time.monotonic() before which a rate-capped reader takes nothing
        self._lost_upstream = 0  # events lost before they reached this hub (a front end's link to the engine)
        self._mapped_for = -1.0  # the `_next_due` whose page map a step has copied (rate-capped readers)
        self._next_map = 0.0  # time.monotonic() before which no step copies a map for this reader
        self._due_seen = -1.0  # the `_next_due` that `wants_map` last found due (step thread)
        self.retune(pages=pages, max_rate=max_rate)

    def retune(self, *, pages: bool, max_rate: float | None) -> None:
        """Change what this reader asks for without a gap or a repeat in its events (a front end's raw
        subscription follows its own subscribers'); it applies from the next step published."""
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate={max_rate!r} must be positive (events a second), or None for every step")
        self.pages = pages
        self.max_rate = max_rate
        self._gap = None if max_rate is None else 1.0 / max_rate

    @property
    def dropped(self) -> int:
        """Events this reader lost because it (or the front end it reads through) fell behind by more
        than `maxsize`; a rate cap's skipped steps are not lost (their decisions come with the next)."""
        return self._mailbox.dropped + self._lost_upstream

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def get(self, timeout: float | None = None) -> StepEvent:
        """The next event; StopIteration once closed and drained, TimeoutError after `timeout`."""
        return self._take(timeout)[0]

    def _take(self, timeout: float | None) -> tuple[StepEvent, int]:
        """`get`, and how many published events the one returned stands for (1 unless rate-capped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._gap is not None:
            due = self._next_due if deadline is None else min(self._next_due, deadline)
            time.sleep(max(0.0, due - time.monotonic()))

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            first = self._mailbox.get(left())
        except MailboxClosed:
            raise StopIteration from None
        batch = self._queued(first)
        if self._map_due(batch):
            until = time.monotonic() + self._gap
            while batch[-1].page_owner is None:  # a front end's upstream may bring its map a step later
                try:
                    wait = max(0.0, until - time.monotonic())
                    batch.append(self._mailbox.get(wait if deadline is None else min(wait, left())))
                except MailboxClosed:
                    break
                except TimeoutError:
                    batch[-1] = self._with_map_now(batch[-1])
                    break
        event, taken = self._latest(batch)
        return self._view(event), taken

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
        batch = self._queued(first)
        if self._map_due(batch):
            until = time.monotonic() + self._gap
            while batch[-1].page_owner is None:
                try:
                    batch.append(await asyncio.wait_for(self._mailbox.aget(), max(0.0, until - time.monotonic())))
                except MailboxClosed:
                    break
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    batch[-1] = self._with_map_now(batch[-1])
                    break
        return self._view(self._latest(batch)[0])

    def close(self) -> None:
        self._hub._remove(self)
        self._mailbox.close()

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, event: StepEvent) -> None:
        self._mailbox.put(event)

    def _queued(self, first: StepEvent) -> list[StepEvent]:
        """`first` and, for a rate-capped reader, every step queued behind it."""
        if self._gap is None:
            return [first]
        try:
            return [first] + self._mailbox.get_all(timeout=0)
        except MailboxClosed:  # closed right after `first`: it is the last one
            return [first]

    def _map_due(self, batch: list[StepEvent]) -> bool:
        """A rate-capped reader of pages whose newest queued step came without a map: it is due now, so
        a step brings one (see `wants_map`) if its source has one; wait up to a gap for that step. Not
        only when every queued step lacks one: a map for this gap can come on a step that more steps
        followed before the reader took them, and showing that one leaves the newest state unshown
        for good when no step follows (a burst that ends)."""
        return self._gap is not None and self.pages and batch[-1].page_owner is None

    def _with_map_now(self, event: StepEvent) -> StepEvent:
        """`event`, the newest step, with the page map as it is now: no step followed it within a gap
        (an engine stepped by hand, or one whose running requests wait), so the map is still that
        step's, copied here on the reader's thread. A step starting during the copy could mix in
        its first pages; a panel draws the next map a gap later."""
        owners = self._hub.current_page_map()
        return event if owners is None else replace(event, page_owner=owners)

    def _latest(self, batch: list[StepEvent]) -> tuple[StepEvent, int]:
        """Rate-capped: the newest step with a page map if the reader asked for pages (the map and
        its step's numbers agree), else the newest, with the decisions and first-token times of
        every step since the last one delivered (none is lost unless the mailbox overflowed, which `dropped` counts), and how
        many steps that is."""
        if self._gap is None:
            return batch[0], 1
        self._next_due = time.monotonic() + self._gap
        if len(batch) == 1:
            return batch[0], 1
        shown = next((event for event in reversed(batch) if event.page_owner is not None), batch[-1]) \
            if self.pages else batch[-1]
        merged = replace(shown, decisions=[d for event in batch for d in event.decisions],
                         first_token_seconds=_first_token_seconds(batch))
        return merged, len(batch)

    def wants_map(self, event: StepEvent, now: float) -> bool:
        """Called on the step thread for a reader that asked for pages: whether this step's page map
        goes to it. Any step that leaves nothing running does (the engine may idle after it, and the
        last state must show); otherwise at most PAGE_MAPS_PER_SECOND, and for a rate-capped reader
        only the first step after it is due (one map a gap). Copying a 3.7M-page map every step cost
        ~1 ms of a 2 ms step (issue 10); joining and encoding it on readers' threads, 4.8x (issue 8)."""
        if event.running == 0:
            return True
        if now < self._next_map:
            return False
        if self._gap is None:
            return True
        due = self._next_due  # read once: the reader moves it on its own thread
        if due == self._mapped_for or now < due:
            return False
        self._due_seen = due
        return True

    def _map_sent(self, now: float) -> None:
        """A step put a map in this reader's mailbox (not only wanted one: a front end's upstream step
        may come without, and the reader is still due for the next that has one)."""
        self._next_map = now + 1.0 / PAGE_MAPS_PER_SECOND
        self._mapped_for = self._due_seen

    def _view(self, event: StepEvent) -> StepEvent:
        _build(event)
        return event if self.user is None else event.redacted_for(self.user, self._aliases)


class CallbackSubscriber:
    """Calls `callback(event)` for every event on its own daemon thread (at most `max_rate` times a
    second if its subscription is rate-capped); a callback that raises is unsubscribed with a
    warning, so a broken panel never costs anyone their results."""

    def __init__(self, subscription: EventSubscription, callback: Callable[[StepEvent], None]):
        self.subscription = subscription
        self.callback = callback
        self._thread = threading.Thread(target=self._run, name="lightllm-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        mailbox = self.subscription._mailbox
        while True:
            try:
                event, taken = self.subscription._take(None)
            except StopIteration:
                return
            try:
                self.callback(event)
            except Exception as err:
                self.subscription.close()
                warnings.warn(f"StepEvent subscriber {self.callback!r} raised {err!r} and was unsubscribed")
                return
            finally:
                for _ in range(taken):
                    mailbox.task_done()

    @property
    def waited_for(self) -> bool:
        """Whether `flush` waits for it: a rate-capped callback only draws, and waiting for it would
        hold every single-threaded step up to its gap."""
        return self.subscription.max_rate is None

    def flush(self, timeout: float) -> bool:
        return self.subscription._mailbox.join(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Unsubscribe once the callback has seen every event published so far (unless it is
        rate-capped), so that e.g. a TraceRecorder can be closed right after."""
        if threading.current_thread() is not self._thread and self.waited_for:
            self.flush(timeout)
        self.subscription.close()


@dataclass(frozen=True)
class Demand:
    """What one upstream subscription must carry to serve every subscriber of a hub: the page map
    if any asks for it; every step if any wants every step, else the fastest rate asked for (a
    slower reader's own cap merges further). Pages at every step cost no map a step: a map reaches
    any reader at most PAGE_MAPS_PER_SECOND, the upstream too."""

    pages: bool
    max_rate: float | None


class EventHub:
    """The engine's subscribers. Subscribing and closing are thread-safe; `publish` runs on the step
    thread. `on_change()` is called (on the subscribing or closing thread) whenever the set of
    subscribers changes, for a hub that is fed by an upstream subscription (see `demand`)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._subscriptions: tuple[EventSubscription, ...] = ()  # replaced, never mutated: publish reads it lock-free
        self._callbacks: tuple[CallbackSubscriber, ...] = ()
        self._on_change = on_change
        self._page_owner: Callable[[], np.ndarray | None] = lambda: None  # the newest step's (see publish)

    def __bool__(self) -> bool:
        return bool(self._subscriptions)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, *, user: str | None = None, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> EventSubscription:
        subscription = EventSubscription(self, user=user, pages=pages, maxsize=maxsize, max_rate=max_rate)
        with self._lock:
            self._subscriptions += (subscription,)
        self._changed()
        return subscription

    def subscribe_callback(self, callback: Callable[[StepEvent], None], *, pages: bool = False,
                           maxsize: int = 4096, max_rate: float | None = None) -> CallbackSubscriber:
        subscriber = CallbackSubscriber(self.subscribe(pages=pages, maxsize=maxsize, max_rate=max_rate), callback)
        with self._lock:
            self._callbacks += (subscriber,)
        return subscriber

    def demand(self) -> Demand | None:
        """What an upstream subscription feeding this hub must carry now; None without subscribers."""
        subscriptions = self._subscriptions
        if not subscriptions:
            return None
        rates = [s.max_rate for s in subscriptions]
        return Demand(pages=any(s.pages for s in subscriptions),
                      max_rate=None if None in rates else max(rates))

    def publish(self, event: StepEvent, page_owner: Callable[[], PageMap | np.ndarray | None]) -> None:
        """`page_owner` is called at most once, and only if a subscriber of pages is due a map: a copy
        (PageMap) or the map itself (an array, copied here); None: this step has no map, e.g. a
        front end's upstream that does not carry pages yet. It must also be safe to call from a
        reader's thread (see `current_page_map`)."""
        self._page_owner = page_owner
        now = time.monotonic()
        with_pages = None
        for subscription in self._subscriptions:
            if subscription.pages and subscription.wants_map(event, now):
                if with_pages is None:
                    with_pages = replace(event, page_owner=_copied(page_owner()))
                if with_pages.page_owner is not None:
                    subscription._map_sent(now)
                    subscription._put(with_pages)
                    continue
            subscription._put(event)

    def current_page_map(self) -> PageMap | np.ndarray | None:
        """A copy of the page map as the newest step's `page_owner` gives it now, on the caller's thread."""
        return _copied(self._page_owner())

    def report_lost(self, count: int) -> None:
        """`count` events never reached this hub (its upstream fell behind): every reader is told."""
        for subscription in self._subscriptions:
            subscription._lost_upstream += count

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every callback that is not rate-capped has seen every event published so far
        (for single-threaded use, where the caller reads what its callback collected right after a step)."""
        for subscriber in self._callbacks:
            if subscriber.waited_for:
                subscriber.flush(timeout)

    def close(self) -> None:
        for subscription in self._subscriptions:
            subscription._mailbox.close()
        with self._lock:
            self._subscriptions, self._callbacks = (), ()
        self._page_owner = lambda: None  # it holds the engine's pool: let it go with the engine

    def _remove(self, subscription: EventSubscription) -> None:
        with self._lock:
            before = len(self._subscriptions)
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)
            self._callbacks = tuple(c for c in self._callbacks if c.subscription is not subscription)
            removed = len(self._subscriptions) < before
        if removed:
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def _copied(owners: PageMap | np.ndarray | None) -> PageMap | np.ndarray | None:
    """A map the step hands out: a PageMap is a copy already; an array is copied (as int32)."""
    return owners if owners is None or isinstance(owners, PageMap) else owners.astype(np.int32)


def _first_token_seconds(batch: list[StepEvent]) -> list[float] | None:
    """Every first-token time of the steps of `batch` (None if its steps predate them)."""
    if batch[-1].first_token_seconds is None:
        return None
    return [seconds for event in batch for seconds in event.first_token_seconds or ()]


def _build(event: StepEvent) -> None:
    """Build into `event` what its step left to readers: its rows, its KV holders, its page map as one
    array. The first reader builds them; later readers of the same event find them built."""
    if isinstance(event.rows, BuiltOnRead):
        event.rows = event.rows.items()
    if isinstance(event.kv_holders, BuiltOnRead):
        event.kv_holders = event.kv_holders.items()
    if isinstance(event.page_owner, PageMap):
        event.page_owner = event.page_owner.array()
