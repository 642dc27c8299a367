"""`GET /api/events`: StepEvents over a websocket, as JSON, redacted for the caller's user (each view
redacted and encoded once for all its sockets: event_records.py).

With `?pages=1` each event's page map (owner per KV page) travels as a binary frame right after
its JSON text frame: int32 little-endian, one entry per page. With `?rate=N` (events a second, for
a reader that only draws) the socket carries the newest step at most N times a second, with the
decisions of every step it skipped."""

from __future__ import annotations

import json
import math

import tornado.ioloop
import tornado.websocket

from .api_errors import ApiError
from .http_app import ServingContext, identify, log


class EventStreamHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.subscription = None

    def prepare(self) -> None:
        try:
            if self.ctx.stopping:  # the drain closed every socket; a new one would hold the server up
                raise ApiError(503, "the server is shutting down: reconnect to its next start")
            self.caller = identify(self, self.ctx)
            self.max_rate = self._max_rate()
        except ApiError as err:
            self.set_status(err.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(err.body()))

    def check_origin(self, origin: str) -> bool:
        return True  # a bearer token, never a cookie, authorizes this socket

    def _max_rate(self) -> float | None:
        given = self.get_query_argument("rate", None)
        if given is None:
            return None
        try:
            rate = float(given)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):
            raise ApiError(400, f"rate={given[:40]!r} is invalid: give events a second as a positive number "
                                "(e.g. rate=10 for a panel), or leave it out for every step", param="rate")
        return rate

    def open(self) -> None:
        pages = self.get_query_argument("pages", "0") in ("1", "true")
        # Unredacted here: the caller's view comes from `ctx.event_records`, made once for every
        # socket that shares it, never from the subscription (which would redact per socket).
        self.subscription = self.ctx.driver.subscribe(user=None, pages=pages, max_rate=self.max_rate)
        self.ctx.sockets.add(self)
        tornado.ioloop.IOLoop.current().spawn_callback(self._forward)

    async def _forward(self) -> None:
        records = self.ctx.event_records
        try:
            async for event in self.subscription:
                text, pages = records.record(records.view(event, self.caller.view), self.subscription.dropped)
                written = self.write_message(text)
                if pages is not None:
                    written = self.write_message(pages, binary=True)
                await written  # one wait for the event's frames to be flushed
        except tornado.websocket.WebSocketClosedError:
            pass
        except Exception:  # a broken event must end this socket, never the server
            log.exception("event stream for %s failed", self.caller.user)
        finally:
            self.close()

    def on_close(self) -> None:
        self.ctx.sockets.discard(self)
        if self.subscription is not None:
            self.subscription.close()
