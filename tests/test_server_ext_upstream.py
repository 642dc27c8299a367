"""The extension's upstream client (server_ext/upstream.py, upstream_pool.py) against a real tornado
server in this process: bodies come out whole and as they are produced, a broken stream is an
error, closing the connection is seen by the engine host at once, and a connection is used again
only after a response that ended cleanly. No Jupyter server and no model: fast."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import re
import select
import socket
import threading
import weakref

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

from lightllm_nb.server_ext.upstream import ChunkedDecoder, UpstreamError, UpstreamRequest, request_bytes
from lightllm_nb.server_ext import upstream_pool
from lightllm_nb.server_ext.upstream_pool import UpstreamPool


def chunked(payloads: list[bytes], rng: random.Random) -> bytes:
    """HTTP/1.1 chunked framing, with the odd chunk extension and upper-case hex a server may send."""
    framed = []
    for p in payloads:
        size = f"{len(p):x}".upper() if rng.random() < 0.5 else f"{len(p):x}"
        framed.append(size.encode() + (b";ext=1" if rng.random() < 0.2 else b"") + b"\r\n" + p + b"\r\n")
    return b"".join(framed) + b"0\r\n\r\n"


@pytest.mark.parametrize("seed", range(8))
def test_chunked_decoder_returns_every_payload_byte_however_the_bytes_are_split(seed):
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.choice([1, 2, 9, 200, 5000])) for _ in range(rng.randint(1, 40))]
    wire = chunked(payloads, rng)
    decoder, out, pos = ChunkedDecoder(), [], 0
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 7, 64, 1000, len(wire)])
        out.append(decoder.feed(wire[pos:pos + step]))
        pos += step
        assert decoder.done == (pos >= len(wire)), "done only once the terminal chunk is whole"
    assert b"".join(out) == b"".join(payloads)


@pytest.mark.parametrize("seed", range(8))
def test_chunked_decoder_keeping_the_framing_returns_the_bytes_as_they_came_less_the_last_chunk(seed):
    # The caller's server writes its own last chunk: ours going on too would end the body twice.
    rng = random.Random(seed)
    wire = chunked([rng.randbytes(rng.choice([1, 9, 200, 5000])) for _ in range(rng.randint(1, 40))], rng)
    decoder, out, pos = ChunkedDecoder(), [], 0
    decoder.keep_framing = True
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 7, 64, 1000, len(wire)])
        out.append(decoder.feed(wire[pos:pos + step]))
        pos += step
    assert decoder.done and b"".join(out) == wire[:-len(b"0\r\n\r\n")]


def test_chunked_decoder_refuses_a_bad_size_line():
    with pytest.raises(UpstreamError, match="bad chunk size"):
        ChunkedDecoder().feed(b"zz\r\nhello\r\n")
    with pytest.raises(UpstreamError, match="over 1 KB"):
        ChunkedDecoder().feed(b"1" * 2000)
    # int() takes a sign: a "negative" size once walked the decoder backwards over what it had
    # read, relaying those bytes again as payload.
    with pytest.raises(UpstreamError, match="bad chunk size"):
        ChunkedDecoder().feed(b"-5\r\nhello\r\n")


def test_chunked_decoder_skips_trailers_and_notes_bytes_after_the_body():
    # A kept connection carries the next response after this one: the body ends with the empty
    # line after the last chunk (and its trailers), and anything after it is not ours to relay.
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n") == b"abc" and not decoder.done
    assert decoder.feed(b"\r\n") == b"" and decoder.done and not decoder.surplus
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\nHTTP/1.1 200 OK")
    assert decoder.done and decoder.surplus


def test_request_bytes_puts_the_target_under_the_urls_path_and_refuses_line_breaks():
    wire = request_bytes("POST", "http://hub:8081/services/lightllm/", "/api/generate?x=1", {"X-A": "b"}, b"{}")
    head, body = wire.split(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /services/lightllm/api/generate?x=1 HTTP/1.1"
    assert b"Host: hub:8081" in head and b"Content-Length: 2" in head and b"Connection" not in head
    assert body == b"{}"
    with pytest.raises(UpstreamError, match="line break"):
        request_bytes("GET", "http://h", "/", {"X-LightLLM-User": "alice\r\nX-Evil: 1"}, b"")


class _Host:
    """A tornado server playing the engine host: `/stream` writes a piece each time the test says so."""

    def __init__(self):
        self.go = asyncio.Queue()
        self.closed = asyncio.Event()
        self.peers = []  # the caller's end of the connection each request came on
        host = self

        class Stream(web.RequestHandler):
            async def post(self):
                host.peers.append(self.request.connection.stream.socket.getpeername())
                self.set_header("Content-Type", "text/event-stream")
                self.flush()  # the head at once, as the engine host sends it
                try:
                    while (piece := await host.go.get()) is not None:
                        if piece == b"die":
                            self.request.connection.stream.close()  # mid-body, as a SIGKILL would
                            return
                        if piece.startswith(b"end:"):  # a last piece that arrives with the body's end
                            self.write(piece[4:])
                            return
                        self.write(piece)
                        await self.flush()
                except StreamClosedError:
                    pass

            def on_connection_close(self):
                host.closed.set()

        class Whole(web.RequestHandler):
            def post(self):
                host.peers.append(self.request.connection.stream.socket.getpeername())
                self.set_status(201)
                self.write({"echo": self.request.body.decode(), "user": self.request.headers["X-User"]})

        class Refuse(Whole):
            def post(self):
                host.peers.append(self.request.connection.stream.socket.getpeername())
                self.set_status(429)
                self.write({"error": "too many waiting"})

        [sock] = bind_sockets(0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = HTTPServer(web.Application([(r"/stream", Stream), (r"/whole", Whole), (r"/refuse", Refuse)]))
        self.server.add_sockets([sock])


def run_with_host(scenario):
    async def main():
        host = _Host()
        try:
            await asyncio.wait_for(scenario(host), 30)
        finally:
            host.server.stop()
    asyncio.run(main())


async def _open(host, path, headers=None, body=b"{}", pool=None):
    pool = pool or UpstreamPool(host.url)
    upstream = await pool.send(request_bytes("POST", host.url, path, headers or {}, body))
    start_line, response_headers = await upstream.head
    return upstream, start_line, response_headers


def test_a_stream_is_handed_on_piece_by_piece_as_it_is_written():
    async def scenario(host):
        upstream, start_line, headers = await _open(host, "/stream")
        assert start_line.code == 200 and headers["Content-Type"] == "text/event-stream"
        received = asyncio.Queue()
        upstream.relay(received.put_nowait)
        for i in range(5):
            piece = f"data: {i}\n\n".encode()
            await host.go.put(piece)
            # Each piece arrives before the next is written: nothing waits for the end of the body.
            assert await asyncio.wait_for(received.get(), 5) == piece
        await host.go.put(None)
        await upstream.body_done
        assert received.empty()
    run_with_host(scenario)


def test_a_body_of_known_length_and_an_interim_100_continue():
    async def scenario(host):
        # Expect: 100-continue makes tornado answer "100 (Continue)" before the real response.
        upstream, start_line, headers = await _open(host, "/whole", {"X-User": "bob", "Expect": "100-continue"},
                                                    b'{"a": 1}')
        assert start_line.code == 201 and int(headers["Content-Length"]) > 0
        pieces = []
        upstream.relay(pieces.append)
        await upstream.body_done
        assert b"".join(pieces) == b'{"echo": "{\\"a\\": 1}", "user": "bob"}'
    run_with_host(scenario)


def test_a_stream_that_breaks_mid_body_is_an_error_not_a_short_answer():
    async def scenario(host):
        upstream, _, _ = await _open(host, "/stream")
        pieces = []
        upstream.relay(pieces.append)
        await host.go.put(b"data: 0\n\n")
        await host.go.put(b"die")
        with pytest.raises(UpstreamError, match="before the response was complete"):
            await upstream.body_done
        assert pieces == [b"data: 0\n\n"]
    run_with_host(scenario)


def test_closing_the_connection_is_seen_by_the_engine_host_at_once():
    async def scenario(host):
        upstream, _, _ = await _open(host, "/stream")
        upstream.relay(lambda piece: None)
        await host.go.put(b"data: 0\n\n")
        await asyncio.sleep(0.05)
        assert not host.closed.is_set()
        upstream.close()
        # The handler learns at once, with nothing more written to it: it aborts the request there.
        await asyncio.wait_for(host.closed.wait(), 2)
        with pytest.raises(UpstreamError):
            await upstream.body_done
    run_with_host(scenario)


def test_an_engine_host_that_is_not_there_is_an_upstream_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        with pytest.raises(UpstreamError, match="cannot connect"):
            asyncio.run(UpstreamPool(url).send(request_bytes("GET", url, "/", {}, b"")))


async def _whole(host, pool, path="/whole") -> int:
    upstream, start_line, _ = await _open(host, path, {"X-User": "bob"}, pool=pool)
    upstream.relay(lambda piece: None)
    await upstream.body_done
    return start_line.code


def test_a_connection_is_used_again_after_a_clean_response_and_never_after_an_abort_or_an_error():
    async def scenario(host):
        pool = UpstreamPool(host.url)
        assert [await _whole(host, pool), await _whole(host, pool)] == [201, 201]
        upstream, _, _ = await _open(host, "/stream", pool=pool)
        upstream.relay(lambda piece: None)
        await host.go.put(b"data: 0\n\n")
        await host.go.put(None)
        await upstream.body_done  # a stream that ended cleanly
        await _whole(host, pool)
        assert len(host.peers) == 4 and len(set(host.peers)) == 1, "one connection carried all four"

        upstream, _, _ = await _open(host, "/stream", pool=pool)
        upstream.relay(lambda piece: None)
        await host.go.put(b"data: 0\n\n")
        await asyncio.sleep(0.05)
        upstream.close()  # the caller left: the abort the engine host sees is this connection closing
        await asyncio.wait_for(host.closed.wait(), 2)
        await _whole(host, pool)
        assert host.peers[-1] != host.peers[0], "an aborted request's connection is never used again"

        assert await _whole(host, pool, "/refuse") == 429
        await _whole(host, pool)
        assert host.peers[-1] != host.peers[-2], "nor one that carried an error"
        assert len(set(host.peers)) == 3
    run_with_host(scenario)


def test_a_connection_paused_for_a_slow_caller_as_its_body_ended_is_kept_reading():
    async def scenario(host):
        pool = UpstreamPool(host.url)
        upstream, _, _ = await _open(host, "/stream", pool=pool)
        pieces = []

        def slow_caller(piece):
            pieces.append(piece)
            upstream.pause()  # as the proxy does while its caller's socket is full

        upstream.relay(slow_caller)
        await host.go.put(b"end:data: 0\n\n")
        await upstream.body_done
        assert pieces == [b"data: 0\n\n"]
        # The next request goes on the same connection, and its answer is read.
        assert await asyncio.wait_for(_whole(host, pool), 5) == 201
        assert len(set(host.peers)) == 1
    run_with_host(scenario)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_kept_connection_closed_unanswered_sends_a_get_again_but_never_a_post(method):
    # The engine host may close an idle kept connection just as a request goes out on it. A GET is
    # sent once more on a new connection; a POST (a generation) may have been read before the close
    # (a sibling front end that died mid-request) and must not run twice: its caller gets the error.
    async def main():
        served, connections = [], []  # the number of the connection each request came on; the connections

        async def serve(reader, writer):
            connection = len(connections)
            connections.append(writer)
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head)[1]))
                served.append(connection)
                if served == [0, 0]:  # the second request on the first connection: closed unanswered
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            writer.close()

        async def ask(pool, url):
            upstream = await asyncio.wait_for(pool.send(request_bytes(method, url, "/", {}, b"")), 5)
            start_line, _ = await asyncio.wait_for(upstream.head, 5)
            pieces = []
            upstream.relay(pieces.append)
            await asyncio.wait_for(upstream.body_done, 5)
            assert start_line.code == 200 and pieces == [b"ok"]

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool(url)
        try:
            await ask(pool, url)
            if method == "GET":
                await ask(pool, url)
                assert served == [0, 0, 1]
            else:
                with pytest.raises(UpstreamError, match="closed the connection before the response was complete"):
                    await ask(pool, url)
                await asyncio.sleep(0.1)  # time for a resend to arrive, were there one
                assert served == [0, 0]
        finally:
            server.close()
    asyncio.run(main())


def test_a_kept_connection_the_engine_host_closed_while_idle_is_not_used_again():
    # The engine host closed an idle kept connection and the server's thread has not yet read the
    # end-of-file (it was busy): the next request must go on a new connection, not fail on that one.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    may_close, closed = threading.Event(), threading.Event()

    def serve():  # each connection: one request answered keep-alive, then closed
        with listener, contextlib.suppress(OSError):
            for _ in range(2):
                connection, _ = listener.accept()
                with connection:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    may_close.wait(5)
                closed.set()

    async def ask(pool):
        upstream = await asyncio.wait_for(pool.send(request_bytes("POST", url, "/", {}, b"")), 5)
        start_line, _ = await asyncio.wait_for(upstream.head, 5)
        upstream.relay(lambda piece: None)
        await asyncio.wait_for(upstream.body_done, 5)
        return start_line.code

    async def main():
        pool = UpstreamPool(url)
        assert await ask(pool) == 200
        # The engine host closes the kept connection while the server's thread is busy: it does
        # not run the callback that would read the close.
        may_close.set()
        assert closed.wait(5)
        [kept] = pool._idle
        assert select.select([kept.transport.get_extra_info("socket")], [], [], 5)[0]  # the close has come
        assert await ask(pool) == 200  # a POST: on the closed connection it would have failed
        pool.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    asyncio.run(main())
    server.join(10)


def test_an_idle_connection_is_closed_when_its_reuse_window_ends_though_no_request_comes(monkeypatch):
    # After a burst, dozens of idle connections would otherwise stay open (here and on the engine
    # host) until the next request found them expired.
    monkeypatch.setattr(upstream_pool, "REUSE_WITHIN_S", 0.2)

    async def main():
        ended = asyncio.Event()

        async def serve(reader, writer):
            with contextlib.suppress(asyncio.IncompleteReadError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            ended.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool(url)
        try:
            upstream = await asyncio.wait_for(pool.send(request_bytes("GET", url, "/", {}, b"")), 5)
            upstream.relay(lambda piece: None)
            await asyncio.wait_for(upstream.body_done, 5)
            assert len(pool._idle) == 1
            await asyncio.wait_for(ended.wait(), 5)  # the engine host sees it closed, with no traffic
            await asyncio.sleep(0)
            assert pool._idle == []
        finally:
            pool.close()
            server.close()
    asyncio.run(main())


def _relaying_framed(with_head: bytes, *then: bytes):
    """A chunked response whose head came with `with_head`, relayed asking for the framing, then
    `then`; returns it and what went to the unframed and the framed sink."""
    upstream = UpstreamRequest(b"")
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + with_head)
    decoded, framed = [], []
    upstream.relay(decoded.append, framed.append)
    for data in then:
        upstream.data_received(data)
    return upstream, decoded, framed


def test_a_framed_relay_passes_chunks_on_as_they_came_and_what_came_with_the_head_as_one_chunk():
    async def scenario():
        upstream, decoded, framed = _relaying_framed(b"5\r\nhello\r\n2", b"\r\nhi\r\n3\r\nabc", b"\r\n0\r\n\r\n")
        assert upstream.body_done.done() and decoded == []
        assert b"".join(framed) == b"5\r\nhello\r\n2\r\nhi\r\n3\r\nabc\r\n"
        assert not upstream.ended_mid_chunk
    asyncio.run(scenario())


def test_a_framed_relay_starts_only_on_a_chunk_boundary_and_says_when_it_broke_off_inside_one():
    async def scenario():
        # The head came with half a chunk: that one has gone on unframed, so the rest does too.
        _, decoded, framed = _relaying_framed(b"5\r\nhel", b"lo\r\n0\r\n\r\n")
        assert decoded == [b"hel", b"lo"] and framed == []
        # Framed from a boundary, then the connection breaks inside a chunk: the caller holds part of it.
        upstream, _, framed = _relaying_framed(b"", b"5\r\nhel")
        upstream.connection_lost(None)
        assert framed == [b"5\r\nhel"] and upstream.ended_mid_chunk
        assert isinstance(upstream.body_done.exception(), UpstreamError)
    asyncio.run(scenario())


class _Relaying:
    """Holds its upstream and is its sink, as the proxy handler is."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.pieces = []
        upstream.relay(self.take)

    def take(self, piece: bytes) -> None:
        self.pieces.append(piece)


