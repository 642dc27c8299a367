"""One HTTP/1.1 request to the engine host on a connection of its own, its body handed on as it arrives.

The relay runs on the Jupyter server's one tornado thread and is paid per request and per chunk
the engine host sends (one per streamed event, thousands a second on a GPU). Here the per-chunk path
is an asyncio protocol's `data_received`: no task, future or parser object per chunk, only the
chunked framing undone with a few `find`s (the payload is never decoded), and no pool to keep: one
connection per request (sent `Connection: close`), so that closing it is the abort the engine host
sees at once. httpx, used before, cost ~4x the CPU per stream (bench/RESULTS.md, issue 9), most of
it its connection pool's bookkeeping, which scans every connection for each request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders, ResponseStartLine, parse_response_start_line

CONNECT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 65536  # a response head this long is not from our engine host
MAX_SIZE_LINE_BYTES = 1024


class UpstreamError(Exception):
    """The engine host could not be reached, or its connection broke or spoke nonsense."""


class ChunkedDecoder:
    """Undoes HTTP/1.1 chunked framing as bytes arrive: `feed` returns the payload bytes they complete
    (parts of a chunk included, so nothing waits for the rest of a chunk)."""

    def __init__(self):
        self.pending = b""  # an incomplete chunk-size line
        self.payload_left = 0  # bytes of the current chunk's payload still to come
        self.crlf_left = 0  # bytes of the CRLF after that payload still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        data = self.pending + data if self.pending else data
        payloads, pos, end = [], 0, len(data)
        while pos < end and not self.done:
            if self.payload_left:
                take = min(self.payload_left, end - pos)
                payloads.append(data[pos:pos + take])
                pos += take
                self.payload_left -= take
                self.crlf_left = 0 if self.payload_left else 2
            elif self.crlf_left:
                take = min(self.crlf_left, end - pos)
                pos += take
                self.crlf_left -= take
            else:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size_field = data[pos:line_end].split(b";", 1)[0].strip()
                try:
                    size = int(size_field, 16)
                except ValueError:
                    raise UpstreamError(f"the engine host sent a bad chunk size {size_field[:40]!r}") from None
                pos = line_end + 2
                self.payload_left = size
                self.done = size == 0  # trailers, if any, say nothing we relay
        self.pending = data[pos:] if not self.done else b""
        if len(self.pending) > MAX_SIZE_LINE_BYTES:
            raise UpstreamError("the engine host sent a chunk-size line of over 1 KB")
        return payloads[0] if len(payloads) == 1 else b"".join(payloads)


class _BodyFraming:
    """How the end of a response body is known: a length, chunked framing, or the connection closing."""

    def __init__(self, headers: HTTPHeaders, status: int):
        self.chunked = None
        self.length_left = None
        if status in (204, 304):
            self.length_left = 0
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.chunked = ChunkedDecoder()
        elif "Content-Length" in headers:
            self.length_left = int(headers["Content-Length"])
            if self.length_left < 0:
                raise ValueError("a negative length")

    def feed(self, data: bytes) -> bytes:
        if self.chunked is not None:
            return self.chunked.feed(data)
        if self.length_left is not None:
            data = data[:self.length_left]
            self.length_left -= len(data)
        return data

    @property
    def complete(self) -> bool:
        return self.chunked.done if self.chunked is not None else self.length_left == 0

    @property
    def ends_with_connection(self) -> bool:
        return self.chunked is None and self.length_left is None


class UpstreamRequest(asyncio.Protocol):
    """One request: `head` resolves to the status line and headers, then `relay(sink)` hands every
    piece of the body to `sink` as it arrives and `body_done` resolves when the body is whole."""

    def __init__(self, request: bytes):
        loop = asyncio.get_running_loop()
        self.request = request
        self.head: asyncio.Future[tuple[ResponseStartLine, HTTPHeaders]] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._head_bytes = b""
        self._framing: _BodyFraming | None = None
        self._early_body = b""  # body bytes that came with the head, before `relay`
        self._sink: Callable[[bytes], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            if self._framing is None:
                data = self._read_head(data)
                if self._framing is None:
                    return
            payload = self._framing.feed(data)
        except UpstreamError as err:
            self._fail(err)
            return
        if self._sink is None:
            self._early_body += payload
        elif payload:
            self._sink(payload)
        if self._framing.complete:
            self._finish()

    def connection_lost(self, exc) -> None:
        if self._framing is not None and self._framing.ends_with_connection:
            self._finish()
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamError(f"the engine host closed the connection before the response was complete{reason}"))
        self.transport = None

    # --- the caller's side ----------------------------------------------------------------------------

    def relay(self, sink: Callable[[bytes], None]) -> None:
        """From now on every piece of the body goes to `sink` (what came with the head at once)."""
        if self._early_body:
            early, self._early_body = self._early_body, b""
            sink(early)
        # A body that has ended already (a short answer that came whole with its head, or a broken
        # one) has nothing more to send: keeping the sink would leave the cycle _fail explains.
        if not self.body_done.done():
            self._sink = sink

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Drops the connection now: the engine host sees its caller leave and aborts the request."""
        if self.transport is not None:
            self.transport.abort()

    # --- internals ------------------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> bytes:
        self._head_bytes += data
        end = self._head_bytes.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head_bytes) > MAX_HEAD_BYTES:
                raise UpstreamError("the engine host's response head is over 64 KB")
            return b""
        head, rest = self._head_bytes[:end].decode("latin-1"), self._head_bytes[end + 4:]
        self._head_bytes = b""
        status_line, _, header_lines = head.partition("\r\n")
        try:
            start_line = parse_response_start_line(status_line)
            headers = HTTPHeaders.parse(header_lines)
        except Exception as err:  # tornado's parsers raise several kinds; any of them means a bad head
            raise UpstreamError(f"the engine host sent a bad response head ({err})") from None
        if 100 <= start_line.code < 200:  # an interim response (100 Continue): the real one follows
            return self._read_head(rest)
        try:
            self._framing = _BodyFraming(headers, start_line.code)
        except ValueError:
            raise UpstreamError(f"the engine host sent a bad Content-Length {headers['Content-Length']!r}") from None
        if not self.head.done():  # (a caller that stopped waiting has cancelled it)
            self.head.set_result((start_line, headers))
        return rest

    def _finish(self) -> None:
        if not self.body_done.done():
            self.body_done.set_result(None)
        self._sink = None  # (see _fail)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, err: UpstreamError) -> None:
        for future in (self.head, self.body_done):
            if not future.done():
                future.set_exception(err)
                future.exception()  # a caller that left never awaits it: not an error worth a log line
        # The sink is the handler's bound method and the handler holds us: a reference cycle that
        # only the garbage collector could free, and its full collections stall the server's one
        # thread (bench/RESULTS.md, issue 9). Dropped here, the pair goes when the request does.
        self._sink = None
        self.close()


def request_bytes(method: str, url: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
    """The request as sent: `target` (path and query, already percent-encoded) under `url`'s path."""
    parts = urlsplit(url)
    lines = [f"{method} {parts.path.rstrip('/')}{target} HTTP/1.1", f"Host: {parts.netloc}",
             "Connection: close", f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamError(f"header {name!r} has a line break; it cannot be sent to the engine host")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def open_request(url: str, request: bytes) -> UpstreamRequest:
    """Connects to the engine host at `url` (http or https) and sends `request`."""
    parts = urlsplit(url)
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    upstream = UpstreamRequest(request)
    connecting = asyncio.get_running_loop().create_connection(lambda: upstream, parts.hostname, port, ssl=tls)
    try:
        if hasattr(asyncio, "timeout"):  # Python 3.11+: no task of its own (wait_for's costs ~20 us a request)
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await connecting
        else:
            await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as err:
        raise UpstreamError(f"cannot connect to the engine host at {parts.netloc} ({type(err).__name__})") from None
    return upstream
