"""The engine process's end of `serve --api-server-count N`: the DriverLoop served to N front-end
processes over one zmq ROUTER socket, and their StepEvents over one PUB socket (their end is
`remote_driver.py`).

Messages are pickled tuples (both ends are this package, on one host). A front end sends
`("submit", key, ids, sampling, user, priority)`, `("abort", key, request_id, user)`,
`("stats", key, user)`, `("subscribe", pages, max_rate)`, `("unsubscribe",)`; it gets
`("accepted", key, request_id)` or `("rejected", key, message)`, `("answer", key, value)` and once
per step `("outputs", [RequestOutput, ...])` with every output of that step for that front end's
requests. Nothing on that socket may be lost, so neither end has a high-water mark: zmq's default
(1000 messages each way) made the ROUTER drop, without a word, what a front end stalled for ~1000
steps (a long tokenization on its IOLoop) had not read yet, and its requests hung. Users are checked
by the front ends (their tokens) and again here for aborts (the driver's own check). A front end
that is gone (its process died) has its requests aborted and its event demand dropped.

Events: one raw (unredacted) subscription for all front ends with event readers, whatever their
number: each front end's `subscribe` message says what its readers ask for together (sent again
whenever that changes), and the subscription carries what they all ask for together (the page map
if any asks, the fastest rate: a front end's own readers cap themselves). Each event is pickled
once a step as `(sequence number, packed event (event_wire.py), lost)` and published once on the
PUB socket: under topic `e` without the page map, under topic `p` with it as a second, raw frame
(int32), each only if some front end subscribed to it. A PUB socket drops what a stalled
subscriber cannot take (its high-water mark), which is what events may do: the front end counts
the gap in sequence numbers as lost. Redaction, rate caps and the JSON records happen in the front
ends: the engine's process pays once a step, never per reader or front end (issue 8).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from dataclasses import replace

import numpy as np
import zmq
import zmq.asyncio

from ..sampling_params import InvalidRequestError
from ..telemetry.hub import Demand, EventSubscription
from .event_wire import pack
from .request_handle import RequestHandle

log = logging.getLogger("lightllm_nb.serve")

# Events queued for the front ends' link: this process's event loop publishes them as they come, so
# this only fills while that loop is stalled.
FRONT_END_BACKLOG = 1024
# Steps a stalled front end may fall behind on the event socket, at each end, before zmq drops them:
# events may drop (the front end counts the gap), and each may carry a page map of megabytes (15 MB
# at 3.7M pages), so zmq's default of 1000 could hold gigabytes on each side for one slow reader.
EVENT_SOCKET_BACKLOG = 32


def event_address(address: str) -> str:
    """The PUB socket's address beside the ROUTER's."""
    return address + "-events"


def unbounded(socket: zmq.Socket) -> None:
    """No high-water mark either way: requests and their outputs are never dropped (see above)."""
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)


class EngineCore:
    def __init__(self, driver, address: str, front_ends: list[int]):
        self.driver = driver
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        unbounded(self._socket)
        self._socket.bind(address)
        self._publisher = self._context.socket(zmq.PUB)
        self._publisher.setsockopt(zmq.LINGER, 0)
        self._publisher.setsockopt(zmq.SNDHWM, EVENT_SOCKET_BACKLOG)
        self._publisher.bind(event_address(address))
        self._front_end_of: dict[str, bytes] = {}         # request id -> the front end that submitted it
        # front end (its pid, as its zmq identity) -> its running requests
        self._requests: dict[bytes, dict[str, RequestHandle]] = {str(pid).encode(): {} for pid in front_ends}
        self._demands: dict[bytes, Demand] = {}  # front end -> what its event readers ask for together
        self._events: tuple[EventSubscription, asyncio.Task] | None = None  # what every front end's events come from
        self._sequence = 0  # events published: a front end counts a gap as lost events
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self) -> None:
        """Answer front ends until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                front_end, payload = await self._socket.recv_multipart()
                kind, *fields = pickle.loads(payload)
                try:
                    getattr(self, "_on_" + kind)(front_end, *fields)
                except Exception:  # one bad message must not end the engine for everyone
                    log.exception("engine core: a %r message from front end %s failed", kind, front_end.decode())
        finally:
            self._socket.close()
            self._publisher.close()
            self._context.term()

    def front_end_gone(self, front_end: bytes) -> int:
        """Abort every request of a front end that is gone and end its subscriptions; how many."""
        handles = self._requests.pop(front_end, {})
        for request_id, handle in handles.items():
            self._front_end_of.pop(request_id, None)
            handle.abort()
        self._on_unsubscribe(front_end)
        return len(handles)

    def running_per_front_end(self) -> dict[str, int]:
        return {front_end.decode(): len(handles) for front_end, handles in self._requests.items()}

    # ---- messages ------------------------------------------------------------------------------
    def _on_submit(self, front_end: bytes, key: int, ids: list[int], sampling, user: str, priority: int) -> None:
        try:
            # Text is decoded by the front end, off this process (the engine still does it for stop strings).
            handle = self.driver.submit(ids, sampling, user=user, priority=priority, stream_text=False)
        except InvalidRequestError as err:
            self._send(front_end, ("rejected", key, str(err)))
            return
        self._requests.setdefault(front_end, {})[handle.request_id] = handle
        self._front_end_of[handle.request_id] = front_end
        self._send(front_end, ("accepted", key, handle.request_id))
        handle.read_on(self._loop, self._forward)
        self._forward([handle])  # what came before the line above had no reader to wake

    def _on_abort(self, front_end: bytes, key: int | None, request_id: str, user: str) -> None:
        aborted = self.driver.abort(request_id, user=user)
        if key is not None:
            self._send(front_end, ("answer", key, aborted))

    def _on_stats(self, front_end: bytes, key: int, user: str | None) -> None:
        async def answer():
            try:
                stats = await self.driver.astats(user=user)
                if user is None:  # the operator's view: which front-end process holds how many requests
                    stats["api_servers"] = self.running_per_front_end()
            except Exception as err:
                stats = err
            self._send(front_end, ("answer", key, stats))
        self._loop.create_task(answer())

    def _on_subscribe(self, front_end: bytes, pages: bool, max_rate: float | None) -> None:
        self._demands[front_end] = Demand(pages, max_rate)
        self._retune_events()

    def _on_unsubscribe(self, front_end: bytes) -> None:
        if self._demands.pop(front_end, None) is not None:
            self._retune_events()

    def _retune_events(self) -> None:
        """The one subscription carries what the front ends ask for together (retuned in place: no
        step is lost or sent twice); it ends with the last front end's readers."""
        demands = list(self._demands.values())
        if not demands:
            if self._events is not None:
                subscription, task = self._events
                self._events = None
                subscription.close()  # off the hub now, not when the task next runs
                task.cancel()
            return
        rates = [d.max_rate for d in demands]
        pages, max_rate = any(d.pages for d in demands), None if None in rates else max(rates)
        if self._events is not None:
            self._events[0].retune(pages=pages, max_rate=max_rate)
            return
        subscription = self.driver.subscribe(pages=pages, maxsize=FRONT_END_BACKLOG, max_rate=max_rate)
        self._events = (subscription, self._loop.create_task(self._forward_events(subscription)))

    async def _forward_events(self, subscription: EventSubscription) -> None:
        reported = 0
        try:
            async for event in subscription:
                lost, reported = subscription.dropped - reported, subscription.dropped
                self._sequence += 1
                owners = event.page_owner
                message = pickle.dumps((self._sequence, pack(replace(event, page_owner=None)), lost),
                                       pickle.HIGHEST_PROTOCOL)
                wanted = {demand.pages for demand in self._demands.values()}
                if False in wanted:
                    self._publisher.send_multipart([b"e", message], zmq.NOBLOCK, copy=False)
                if True in wanted:
                    pages = [] if owners is None else [np.ascontiguousarray(owners, dtype="<i4").data]
                    self._publisher.send_multipart([b"p", message, *pages], zmq.NOBLOCK, copy=False)
        finally:
            subscription.close()

    # ---- outputs: once per step, one message per front end --------------------------------------
    def _forward(self, handles: list[RequestHandle]) -> None:
        batches: dict[bytes, list] = {}
        for handle in handles:
            front_end = self._front_end_of.get(handle.request_id)
            outs = handle.take_queued()
            if front_end is None or not outs:
                continue
            batches.setdefault(front_end, []).extend(outs)
            if outs[-1].finished:
                del self._front_end_of[handle.request_id]
                self._requests.get(front_end, {}).pop(handle.request_id, None)
        for front_end, outs in batches.items():
            self._send(front_end, ("outputs", outs))

    def _send(self, front_end: bytes, message: tuple) -> None:
        # A ROUTER never blocks a send: to a front end that is gone the message is dropped.
        self._socket.send_multipart([front_end, pickle.dumps(message, pickle.HIGHEST_PROTOCOL)], zmq.NOBLOCK)
