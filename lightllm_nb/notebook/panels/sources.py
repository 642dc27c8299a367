"""Where a panel's StepEvents come from: a live Engine, a Client (embedded or remote), or a saved
trace (a JSON-lines file from TraceRecorder, or a list of events) that a slider replays."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ...engine.engine import Engine
from ...telemetry.events import StepEvent
from ...telemetry.traces import load_trace


def trace_events(source) -> list[StepEvent] | None:
    """The events of a saved trace, or None when `source` is live (an Engine or a Client)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no trace at {path}: pass an Engine, a Client, or a JSON-lines file "
                                    "written by TraceRecorder")
        return load_trace(path)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(e, StepEvent) for e in source):
            raise TypeError("a trace given as a list must hold StepEvents")
        return list(source)
    return None


def follow(source, deliver: Callable[[StepEvent], None], *, pages: bool, max_rate: float) -> Callable[[], None]:
    """Call `deliver` with new StepEvents of a live source, at most `max_rate` a second (a panel
    draws no faster): the newest step each time, carrying the decisions of the steps it skipped, so
    a decision log misses nothing and a KV grid shows the latest map while the engine's step pays
    for ~10 events a second, not one per step per panel. Returns a function that stops."""
    if isinstance(source, Engine):
        return source.subscribe(deliver, pages=pages, max_rate=max_rate)
    if callable(getattr(source, "subscribe", None)):
        return _follow_client(source, deliver, pages, max_rate)
    raise TypeError(f"cannot watch {type(source).__name__}: pass an Engine, a Client (lightllm_nb.connect() "
                    "or engine.client()), a trace file path or a list of StepEvents")


def _follow_client(client, deliver: Callable[[StepEvent], None], pages: bool, max_rate: float) -> Callable[[], None]:
    subscription = client.subscribe(pages=pages, max_rate=max_rate)

    def read() -> None:
        for event in subscription:  # ends when the subscription is closed
            deliver(event)

    threading.Thread(target=read, name="lightllm-panel-events", daemon=True).start()
    return subscription.close
