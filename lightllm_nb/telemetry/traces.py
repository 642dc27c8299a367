"""StepEvents to and from JSON-lines files."""

from __future__ import annotations

import json
from pathlib import Path

from .events import StepEvent


class TraceRecorder:
    """A subscriber that appends every StepEvent to a JSON-lines file: `engine.subscribe(TraceRecorder(p))`.
    The engine calls it on an event-delivery thread, never on the step thread."""

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
