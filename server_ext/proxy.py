"""`/lightllm/...` handlers: authenticated, authorized proxies to the engine host, as the Jupyter user.

HTTP requests (native API, OpenAI API, stats, abort) go to the engine host on kept connections
(`upstream_pool.py`), and a streamed body is passed on read by read, each read (one or more
events, never parsed) in one write and one flush, so a stream reaches the browser or kernel as the
engine produces it; a caller that goes away (kernel interrupt, restart, closed tab) drops the
upstream connection, and the engine host aborts the request at once. The event stream is a
websocket relayed message by message. Both act for the Jupyter user through the engine
host's `proxy` role and the `X-LightLLM-User` header.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.auth.identity import PasswordIdentityProvider
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web, websocket
from tornado.httpclient import HTTPRequest
from tornado.iostream import SSLIOStream, StreamClosedError

from .upstream import UpstreamError, UpstreamRequest, request_bytes

AUTH_RESOURCE = "lightllm"
# Headers that describe one hop of the connection, not the message: never forwarded.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer",
               "upgrade", "proxy-authorization", "authorization", "cookie", "x-lightllm-user", "x-xsrftoken",
               "origin", "referer", "content-encoding", "accept-encoding", "expect"}
# Response headers that tornado writes itself for the hop to our caller.
RESPONSE_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date",
                        "content-encoding", "etag"}


class _EngineMixin(ExtensionHandlerMixin):
    auth_resource = AUTH_RESOURCE

    @property
    def engine(self):
        """The extension's `EngineLink`: where the engine host is and how to speak to it."""
        return self.settings["lightllm_engine"]

    def engine_user(self) -> str:
        """The name the engine host knows this caller by."""
        if isinstance(self.identity_provider, PasswordIdentityProvider):
            # Jupyter's own token/password login makes up a fresh anonymous user for every
            # token-authenticated request: a shared token names nobody. Whoever holds it is this
            # server's owner, so the engine sees the owner's account: one name for all of its
            # kernels, whose requests it may then watch, limit and abort together.
            return self.engine.server_account
        return self.current_user.username  # JupyterHub (or another identity provider) names the user

    def upstream_headers(self) -> dict[str, str]:
        return self.engine.auth_headers(self.engine_user())


