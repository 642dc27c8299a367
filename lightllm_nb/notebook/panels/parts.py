"""A panel is made of parts; each keeps its own state from StepEvents and draws one view.

`consume(event)` runs for every event on the panel's pump thread and stays cheap; `render()` runs
at most ~10 times a second and sends one message with what changed since the last one.
"""

from __future__ import annotations

from ...telemetry.events import StepEvent
from .history import BatchHistory, DecisionLog, EngineTrends, RecentItems
from .kv_grid import KVGrid, page_holders
from .views import BatchBarsView, DecisionsView, KVGridView, SparklinesView


class KVPart:
    needs_pages = True

    def __init__(self, max_cells: int = 4096):
        self.grid = KVGrid(max_cells)
        self.view = KVGridView()
        self.latest: StepEvent | None = None
        self._drawn: StepEvent | None = None

    def reset(self) -> None:
        self.latest = None

    def consume(self, event: StepEvent) -> None:
        # The grid is computed at render time: only the latest state is drawn. Most events of a reader
        # of every step come without a map (hub.PAGE_MAPS_PER_SECOND): the last map and its step stay.
        if event.page_owner is not None or self.latest is None or self.latest.page_owner is None:
            self.latest = event

    def resend(self) -> None:
        self.grid.resend()
        self._drawn = None

    def render(self) -> None:
        event = self.latest
        if event is None or event is self._drawn:
            return
        self._drawn = event
        if event.page_owner is None:
            info = (f"step {event.step}: this event has no page owners (a trace recorded without pages: "
                    "record with engine.subscribe(TraceRecorder(path), pages=True))")
            self.view.send({"kind": "grid", "info": info, "cells": 0, "step": event.step})
            return
        self.grid.update(event.page_owner)
        patch = self.grid.patch()
        self.view.send(self.message(event, patch.full),
                       buffers=[patch.indices.tobytes(), patch.owners.tobytes(), patch.fills.tobytes()])

    def message(self, event: StepEvent, full: bool) -> dict:
        g = self.grid
        in_use = event.kv_capacity - event.kv_free
        info = (f"step {event.step}: {in_use:,} of {event.kv_capacity:,} tokens held by requests "
                f"({100 * in_use / max(1, event.kv_capacity):.1f}%), {event.kv_cached:,} reclaimable prefix cache; "
                f"{event.running} running, {event.waiting} waiting; fragmentation {g.fragmentation:.2f}; "
                f"{g.pages_per_cell} page{'s' if g.pages_per_cell > 1 else ''} per cell")
        return {"kind": "grid", "full": full, "cells": len(g.owners), "cols": _columns(len(g.owners)),
                "pages": g.num_pages, "pages_per_cell": g.pages_per_cell, "page_size": event.page_size,
                "rows": {str(k): v for k, v in page_holders(g.row_pages, event.kv_holders).items()},
                "info": info, "step": event.step, "used": in_use}


class ItemsPart:
    """A part whose view appends items (steps, decisions): each render sends only the new ones."""

    needs_pages = False

    def __init__(self, store: RecentItems, view):
        self.store, self.view = store, view
        self._added = 0      # items added since the last render
        self._reset = True   # the view must get everything

    def reset(self) -> None:
        self.store.clear()
        self.resend()

    def consume(self, event: StepEvent) -> None:
        self._added += self.store.add(event)

    def resend(self) -> None:
        self._reset = True

    def render(self) -> None:
        if not self._reset and not self._added:
            return
        items = list(self.store.items)
        reset = self._reset or self._added > len(items)  # the view missed some that already fell off
        self.view.send({"kind": "items", "reset": reset, "items": items if reset else items[-self._added:]})
        self._reset, self._added = False, 0


def batch_part(steps: int = 60) -> ItemsPart:
    return ItemsPart(BatchHistory(steps), BatchBarsView(steps_shown=steps))


def decisions_part(limit: int = 2000) -> ItemsPart:
    return ItemsPart(DecisionLog(limit), DecisionsView(limit=limit))


class TrendsPart:
    needs_pages = False
    SERIES = [["throughput", "tokens/s"], ["ttft", "TTFT s"], ["queue", "waiting"]]

    def __init__(self, points: int = 120):
        self.points = points
        self.trends = EngineTrends(points)
        self.view = SparklinesView(series=self.SERIES)
        self._changed = False

    def reset(self) -> None:
        self.trends = EngineTrends(self.points)
        self._changed = True

    def consume(self, event: StepEvent) -> None:
        self.trends.add(event)
        self._changed = True

    def resend(self) -> None:
        self._changed = True

    def render(self) -> None:
        if self._changed:
            self._changed = False
            self.view.send({"kind": "series", "values": self.trends.view()})


def _columns(cells: int) -> int:
    return max(1, min(64, cells))
