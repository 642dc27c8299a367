"""Panels over StepEvents: KVCachePanel, BatchPanel, SchedulerPanel and the Dashboard of all three.

Each takes a live `Engine`, a `Client` (embedded or remote) or a saved trace (a TraceRecorder
file or a list of StepEvents; a slider then picks the step). Live panels keep updating after the
cell that made them finishes, at most `rate` times a second, from a background thread; `close()`
(or closing the widget) unsubscribes and stops that thread.

A view that opens says "hello" and is sent everything; but a view that opens while the kernel is
busy (the `%%lightllm --panel` cell that made it is still generating) is heard only when the cell
ends: its hello waits in the kernel's queue. So until a part's view has been heard, the panel
sends that part's whole state again at most once every KEYFRAME_SECONDS; a late view draws
within that long instead of after the answer.
"""

from __future__ import annotations

import time

import ipywidgets as widgets

from .parts import KVPart, TrendsPart, batch_part, decisions_part
from .pump import Pump
from .sources import follow, trace_events


class Panel:
    title = "lightllm"
    KEYFRAME_SECONDS = 1.0

    def __init__(self, source, parts: list, *, rate: float = 10.0):
        self.parts = parts
        self._pump: Pump | None = None
        self._unfollow = None
        self._unheard = list(parts)     # parts whose view has not said hello yet (read on the pump thread)
        self._last_keyframe = time.monotonic()
        self.events = trace_events(source)
        children = [part.view for part in parts]
        for part in parts:
            part.view.on_hello(lambda part=part: self._hello(part))
        if self.events is not None:
            if not self.events:
                raise ValueError("the trace has no events: record some steps first")
            self.slider = widgets.IntSlider(value=len(self.events), min=1, max=len(self.events),
                                            description="step", continuous_update=True,
                                            layout=widgets.Layout(width="560px"))
            self.slider.observe(lambda change: self.show(change["new"]), names="value")
            children.insert(0, self.slider)
            self.show(len(self.events))
        else:
            self._pump = Pump(self._consume, self._render, rate=rate, name=f"lightllm-{type(self).__name__}")
            self._unfollow = follow(source, self._pump.push, pages=any(p.needs_pages for p in parts), max_rate=rate)
        self.widget = widgets.VBox(children)

    def _consume(self, event) -> None:
        for part in self.parts:
            part.consume(event)

    def _render(self) -> None:
        unheard = self._unheard
        if unheard and time.monotonic() - self._last_keyframe >= self.KEYFRAME_SECONDS:
            self._last_keyframe = time.monotonic()
            for part in unheard:
                part.resend()
        for part in self.parts:
            part.render()

    def _hello(self, part) -> None:
        # A new list, not a removal in place: the pump thread may be iterating the old one.
        self._unheard = [p for p in self._unheard if p is not part]
        self._resend(part)

    def _resend(self, part) -> None:
        part.resend()
        if self._pump is not None:
            self._pump.request_render()
        else:
            part.render()

    def show(self, count: int) -> None:
        """Replay: draw the state after the first `count` events of the trace."""
        if self.events is None:
            raise RuntimeError("show() replays a saved trace; this panel is live")
        for part in self.parts:
            part.reset()
        for event in self.events[:count]:
            self._consume(event)
        self._render()

    @property
    def running(self) -> bool:
        return self._pump is not None and self._pump.running

    def close(self) -> None:
        """Stop following the engine and close the widgets; safe to call twice."""
        if self._unfollow is not None:
            self._unfollow, unfollow = None, self._unfollow
            unfollow()
        if self._pump is not None:
            self._pump.stop()
        for part in self.parts:
            part.view.close()
        self.widget.close()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class KVCachePanel(Panel):
    """The KV pool as a grid of cells coloured by owner: requests, prefix cache (shared or
    reclaimable), free; a million-slot pool is aggregated into at most `max_cells` cells."""

    def __init__(self, source, *, max_cells: int = 4096, rate: float = 10.0):
        super().__init__(source, [KVPart(max_cells)], rate=rate)


class BatchPanel(Panel):
    """Tokens per step by request and phase (prefill chunk vs decode), the last `steps` steps."""

    def __init__(self, source, *, steps: int = 60, rate: float = 10.0):
        super().__init__(source, [batch_part(steps)], rate=rate)


class SchedulerPanel(Panel):
    """Scheduler decisions (admit, defer, preempt, resume, finish, prefix hit, evict) as a timeline
    and a filterable table with their reasons and numbers."""

    def __init__(self, source, *, limit: int = 2000, rate: float = 10.0):
        super().__init__(source, [decisions_part(limit)], rate=rate)


class Dashboard(Panel):
    """Throughput, TTFT and queue sparklines over the KV grid, the batch bars and the decisions."""

    def __init__(self, source, *, max_cells: int = 4096, steps: int = 60, limit: int = 2000, rate: float = 10.0):
        super().__init__(source, [TrendsPart(), KVPart(max_cells), batch_part(steps), decisions_part(limit)],
                         rate=rate)
