"""One HTTP/1.1 request to the engine host, its body handed on as it arrives.

The relay runs on the Jupyter server's one tornado thread and is paid per request and per chunk
the engine host sends (one per streamed event, thousands a second on a GPU). Here the per-chunk path
is an asyncio protocol's `data_received`: no task, future or parser object per chunk, only the
chunked framing undone with a few `find`s (the payload is never decoded). httpx, used before, cost
~4x the CPU per stream (bench/RESULTS.md, issue 9), most of it its connection pool's bookkeeping,
which scans every connection for each request. The connection comes from `upstream_pool.py` and
goes back there when the response has ended cleanly; closing it mid-body stays the abort the
engine host sees at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders, ResponseStartLine, parse_response_start_line

if TYPE_CHECKING:
    from .upstream_pool import UpstreamPool

MAX_HEAD_BYTES = 65536  # a response head this long is not from our engine host
MAX_SIZE_LINE_BYTES = 1024


class UpstreamError(Exception):
    """The engine host could not be reached, or its connection broke or spoke nonsense."""


class ChunkedDecoder:
    """Undoes HTTP/1.1 chunked framing as bytes arrive: `feed` returns the payload bytes they complete
    (parts of a chunk included, so nothing waits for the rest of a chunk). With `keep_framing` it
    returns them still framed, up to the last chunk, which it keeps back (see `UpstreamRequest.relay`)."""

    def __init__(self):
        self.keep_framing = False
        self.pending = b""  # an incomplete chunk-size (or trailer) line
        self.payload_left = 0  # bytes of the current chunk's payload still to come
        self.crlf_left = 0  # bytes of the CRLF after that payload still to come
        self.in_trailers = False  # the last chunk has come: trailer lines (never relayed), then an empty one
        self.done = False  # the empty line after the last chunk has come: the body is whole
        self.surplus = False  # bytes came after the body: the connection cannot carry another response

    def feed(self, data: bytes) -> bytes:
        data = self.pending + data if self.pending else data
        payloads, pos, end = [], 0, len(data)
        framed_end = None  # with keep_framing: where the last chunk begins, if in these bytes
        while pos < end and not self.done:
            if self.payload_left or self.crlf_left:  # the rest of a chunk that began in an earlier read
                pos = self._rest_of_chunk(data, pos, end, payloads)
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                break
            if self.in_trailers:
                self.done = line_end == pos
                pos = line_end + 2
                continue
            size = self._chunk_size(data[pos:line_end])
            if not size:
                self.in_trailers = True
                framed_end = pos
                pos = line_end + 2
                continue
            pos = line_end + 2
            payload_end = pos + size
            if payload_end + 2 <= end:  # the whole chunk is here (an event, nearly always): one step
                if not self.keep_framing:
                    payloads.append(data[pos:payload_end])
                pos = payload_end + 2
            else:
                self.payload_left = size
        self.surplus = self.done and pos < end
        self.pending = data[pos:] if not self.done else b""
        if len(self.pending) > MAX_SIZE_LINE_BYTES:
            raise UpstreamError("the engine host sent a chunk-size line of over 1 KB")
        if self.keep_framing:
            # Whole size lines only (a "0" may be the start of the last chunk's); after it, nothing.
            return data[:framed_end if framed_end is not None else (pos if not self.in_trailers else 0)]
        return payloads[0] if len(payloads) == 1 else b"".join(payloads)

    def _rest_of_chunk(self, data: bytes, pos: int, end: int, payloads: list[bytes]) -> int:
        if self.payload_left:
            take = min(self.payload_left, end - pos)
            if not self.keep_framing:
                payloads.append(data[pos:pos + take])
            self.payload_left -= take
            self.crlf_left = 0 if self.payload_left else 2
            return pos + take
        take = min(self.crlf_left, end - pos)
        self.crlf_left -= take
        return pos + take

    @property
    def mid_chunk(self) -> bool:
        """Inside a chunk's payload or its closing CRLF: what was passed on framed ends mid-chunk."""
        return bool(self.payload_left or self.crlf_left)

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        try:
            size = int(line, 16)  # a bare hex size, nearly always
        except ValueError:  # a chunk extension (";name=value") or a bad line
            size_field = line.split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise UpstreamError(f"the engine host sent a bad chunk size {size_field[:40]!r}") from None
        if size < 0:  # int() takes a sign; a chunk size has none
            raise UpstreamError(f"the engine host sent a bad chunk size {line[:40]!r}")
        return size


