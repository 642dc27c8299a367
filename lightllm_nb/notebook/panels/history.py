"""What BatchPanel, SchedulerPanel and the Dashboard's sparklines draw, kept from StepEvents alone."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

from ...telemetry.events import StepEvent


class RecentItems(ABC):
    """The newest `limit` items made from events, oldest first."""

    def __init__(self, limit: int):
        self.items: deque[dict] = deque(maxlen=limit)

    def add(self, event: StepEvent) -> int:
        """Adds the event's items; returns how many."""
        new = self.items_of(event)
        self.items.extend(new)
        return len(new)

    @abstractmethod
    def items_of(self, event: StepEvent) -> list[dict]:
        """The items one event adds (each kind of history says which)."""

    def clear(self) -> None:
        self.items.clear()


class BatchHistory(RecentItems):
    """One item per step: its rows (request, user, phase, tokens), for a bar per step."""

    def __init__(self, steps: int = 60):
        super().__init__(steps)

    def items_of(self, event: StepEvent) -> list[dict]:
        return [{"step": event.step,
                 "rows": [{"request": r.request_id, "user": r.user, "phase": r.phase, "tokens": r.tokens}
                          for r in event.rows]}]


class DecisionLog(RecentItems):
    """Every scheduler decision with its step; old ones drop off past `limit`."""

    def __init__(self, limit: int = 2000):
        super().__init__(limit)

    def items_of(self, event: StepEvent) -> list[dict]:
        return [{"step": event.step, "time": round(event.time, 4), "kind": d.kind, "request": d.request_id,
                 "user": d.user, "reason": d.reason, "numbers": d.numbers} for d in event.decisions]


class EngineTrends:
    """Sparkline series: tokens per second, time to first token and queue length over recent events.

    Exact however few of the steps it sees (a panel drawing 10 a second sees ~1 in 50 of a GPU's,
    issue 10): tokens per second is the difference of the engine's token totals (prompt and decode
    tokens computed) over the last second of events, and time to first token (arrival to first
    token, as in a Completion's metrics) comes for every request, its step skipped or not. A trace
    recorded before those totals has every step: its tokens are added up here, and it has no
    first-token times.
    """

    def __init__(self, points: int = 120):
        self.throughput: deque[float] = deque(maxlen=points)
        self.ttft: deque[float] = deque(maxlen=points)
        self.queue: deque[int] = deque(maxlen=points)
        self._counted = 0  # tokens added up from the steps of a trace without totals
        self._window: deque[tuple[float, int]] = deque()  # (end, tokens computed by then): the last second

    def add(self, event: StepEvent) -> None:
        end = event.time + event.duration
        total = event.computed_tokens_total
        if total is None:
            self._counted += event.prefill_tokens + event.decode_tokens
            total = self._counted
        if not self._window:  # the first event: rate over its own step
            self._window.append((event.time, total - event.prefill_tokens - event.decode_tokens))
        self._window.append((end, total))
        while len(self._window) > 2 and self._window[1][0] <= end - 1.0:
            self._window.popleft()
        since, before = self._window[0]
        self.throughput.append((total - before) / max(end - since, 1e-6))
        self.ttft.extend(event.first_token_seconds or ())
        self.queue.append(event.waiting)

    def view(self) -> dict:
        return {"throughput": list(self.throughput), "ttft": list(self.ttft), "queue": list(self.queue)}
