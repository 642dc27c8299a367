"""Connections to one engine host, kept open between proxied requests and used again.

A burst of streams (64 at once from a notebook's thread pool) opened a connection each: a socket,
a connect and its event-loop registrations on the Jupyter server's one thread, and an accept on
the engine host's, while the other streams' events waited behind them (issue 9). A connection goes
back to the pool only after a response that ended cleanly (`UpstreamRequest._finish`); one whose
caller left mid-body is closed, as before, since closing it is how the engine host learns to abort.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from urllib.parse import urlsplit

from .upstream import UpstreamError, UpstreamRequest

CONNECT_TIMEOUT_S = 10.0
# As many as a burst of concurrent streams uses; each idle one is a file descriptor here and a
# connection the engine host keeps.
MAX_IDLE_CONNECTIONS = 64
# An idle connection is used again only this soon: a Node.js server (the Hub's proxy, in front of
# a Hub service) closes idle connections after 5 s, and a request sent as it does would be lost.
REUSE_WITHIN_S = 4.0


class _IdleConnection(asyncio.Protocol):
    """A kept connection between requests: it leaves the pool when the engine host closes it or,
    closed by its own timer, when its reuse window ends."""

    def __init__(self, pool: UpstreamPool, transport: asyncio.Transport):
        self.pool = pool
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        # Not left to the next request to find expired: after a burst, dozens of idle sockets would
        # stay open here and on the engine host until traffic came, however long that took.
        self._expiry = self._loop.call_later(REUSE_WITHIN_S, transport.close)

    @property
    def expired(self) -> bool:
        """Past its reuse window (its timer may not have run yet: the loop was busy)."""
        return self._loop.time() >= self._expiry.when()

    def taken(self) -> None:
        self._expiry.cancel()

    def data_received(self, data: bytes) -> None:
        self.transport.close()  # nothing was asked: what came cannot be an answer to anything

    def connection_lost(self, exc) -> None:
        self._expiry.cancel()
        self.pool.forget(self)


class UpstreamPool:
    """Requests to the engine host at `url` (http or https), each on a kept connection when one is idle."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.netloc = parts.netloc
        self.host = parts.hostname
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.tls else 80)
        self._idle: list[_IdleConnection] = []  # oldest first

    async def send(self, request: bytes) -> UpstreamRequest:
        """Sends `request` (see `upstream.request_bytes`); the response comes to what this returns."""
        idle = self._take_idle()
        if idle is None:
            upstream = UpstreamRequest(request, self)
            await self.connect(upstream)
            return upstream
        upstream = UpstreamRequest(request, self, reused=True)
        idle.transport.set_protocol(upstream)
        upstream.connection_made(idle.transport)
        return upstream

    async def connect(self, upstream: UpstreamRequest) -> None:
        """A new connection for `upstream`, which sends its request once it is made."""
        connecting = asyncio.get_running_loop().create_connection(lambda: upstream, self.host, self.port,
                                                                  ssl=self.tls)
        try:
            if hasattr(asyncio, "timeout"):  # Python 3.11+: no task of its own (wait_for's costs ~20 us a request)
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await connecting
            else:
                await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as err:
            raise UpstreamError(f"cannot connect to the engine host at {self.netloc} ({type(err).__name__})") from None

    def keep(self, transport: asyncio.Transport) -> None:
        """Takes back the connection of a response that ended cleanly."""
        if len(self._idle) >= MAX_IDLE_CONNECTIONS:
            transport.close()
            return
        if not transport.is_reading():  # its last request's caller read slowly (see proxy.py's _send)
            transport.resume_reading()
        idle = _IdleConnection(self, transport)
        transport.set_protocol(idle)
        self._idle.append(idle)

    def forget(self, idle: _IdleConnection) -> None:
        if idle in self._idle:
            self._idle.remove(idle)

    def close(self) -> None:
        """Closes every idle connection (the server is stopping)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.transport.close()

    def _take_idle(self) -> _IdleConnection | None:
        """The newest idle connection (the least likely to be closed by now), if any."""
        while self._idle:
            idle = self._idle.pop()
            if idle.transport.is_closing():  # (it leaves at its connection_lost)
                continue
            if idle.expired or _closed_or_spoken(idle.transport):
                idle.transport.close()
                continue
            idle.taken()
            return idle
        return None


def _closed_or_spoken(transport: asyncio.Transport) -> bool:
    """Whether the engine host closed an idle connection (or sent anything on it, which no request
    asked for) in a way this thread has not read yet, busy as it was. A request sent on it would be
    lost, and only a GET is sent again (see UpstreamRequest): a zero-timeout poll of the socket is
    readable at an end-of-file, a byte or an error, each of which means the connection is done."""
    poller = select.poll()
    poller.register(transport.get_extra_info("socket").fileno(), select.POLLIN)
    return bool(poller.poll(0))
