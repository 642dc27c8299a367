"""The proxy's timing, against a stub engine host that writes only when the test says so, behind a
real `jupyter server` (`c.LightLLM.engine_url`): the response head reaches the caller while the
engine host is still prefilling, each event reaches it before the next one is produced, and a
caller that reads slowly holds the engine host back instead of filling the Jupyter server's memory."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import socket
import threading
import time

import httpx
import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from jupyter_harness import JupyterServer, wait_for

pytestmark = pytest.mark.slow


class StubEngineHost:
    """`POST /api/generate` sends its head at once, as the engine host does on submit, then one
    event per item the test puts in `produce` (None ends the stream). Runs on a thread of its own."""

    FLOOD_BYTES = 128 << 20  # far more than the sockets between here and the caller can hold

    def __init__(self):
        self.produce: queue.Queue = queue.Queue()
        self.flooded = 0  # bytes of `/api/flood` the connection to the Jupyter server has taken so far
        [sock] = bind_sockets(0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        asyncio.set_event_loop(self._loop)
        produce = self.produce

        class Generate(web.RequestHandler):
            async def post(self):
                self.set_header("Content-Type", "text/event-stream")
                self.set_header("X-Request-Id", "req-1")
                self.flush()
                loop = asyncio.get_running_loop()
                while (event := await loop.run_in_executor(None, produce.get)) is not None:
                    self.write(f"data: {event}\n\n".encode())
                    await self.flush()

        host = self

        class Flood(web.RequestHandler):
            async def post(self):
                self.set_header("Content-Type", "text/event-stream")
                for piece in flood_pieces(host.FLOOD_BYTES):
                    self.write(piece)
                    await self.flush()
                    host.flooded += len(piece)

        class BrokenOff(web.RequestHandler):
            async def post(self):
                stream = self.detach()  # as a SIGKILL would leave it: one event, then half of one
                await stream.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n")
                await asyncio.sleep(0.2)  # the head on its own, as the engine host sends it on submit
                await stream.write(b"b\r\ndata: one\n\n\r\nb\r\ndata: t")
                stream.close()

        HTTPServer(web.Application([(r"/api/generate", Generate), (r"/api/flood", Flood),
                                    (r"/api/broken", BrokenOff)])).add_sockets([sock])
        self._loop.run_forever()

    def stop(self) -> None:
        self.produce.put(None)  # a handler still waiting for its next event ends
        self._loop.call_soon_threadsafe(self._loop.stop)


def flood_pieces(total: int):
    """64 KB pieces, each of its own number: a piece lost, doubled or out of order shows."""
    for i in range(total >> 16):
        yield i.to_bytes(4, "big") * (1 << 14)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    host = StubEngineHost()
    server = JupyterServer(tmp_path_factory.mktemp("jupyter"), f"--LightLLM.engine_url={host.url}",
                           "--LightLLM.engine_token=stub")
    try:
        wait_for(server.status, 60, "the extension to answer")
        yield server, host
    finally:
        server.stop()
        host.stop()


def test_the_head_arrives_before_the_first_token_and_each_event_before_the_next_is_produced(proxied):
    server, host = proxied
    body = {"prompt": "Hi", "sampling": {"max_tokens": 3}, "stream": True}
    with httpx.stream("POST", f"{server.url}/lightllm/api/generate", json=body, headers=server.auth,
                      timeout=10) as response:
        # Nothing produced yet: the status and the request id (what an abort needs) are here already.
        assert response.status_code == 200 and response.headers["X-Request-Id"] == "req-1"
        lines = response.iter_lines()
        for i in range(3):
            host.produce.put(f'{{"token_ids": [{i}]}}')
            assert next(line for line in lines if line) == f'data: {{"token_ids": [{i}]}}'
        host.produce.put(None)
        assert [line for line in lines if line] == []


def test_a_caller_that_does_not_read_holds_the_engine_host_back(proxied):
    server, host = proxied
    with httpx.stream("POST", f"{server.url}/lightllm/api/flood", json={}, headers=server.auth,
                      timeout=30) as response:
        assert response.status_code == 200
        time.sleep(2)  # not reading: what the engine host could write is what the sockets hold
        assert host.flooded < host.FLOOD_BYTES // 2, "the proxy read on into its own memory"
        # Some pieces went into the socket, the rest through tornado's buffer while the socket was
        # full: every byte arrives, once, in order.
        received, expected = hashlib.sha256(), hashlib.sha256()
        for piece in response.iter_bytes():
            received.update(piece)
        for piece in flood_pieces(host.FLOOD_BYTES):
            expected.update(piece)
        assert received.digest() == expected.digest()


def test_a_stream_that_breaks_off_inside_an_event_is_cut_there_for_the_caller_too(proxied):
    # The proxy passes chunks on framed as they came: after a chunk cut short, an error event
    # would land inside it, garbled, so the caller's connection is closed at the same byte instead.
    server, _ = proxied
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /lightllm/api/broken HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Authorization: token {server.token}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
        received = b""
        while piece := sock.recv(65536):
            received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"b\r\ndata: one\n\n\r\nb\r\ndata: t"
