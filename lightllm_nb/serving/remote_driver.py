"""A front-end process's view of the engine process's DriverLoop (`serve --api-server-count N`):
the calls the HTTP app awaits (`asubmit`, `aabort`, `astats`, `subscribe`, `ashutdown`) sent over a
zmq DEALER socket to `engine_core.py`, and the outputs of each step coming back as one message.

The handles are the same `RequestHandle`s as in one process: each step's message is put into them
and their readers on this event loop are woken once, together. Text is decoded here, by the
reader, as in one process.

Event readers subscribe to this process's own EventHub, fed by the engine process's event
publisher (a zmq SUB socket: topic `p` if a reader wants page maps, else `e`), which carries what
the readers of every front end ask for together (each sends `EventHub.demand`: pages if any reader
wants them, the fastest rate); rate caps happen here, and the websockets' views in event_records.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle

import numpy as np
import zmq
import zmq.asyncio

from ..sampling_params import InvalidRequestError, SamplingParams
from ..telemetry.hub import Demand, EventHub, EventSubscription
from .engine_core import EVENT_SOCKET_BACKLOG, event_address, unbounded
from .event_wire import unpack
from .request_handle import RequestHandle, wake_readers

log = logging.getLogger("lightllm_nb.serve")


class RemoteDriver:
    def __init__(self, address: str, prompts):
        self._prompts = prompts  # the front end's PromptEncoder: decodes streamed text
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, str(os.getpid()).encode())
        self._socket.setsockopt(zmq.LINGER, 0)
        unbounded(self._socket)
        self._socket.connect(address)
        self._event_socket = self._context.socket(zmq.SUB)  # subscribed to a topic while readers want events
        self._event_socket.setsockopt(zmq.LINGER, 0)
        self._event_socket.setsockopt(zmq.RCVHWM, EVENT_SOCKET_BACKLOG)
        self._event_socket.connect(event_address(address))
        self._last_sequence: int | None = None  # of the last event received: a gap is events lost
        self._keys = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future, object]] = {}  # key -> (answer, handle maker)
        self._handles: dict[str, RequestHandle] = {}
        self._events = EventHub(on_change=self._readers_changed)
        self._upstream: Demand | None = None  # what the engine process sends this front end now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiving: list[asyncio.Task] | None = None

    def start(self) -> None:
        """On the event loop that serves HTTP: begin reading the engine's messages."""
        self._loop = asyncio.get_running_loop()
        self._receiving = [self._loop.create_task(self._receive()), self._loop.create_task(self._receive_events())]

    async def asubmit(self, prompt_ids: list[int], sampling: SamplingParams, *, user: str, priority: int = 0,
                      stream_text: bool = True, keep_outputs: bool = True) -> RequestHandle:
        """As DriverLoop.submit; InvalidRequestError when the engine refuses it (a waiting limit)."""
        text = self._prompts.text_for(prompt_ids) if stream_text and not sampling.stop else None

        def handle(request_id: str) -> RequestHandle:
            made = self._handles[request_id] = RequestHandle(self, request_id, user, len(prompt_ids),
                                                             keep_outputs=keep_outputs, text=text)
            return made
        return await self._ask("submit", prompt_ids, sampling, user, priority, maker=handle)

    def abort(self, request_id: str, *, user: str) -> bool:
        """A handle's abort: sent, not answered (the engine checks the user)."""
        self._send(("abort", None, request_id, user))
        return request_id in self._handles

    async def aabort(self, request_id: str, *, user: str) -> bool:
        return await self._ask("abort", request_id, user)

    async def astats(self, *, user: str | None = None) -> dict:
        return await self._ask("stats", user)

    def subscribe(self, *, user: str | None = None, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> EventSubscription:
        """As DriverLoop.subscribe: redacted for `user` and rate-capped here, in this process."""
        return self._events.subscribe(user=user, pages=pages, maxsize=maxsize, max_rate=max_rate)

    async def ashutdown(self) -> None:
        """This front end is stopping: abort what it still runs, stop reading, close the socket."""
        for handle in list(self._handles.values()):
            handle.abort()
        deadline = asyncio.get_running_loop().time() + 5
        while self._handles and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for task in self._receiving or ():
            task.cancel()
        self._events.close()
        self._socket.close()
        self._event_socket.close()
        self._context.term()

    # ---- internals -----------------------------------------------------------------------------
    async def _ask(self, kind: str, *fields, maker=None):
        key = next(self._keys)
        answer = asyncio.get_running_loop().create_future()
        self._pending[key] = (answer, maker)
        self._send((kind, key, *fields))
        return await answer

    def _send(self, message: tuple) -> None:
        if self._socket.closed:  # shut down: a late abort or unsubscribe has nothing left to stop
            return
        self._socket.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)

    async def _receive(self) -> None:
        while True:
            kind, *fields = pickle.loads(await self._socket.recv())
            if kind == "outputs":
                self._deliver(fields[0])
            else:
                self._answer(kind, *fields)

    async def _receive_events(self) -> None:
        while True:
            _topic, message, *page_frame = await self._event_socket.recv_multipart(copy=False)
            sequence, packed, lost = pickle.loads(message.buffer)
            if self._last_sequence is not None:
                if sequence <= self._last_sequence:  # under both topics while they switch: taken once
                    continue
                lost += sequence - self._last_sequence - 1  # what the link dropped while this process stalled
            self._last_sequence = sequence
            self._publish(packed, lost, np.frombuffer(page_frame[0].buffer, dtype="<i4") if page_frame else None)

    def _answer(self, kind: str, key: int, value) -> None:
        answer, maker = self._pending.pop(key)
        if answer.done():  # its asker was cancelled
            return
        if kind == "rejected":
            answer.set_exception(InvalidRequestError(value))
        elif isinstance(value, Exception):
            answer.set_exception(value)
        else:
            # The handle exists before any later message (its outputs) is read.
            answer.set_result(maker(value) if kind == "accepted" else value)

    def _deliver(self, outputs: list) -> None:
        woken = []
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            handle._deliver(out)
            woken.append(handle)
            if out.finished:
                del self._handles[out.request_id]
        wake_readers(woken)  # one wake-up for the step, as DriverLoop does in one process

    def _publish(self, packed: list, lost: int, page_owner: np.ndarray | None) -> None:
        if lost:
            self._events.report_lost(lost)
        # Only readers that asked for pages get the map (the engine sends it if any reader asked).
        self._events.publish(unpack(packed), lambda: page_owner)

    def _readers_changed(self) -> None:
        """A reader came or went (on any thread): the engine hears the new demand from this loop's
        thread, the only one that may use the zmq socket."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._send_demand)
        except RuntimeError:  # this front end's loop has ended: nothing is sent any more
            pass

    def _send_demand(self) -> None:
        demand = self._events.demand()
        if demand == self._upstream:
            return
        topics = {None: b"", False: b"e", True: b"p"}
        before, after = (topics[None if d is None else d.pages] for d in (self._upstream, demand))
        if after != before:  # the new topic first: no step is lost (one that comes under both is taken once)
            if after:
                self._event_socket.setsockopt(zmq.SUBSCRIBE, after)
            if before:
                self._event_socket.setsockopt(zmq.UNSUBSCRIBE, before)
        if demand is None:
            self._last_sequence = None  # the next reader's events start afresh
        self._upstream = demand
        self._send(("unsubscribe",) if demand is None else ("subscribe", demand.pages, demand.max_rate))
