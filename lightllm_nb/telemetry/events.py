"""One StepEvent per engine step: the single source for panels, metrics, traces and the CLI summary."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from typing import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..scheduling.decisions import Decision


@dataclass
class BatchRow:
    request_id: str
    user: str
    phase: str          # "prefill" or "decode"
    tokens: int         # tokens computed for this request in this step
    context: int        # its context length after the step
    allowed_tokens: int | None = None  # structured output: tokens its grammar's mask allowed this step


@dataclass
class StepEvent:
    step: int
    time: float                 # seconds since the engine started
    duration: float             # wall seconds of this step
    rows: list[BatchRow]
    decisions: list[Decision]
    kv_capacity: int
    kv_free: int
    kv_cached: int              # reclaimable prefix-cache tokens, included in kv_free
    running: int
    waiting: int
    page_size: int
    page_owner: list[int] | None = None   # per page: owner row, -1 free, -2 cached, -3 shared (when asked for)

    @property
    def prefill_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "prefill")

    @property
    def decode_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "decode")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepEvent":
        return cls(**{**d, "rows": [BatchRow(**r) for r in d["rows"]],
                      "decisions": [Decision(**x) for x in d["decisions"]]})

    def redacted_for(self, user: str) -> "StepEvent":
        """The event as `user` may see it: other users' requests keep their numbers but lose their
        names and ids (a stable pseudonym per request), so a shared engine leaks no identities."""
        names = {}

        def alias(request_id: str | None, owner: str | None) -> str | None:
            if request_id is None or owner == user:
                return request_id
            return names.setdefault(request_id, "other-" + hashlib.sha256(request_id.encode()).hexdigest()[:8])

        rows = [r if r.user == user else replace(r, request_id=alias(r.request_id, r.user), user="other")
                for r in self.rows]
        hidden = [replace(d, request_id=alias(d.request_id, d.user), user="other") if d.user != user else d
                  for d in self.decisions]
        decisions = []
        for d in hidden:  # reasons may name another user's request ("req-3 needs room")
            reason = d.reason
            for real, fake in names.items():
                reason = re.sub(rf"(?<![\w-]){re.escape(real)}(?![\w-])", fake, reason)
            decisions.append(replace(d, reason=reason))
        return replace(self, rows=rows, decisions=decisions)

    def summary(self) -> str:
        used = self.kv_capacity - self.kv_free
        kinds = {}
        for d in self.decisions:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        extra = " ".join(f"{k}={v}" for k, v in kinds.items())
        return (f"step {self.step:4d} | batch {len(self.rows):3d} rows: {self.prefill_tokens:5d} prefill + "
                f"{self.decode_tokens:3d} decode tokens | KV {used:6d}/{self.kv_capacity} "
                f"({100 * used / self.kv_capacity:5.1f}%) | running {self.running} waiting {self.waiting}"
                + (f" | {extra}" if extra else ""))


class EventHub:
    """Delivers each StepEvent to its subscribers; one that raises is dropped with a warning, so a
    broken panel never costs anyone their results."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[Callable[[StepEvent], None], bool]] = []  # (callback, wants pages)

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, callback: Callable[[StepEvent], None], pages: bool) -> Callable[[], None]:
        entry = (callback, pages)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry)

    def publish(self, event: StepEvent, page_owner: Callable[[], list[int]]) -> None:
        """`page_owner` is called at most once, and only if a subscriber asked for pages."""
        with_pages = None
        for entry in list(self._subscribers):
            callback, pages = entry
            if pages and with_pages is None:
                with_pages = replace(event, page_owner=page_owner())
            try:
                callback(with_pages if pages else event)
            except Exception as err:
                self._subscribers.remove(entry)
                warnings.warn(f"StepEvent subscriber {callback!r} raised {err!r} and was unsubscribed")

    def clear(self) -> None:
        self._subscribers.clear()


class TraceRecorder:
    """A subscriber that appends every StepEvent to a JSON-lines file: `engine.subscribe(TraceRecorder(p))`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("w", encoding="utf-8")

    def __call__(self, event: StepEvent) -> None:
        self._file.write(json.dumps(event.to_dict(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def load_trace(path: str | Path) -> list[StepEvent]:
    with Path(path).open(encoding="utf-8") as f:
        return [StepEvent.from_dict(json.loads(line)) for line in f if line.strip()]
