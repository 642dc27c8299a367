"""A background thread between the engine's events and a panel's front end.

Events arrive on whatever thread produces them (the engine's step thread, a subscription
reader); the pump hands each to the panel's `consume` (cheap bookkeeping) on its own thread and
calls `render` (which sends to the browser) at most `rate` times a second: the latest state
wins, intermediate ones are never sent. The events wait in a bounded telemetry Mailbox: a slow
pump drops the oldest; it never blocks the producer, so a panel cannot slow a step.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Callable

from ...telemetry.mailbox import Mailbox, MailboxClosed


class Pump:
    def __init__(self, consume: Callable[[object], None], render: Callable[[], None], *,
                 rate: float = 10.0, backlog: int = 4096, name: str = "lightllm-panel"):
        if rate <= 0:
            raise ValueError(f"rate={rate} must be positive (renders per second)")
        self._consume, self._render = consume, render
        self._interval = 1.0 / rate
        self._events = Mailbox(backlog)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Events this pump lost because it fell behind by more than `backlog`."""
        return self._events.dropped

    def push(self, event) -> None:
        """Thread-safe; never blocks."""
        self._events.put(event)

    def request_render(self) -> None:
        """Render again soon (e.g. a new view opened), within the same rate limit."""
        self.push(None)

    def stop(self, timeout: float = 5.0) -> None:
        self._events.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        last_render = 0.0
        dirty = False
        while True:
            # Clean: sleep until something arrives. Dirty: only until the next render is due.
            wait = None if not dirty else max(0.0, last_render + self._interval - time.monotonic())
            try:
                batch = self._events.get_all(wait)
            except MailboxClosed:
                return
            if self._events.closed:  # stopped: what is still queued is never drawn
                return
            try:
                for event in batch:
                    if event is not None:
                        self._consume(event)
                dirty = dirty or bool(batch)
                if dirty and time.monotonic() - last_render >= self._interval:
                    last_render = time.monotonic()
                    dirty = False
                    self._render()
            except Exception as err:  # a panel that breaks stops updating; the engine is unaffected
                warnings.warn(f"panel stopped updating: {err!r}")
                return