@contextlib.contextmanager
def garbage_collector_off():
    """Only reference counting frees anything inside: what a cycle holds stays, and the test sees it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("ending", ["whole", "broken"])
def test_a_finished_relay_is_freed_by_reference_counting_not_left_to_the_garbage_collector(ending):
    # A cycle between the handler and its upstream would leave every request for a full collection
    # of the Jupyter server's heap, a stall of the server's one thread (bench/RESULTS.md, issue 9).
    async def scenario(host):
        upstream, _, _ = await _open(host, "/stream")
        relaying = _Relaying(upstream)
        await host.go.put(b"data: 0\n\n")
        await host.go.put(None if ending == "whole" else b"die")
        try:
            await upstream.body_done
        except UpstreamError:
            assert ending == "broken"
        await asyncio.sleep(0.05)  # the transport's own close callbacks
        assert relaying.pieces == [b"data: 0\n\n"]
        gone = [weakref.ref(relaying), weakref.ref(upstream)]
        del relaying, upstream
        assert [ref() for ref in gone] == [None, None]

    with garbage_collector_off():
        run_with_host(scenario)


@pytest.mark.parametrize("ending", ["whole", "broken"])
def test_a_relay_begun_after_the_body_ended_is_freed_by_reference_counting(ending):
    # A short answer (/api/stats, a completion not streamed) often comes whole in the read that
    # brings its head, so its body has ended before the handler calls relay(): the sink it gives
    # then must not be kept, or the handler<->upstream cycle is back (see the test above).
    body = b'{"ok": true, "n": 12345}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)

    async def scenario():
        upstream = UpstreamRequest(b"")
        if ending == "whole":
            upstream.data_received(head + body)
        else:  # the connection breaks mid-body, before the caller starts relaying
            upstream.data_received(head + body[:5])
            upstream.connection_lost(None)
        assert upstream.body_done.done()
        relaying = _Relaying(upstream)
        if ending == "whole":
            assert upstream.body_done.exception() is None
            assert b"".join(relaying.pieces) == body
        else:
            assert isinstance(upstream.body_done.exception(), UpstreamError)
            assert relaying.pieces == [body[:5]]
        gone = [weakref.ref(relaying), weakref.ref(upstream)]
        del relaying, upstream
        assert [ref() for ref in gone] == [None, None]

    with garbage_collector_off():
        asyncio.run(scenario())