class _BodyFraming:
    """How the end of a response body is known: a length, chunked framing, or the connection closing."""

    def __init__(self, headers: HTTPHeaders, status: int):
        self.chunked = None
        self.length_left = None
        self.surplus = False  # bytes came after the body (see ChunkedDecoder)
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
            data = self.chunked.feed(data)
            self.surplus = self.chunked.surplus
            return data
        if self.length_left is not None:
            self.surplus = len(data) > self.length_left
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
    piece of the body to `sink` as it arrives and `body_done` resolves when the body is whole.

    Its connection is `pool`'s: one kept from an earlier response (`reused`) or a new one. A
    response that ends cleanly gives it back; anything else closes it. A GET that a kept connection
    closed unanswered is sent again on a new one (see `_may_resend`)."""

    def __init__(self, request: bytes, pool: UpstreamPool | None = None, *, reused: bool = False):
        loop = asyncio.get_running_loop()
        self.request = request
        self.head: asyncio.Future[tuple[ResponseStartLine, HTTPHeaders]] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._pool = pool
        # A kept connection that the engine host closed as the request went out (an idle timeout, a
        # restart) answers nothing; a GET is then sent once more on a new connection. Never another
        # method: the engine host may have read the request before closing (a front end that died
        # mid-request, its listening socket shared with a sibling that would get the resend), and a
        # POST is a generation, which would run twice.
        self._may_resend = reused and request.startswith(b"GET ")
        self._heard_back = False  # any byte of the response yet
        self._keep_alive = False  # the response's head lets the connection carry another request
        self._dropped = False  # the caller or an error closed the request: no connection may carry it again
        self._resending: asyncio.Task | None = None
        self._head_bytes = b""
        self._framing: _BodyFraming | None = None
        self._early_body = b""  # body bytes that came with the head, before `relay`
        self._sink: Callable[[bytes], None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        if self._dropped:  # the caller left while a new connection was being made for a resend
            transport.abort()
            return
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._heard_back = True
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
        self.transport = None
        if self._may_resend and not self._heard_back and not self._dropped:
            self._may_resend = False  # once
            self._resending = asyncio.ensure_future(self._resend())
            return
        if self._framing is not None and self._framing.ends_with_connection:
            self._finish()
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamError(f"the engine host closed the connection before the response was complete{reason}"))

    # --- the caller's side ----------------------------------------------------------------------------

    def relay(self, sink: Callable[[bytes], None], framed_sink: Callable[[bytes], None] | None = None) -> None:
        """From now on every piece of the body goes to `sink` (what came with the head at once).

        Or, given `framed_sink`, a chunked body goes to it as it came, in its chunked framing, less
        its last chunk: for a caller's connection that is chunked too, whose server writes its own
        last chunk, so that no piece is unframed and framed again on the way (issue 9). Only from a
        chunk boundary: what came with the head is passed on as one chunk."""
        decoder = self._framing.chunked if self._framing is not None else None
        if framed_sink is not None and decoder is not None and not decoder.mid_chunk:
            decoder.keep_framing = True
            sink = framed_sink
            if self._early_body:
                self._early_body = b"%x\r\n%b\r\n" % (len(self._early_body), self._early_body)
        if self._early_body:
            early, self._early_body = self._early_body, b""
            sink(early)
        # A body that has ended already (a short answer that came whole with its head, or a broken
        # one) has nothing more to send: keeping the sink would leave the cycle _fail explains.
        if not self.body_done.done():
            self._sink = sink

    @property
    def ended_mid_chunk(self) -> bool:
        """The body broke off inside a chunk that went on framed: the caller holds part of a chunk."""
        decoder = self._framing.chunked if self._framing is not None else None
        return decoder is not None and decoder.keep_framing and decoder.mid_chunk

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Drops the connection now: the engine host sees its caller leave and aborts the request."""
        self._dropped = True
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
        # An error may come before the engine host read the whole request (a body too large), and
        # then the rest of it would be taken for the next request: only a success keeps the connection.
        self._keep_alive = (start_line.version == "HTTP/1.1" and start_line.code < 400
                            and "close" not in headers.get("Connection", "").lower())
        if not self.head.done():  # (a caller that stopped waiting has cancelled it)
            self.head.set_result((start_line, headers))
        return rest

    def _finish(self) -> None:
        if not self.body_done.done():
            self.body_done.set_result(None)
        self._sink = None  # (see _fail)
        # From here the connection is the pool's (another request's, soon) or closed: never this one's.
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if (self._pool is not None and self._keep_alive and not self._framing.surplus and not self._dropped
                and not transport.is_closing() and not transport.get_write_buffer_size()):
            self._pool.keep(transport)
        else:
            transport.close()

    async def _resend(self) -> None:
        try:
            await self._pool.connect(self)
        except UpstreamError as err:
            self._fail(err)
        finally:
            self._resending = None  # (the task holds this request: no cycle left behind)

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
             f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UpstreamError(f"header {name!r} has a line break; it cannot be sent to the engine host")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
