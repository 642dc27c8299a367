"""What `/api/events` writes for a StepEvent, made once per view and shared by every socket of that
view (issue 8: the per-step cost of the event stream must not grow with its readers).

A view is what one user may see of a step. A user with nothing of their own in a step (no row, KV
holder, decision or related request) sees exactly what every such user sees, so they all share one
anonymous view: redacted once, encoded to JSON once, its page map turned into bytes once. For that
the aliases are this server's, one random alias per request for every socket (never derived from
the id), rather than one set per socket. The operator's view is the event itself.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict

import numpy as np

from ..telemetry.events import StepEvent

# Not a valid user name (auth.valid_user_name): owns nothing, so its view is every stranger's.
_STRANGER = "\0stranger"
# Events whose views are kept: a reader behind by more redacts and encodes again. Few, since each may
# hold a page map twice (the array and its bytes: 1 MB each at 262k pages).
_RECENT = 8


class EventRecords:
    def __init__(self) -> None:
        self._lock = threading.Lock()   # readers may run on several threads (an in-process front end's)
        self._aliases: dict[str, str] = {}
        self._views: OrderedDict[int, tuple] = OrderedDict()    # id(event) -> (event, its users, stranger's view)
        self._records: OrderedDict[int, tuple] = OrderedDict()  # id(view) -> (view, JSON text, page bytes)

    def view(self, event: StepEvent, user: str | None) -> StepEvent:
        """`event` as `user` may see it (None: the operator, everything)."""
        if user is None:
            return event
        with self._lock:
            entry = _recent(self._views, event, lambda: [event, _users_in(event), None])
            if user in entry[1]:
                return event.redacted_for(user, self._aliases)
            if entry[2] is None:
                entry[2] = event.redacted_for(_STRANGER, self._aliases)
            return entry[2]

    def record(self, view: StepEvent, dropped: int) -> tuple[str, bytes | None]:
        """The JSON text frame (with this reader's own `dropped` count) and the page map's binary frame
        (int32 little-endian, None without a map) for a view from `view()`."""
        with self._lock:
            entry = _recent(self._records, view, lambda: (view, *_encoded(view)))
        return f'{{"dropped": {int(dropped)}, ' + entry[1][1:], entry[2]


def _encoded(view: StepEvent) -> tuple[str, bytes | None]:
    text = json.dumps(dataclasses.replace(view, page_owner=None).to_dict())
    pages = None if view.page_owner is None else np.asarray(view.page_owner, dtype="<i4").tobytes()
    return text, pages


def _recent(cache: OrderedDict, key_object, make) -> list | tuple:
    """The cache's entry for `key_object` (by identity, which the entry's own reference keeps unique),
    made and kept among the last `_RECENT` if new."""
    entry = cache.get(id(key_object))
    if entry is None or entry[0] is not key_object:
        entry = cache[id(key_object)] = make()
        if len(cache) > _RECENT:
            cache.popitem(last=False)
    return entry


def _users_in(event: StepEvent) -> set:
    """Every user whose view of `event` differs from a stranger's (see StepEvent.redacted_for)."""
    users = {r.user for r in event.rows} | {d.user for d in event.decisions}
    users.update(owner for d in event.decisions for _, owner in d.related)
    if event.kv_holders is not None:
        users.update(h.user for h in event.kv_holders)
    return users
