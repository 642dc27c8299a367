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
    """Sparkline series: tokens per second, time to first token and queue length over recent steps.

    Time to first token is counted from a request's first scheduling decision (admit or defer:
    the moment the engine saw it) to the end of the step that computed its last prompt token
    (the step before its first decode, or the step it finished in); StepEvents do not carry
    arrival times, so queueing before that first decision is not in it.
    """

    def __init__(self, points: int = 120):
        self.throughput: deque[float] = deque(maxlen=points)
        self.ttft: deque[float] = deque(maxlen=points)
        self.queue: deque[int] = deque(maxlen=points)
        self._first_seen: dict[str, float] = {}
        self._prefill_end: dict[str, float] = {}
        self._window: deque[tuple[float, float, int]] = deque()  # (start, end, tokens): steps of the last second

    def add(self, event: StepEvent) -> None:
        end = event.time + event.duration
        for d in event.decisions:
            if d.request_id is not None and d.kind in ("admit", "defer"):
                self._first_seen.setdefault(d.request_id, event.time)
        for r in event.rows:
            if r.phase == "prefill":
                self._prefill_end[r.request_id] = end
            else:
                self._first_token(r.request_id)
        for d in event.decisions:
            if d.kind == "finish":
                self._first_token(d.request_id)
                self._first_seen.pop(d.request_id, None)
                self._prefill_end.pop(d.request_id, None)
        self._window.append((event.time, end, event.prefill_tokens + event.decode_tokens))
        while self._window[0][1] < end - 1.0:
            self._window.popleft()
        tokens = sum(n for _, _, n in self._window)
        self.throughput.append(tokens / max(end - self._window[0][0], 1e-6))
        self.queue.append(event.waiting)

    def _first_token(self, request_id: str) -> None:
        seen, prefilled = self._first_seen.get(request_id), self._prefill_end.pop(request_id, None)
        if seen is not None and prefilled is not None:
            self.ttft.append(prefilled - seen)
            del self._first_seen[request_id]

    def view(self) -> dict:
        return {"throughput": list(self.throughput), "ttft": list(self.ttft), "queue": list(self.queue)}