class EngineProxyHandler(_EngineMixin, APIHandler):
    """Every HTTP route of the engine host, under `/lightllm/`."""

    _upstream: UpstreamRequest | None = None
    _caller_left = False
    _streamed = True
    _caller_socket = None  # where a chunked stream's pieces go when tornado has nothing left to write
    # The engine link reports our activity (`lightllm_last_activity`, refreshed while a stream
    # runs); jupyter_server's own record for API requests would parse the query again at finish.
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        await self._forward(path)

    async def _forward(self, path: str) -> None:
        if not await self.engine.ready():
            self._error(503, self.engine.unavailable_reason())
            return
        target = "/" + quote(path) + ("?" + self.request.query if self.request.query else "")
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in HOP_HEADERS}
        headers.update(self.upstream_headers())
        self.engine.stream_started()
        try:
            await self._relay(target, headers)
        finally:
            self.engine.stream_finished()

    async def _relay(self, target: str, headers: dict[str, str]) -> None:
        try:
            request = request_bytes(self.request.method, self.engine.url, target, headers, self.request.body or b"")
            self._upstream = await self.engine.upstream.send(request)
            if self._caller_left:
                self._upstream.close()
                return
            start_line, headers = await self._upstream.head
        except UpstreamError as err:
            if not self._caller_left:
                self._error(502, f"{err}; if it was restarting, send the request again in a few seconds")
            return
        self.set_status(start_line.code, start_line.reason)
        for name, value in headers.get_all():
            if name.lower() not in RESPONSE_HOP_HEADERS:
                self.set_header(name, value)
        # A body of known length goes out in one piece with its length; any other (a stream) is
        # passed on as each piece arrives, and its head at once: the caller learns that its request
        # was taken, and its id, while the engine host is still prefilling. Nagle's algorithm off
        # (tornado turns it back on when the response ends): it would hold the first event back
        # until the caller acknowledged the head.
        self._streamed = "Content-Length" not in headers
        if self._streamed:
            self.request.connection.stream.set_nodelay(True)
            self.flush()
        if self._chunked_to_caller():
            stream = self.request.connection.stream
            # (A TLS connection's bytes must go through its SSL object, which tornado's stream drives.)
            self._caller_socket = stream.socket if not isinstance(stream, SSLIOStream) else None
            self._upstream.relay(self._send, self._send_framed)
        else:
            self._upstream.relay(self._send)
        try:
            await self._upstream.body_done
        except UpstreamError as err:
            if self._caller_left:
                return  # closing the upstream connection was the abort
            reason = (f"the engine host stopped while answering ({err}); it is being restarted: send the "
                      "request again in a few seconds")
            self.log.warning("lightllm: %s", reason)
            if not self._headers_written:  # a body of known length, held back: nothing has gone yet
                self.clear()
                self._error(502, reason)
                return
            if self._upstream.ended_mid_chunk:  # an event now would land inside that chunk: only closing is clear
                self.request.connection.stream.close()
                return
            # The status line has gone already: the stream's last event carries the error.
            event = {"error": {"message": reason, "type": "engine_unavailable", "param": None, "code": 502}}
            self.write(f"data: {json.dumps(event)}\n\n")
        if not self._finished:
            self.finish(set_content_type=self._headers.get("Content-Type", "application/json"))

    def _send(self, payload: bytes) -> None:
        """One piece of the upstream body, out to our caller at once (one write, one flush)."""
        self.write(payload)
        if not self._streamed:
            return
        flushed = self.flush()
        if not flushed.done():  # our caller reads slower than the engine host writes: wait for it
            self._upstream.pause()
            flushed.add_done_callback(self._flushed)

    def _chunked_to_caller(self) -> bool:
        """Whether the head that went to our caller announced a chunked body, as it came from the
        engine host (tornado says so in the headers it wrote; no transform such as gzip re-encodes it)."""
        return (self._streamed and self._headers.get("Transfer-Encoding") == "chunked"
                and "Content-Encoding" not in self._headers)

    def _send_framed(self, framed: bytes) -> None:
        """Chunks of the upstream body, framed as they came, straight onto our caller's connection:
        `_send` less tornado's unframing and framing again of each piece (~10% of the server's CPU
        per stream, bench/proxy.py --stub-step-ms 3). When tornado has nothing of ours left to write,
        into the socket itself: tornado's `write` makes a future and a loop callback for each piece
        (10 us a piece against 5 for the bare send, 4 of which are the kernel's, on the 2-core CPU
        box); what the socket does not take, and every piece after it until that has gone, goes
        through tornado, in order."""
        stream = self.request.connection.stream
        if self._caller_socket is not None and not stream.writing():
            try:
                sent = self._caller_socket.send(framed)
            except OSError:  # full (tornado's write below keeps it) or gone (it sees that too, and closes)
                sent = 0
            if sent == len(framed):
                return
            framed = framed[sent:]
        try:
            written = stream.write(framed)
        except StreamClosedError:  # our caller left; its on_connection_close has yet to run
            self._upstream.close()
            return
        if not written.done():  # our caller reads slower than the engine host writes: wait for it
            self._upstream.pause()
            written.add_done_callback(self._flushed)

    def _flushed(self, future) -> None:
        if not future.cancelled():
            future.exception()  # a caller that left: on_connection_close has closed the upstream already
        self._upstream.resume()

    def on_connection_close(self) -> None:
        # The caller left (kernel interrupted or restarted, tab closed): dropping the upstream
        # connection makes the engine host abort the request and free its KV at once.
        self._caller_left = True
        if self._upstream is not None:
            self._upstream.close()
        super().on_connection_close()

    def _error(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"error": {"message": message, "type": "engine_unavailable", "param": None,
                                          "code": status}}))


class EngineEventsHandler(_EngineMixin, WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """The StepEvent stream (`/lightllm/api/events`), relayed message by message, redacted for this user."""

    upstream: websocket.WebSocketClientConnection | None = None

    @ws_authenticated
    @authorized
    async def get(self, *args, **kwargs):
        if not await self.engine.ready():
            raise web.HTTPError(503, self.engine.unavailable_reason())
        ws_url = self.engine.url.replace("http://", "ws://", 1) + "/api/events"
        if self.request.query:
            ws_url += "?" + self.request.query
        request = HTTPRequest(ws_url, headers=self.upstream_headers(), connect_timeout=10)
        try:
            self.upstream = await websocket.websocket_connect(request)
        except Exception as exc:
            raise web.HTTPError(502, f"the engine host refused the event stream: {exc}") from exc
        return await super().get(*args, **kwargs)

    async def open(self, *args, **kwargs):
        super().open(*args, **kwargs)
        self._relay = asyncio.get_running_loop().create_task(self._relay_upstream())

    async def _relay_upstream(self) -> None:
        while True:
            message = await self.upstream.read_message()
            if message is None:
                self.close(1011, "the engine host closed the event stream")
                return
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except websocket.WebSocketClosedError:
                return

    def on_message(self, message) -> None:
        pass  # the event stream is one-way

    def on_close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        relay = getattr(self, "_relay", None)
        if relay is not None:
            relay.cancel()


class StatusHandler(_EngineMixin, APIHandler):
    """`/lightllm/status`: what the extension knows about its engine host (for people and tests)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps(self.engine.status()))
