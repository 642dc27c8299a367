"""`HTTPClient`: the `Client` interface over an engine host's native API (`lightllm-nb serve`).

Requests go over httpx (sync and async); the event stream over tornado's websocket client, read
by a small thread of its own, so both blocking and asyncio readers are served from one mailbox.
Neither library is imported before it is needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..sampling_params import InvalidRequestError, SamplingParams
from ..scheduling.request import Completion
from ..telemetry.events import StepEvent
from ..telemetry.mailbox import Mailbox, MailboxClosed
from .auth import OPERATOR_USER, USER_HEADER


class EngineHostError(RuntimeError):
    """The engine host answered with an error that is not the caller's input."""


def _raise_for(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    if status in (401, 403):
        raise PermissionError(f"the engine host refused the token ({status}): {message}")
    if status in (400, 404, 413, 422, 429):
        raise InvalidRequestError(message)
    raise EngineHostError(f"the engine host answered {status}: {message}")


def _body(prompt, sampling, prompt_token_ids, messages, priority, stream) -> dict:
    sampling = sampling if sampling is not None else SamplingParams()
    if isinstance(sampling, dict):  # accepted like the native API takes it
        sampling = SamplingParams(**sampling)
    body = {"sampling": dataclasses.asdict(sampling), "priority": priority, "stream": stream}
    for name, value in (("prompt", prompt), ("prompt_token_ids", prompt_token_ids), ("messages", messages)):
        if value is not None:
            body[name] = value
    return body


def _completion(record: dict) -> Completion:
    return Completion(**record)


class _SSEText:
    completion: Completion | None = None

    def _text_of(self, line: str) -> str:
        """The text delta of one SSE line ("" for other lines); keeps the completion when it comes."""
        if not line.startswith("data: "):
            return ""
        record = json.loads(line[len("data: "):])
        if record.get("completion") is not None:
            self.completion = _completion(record["completion"])
        return record["text"]


class HTTPTextStream(_SSEText):
    """Text deltas of one streamed request; `completion` once it ends. What aborts it is what aborts
    a `TextStream`: leaving a loop over it early, `close()`, the end of a `with` block."""

    def __init__(self, client: "HTTPClient", response):
        self._client, self._response = client, response
        self.request_id = response.headers.get("X-Request-Id")

    def __iter__(self):
        try:
            for line in self._response.iter_lines():
                text = self._text_of(line)
                if text:
                    yield text
        finally:
            self._response.close()
            if self.completion is None:
                self.abort()

    def abort(self) -> bool:
        return self._client.abort(self.request_id) if self.completion is None else False

    def close(self) -> None:
        """Stop reading; aborts the request if it is still running."""
        self._response.close()
        self.abort()

    def __enter__(self) -> "HTTPTextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped before its end: the engine host aborts the request of a client gone, so closing the
        # connection is enough (no HTTP request from a finalizer).
        if not self._response.is_closed:
            self._response.close()


class AsyncHTTPTextStream(_SSEText):
    """`HTTPTextStream` for asyncio: `async for delta in client.astream(...)` sends the request as the
    loop starts, `await client.astream(...)` before it; leaving the loop early, cancelling the task,
    `aclose()` or the end of an `async with` block aborts it."""

    def __init__(self, client: "HTTPClient", body: dict):
        self._client, self._body = client, body
        self.request_id: str | None = None
        self._response = None

    def __await__(self):
        return self.start().__await__()

    async def start(self) -> "AsyncHTTPTextStream":
        if self._response is not None:
            return self
        http = self._client._async_http()
        self._response = await http.send(http.build_request("POST", "/api/generate", json=self._body), stream=True)
        if self._response.status_code != 200:
            body = await self._response.aread()
            _raise_for(self._response.status_code, body)
        self.request_id = self._response.headers.get("X-Request-Id")
        return self

    async def __aiter__(self):
        await self.start()
        try:
            async for line in self._response.aiter_lines():
                text = self._text_of(line)
                if text:
                    yield text
        finally:
            await self._response.aclose()
            if self.completion is None:
                await self.aabort()

    async def aabort(self) -> bool:
        return await self._client.aabort(self.request_id) if self.completion is None else False

    async def aclose(self) -> None:
        if self._response is not None:  # never sent: nothing to abort
            await self._response.aclose()
            await self.aabort()

    async def __aenter__(self) -> "AsyncHTTPTextStream":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class HTTPEventSubscription:
    """StepEvents from `/api/events`, read by a thread of its own into a bounded mailbox; with
    `max_rate` the engine host caps them (`?rate=`), so the skipped steps never cross the network."""

    def __init__(self, url: str, headers: dict, *, pages: bool, maxsize: int, max_rate: float | None = None):
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate={max_rate!r} must be positive (events a second), or None for every step")
        self._mailbox = Mailbox(maxsize)
        self._remote_dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket = None
        query = f"pages={int(pages)}" + (f"&rate={max_rate!r}" if max_rate is not None else "")
        ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/api/events?" + query
        connected, self._error = threading.Event(), None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read(ws_url, headers, connected)),
                                        name="lightllm-events", daemon=True)
        self._thread.start()
        connected.wait(30)
        if self._error is not None:
            raise self._error

    @property
    def dropped(self) -> int:
        return self._remote_dropped + self._mailbox.dropped

    @property
    def remote_dropped(self) -> int:
        """The part of `dropped` that the engine host lost (this socket's reader there fell behind);
        the rest was lost here, by a reader of this subscription slower than the socket."""
        return self._remote_dropped

    async def _read(self, url: str, headers: dict, connected: threading.Event) -> None:
        from tornado.httpclient import HTTPClientError, HTTPRequest
        from tornado.websocket import websocket_connect

        self._loop = asyncio.get_running_loop()
        try:
            self._socket = await websocket_connect(HTTPRequest(url, headers=headers))
        except HTTPClientError as err:
            body = err.response.body if err.response is not None else b""
            try:
                _raise_for(err.code, body or b"")
            except Exception as mapped:  # noqa: BLE001 - handed to the caller's thread
                self._error = mapped
        except OSError as err:
            self._error = ConnectionError(f"cannot reach the engine host's event stream at {url}: {err}")
        connected.set()
        if self._error is not None:
            self._mailbox.close()
            return
        pending = None
        while True:
            message = await self._socket.read_message()
            if message is None:
                break
            if isinstance(message, bytes):
                pending.page_owner = np.frombuffer(message, dtype="<i4").copy()
                continue
            record = json.loads(message)
            self._remote_dropped = record.pop("dropped", 0)
            pending = StepEvent.from_dict(record)
            self._mailbox.put(pending)
        self._mailbox.close()

    def __iter__(self):
        while True:
            try:
                yield self._mailbox.get()
            except MailboxClosed:
                return

    async def __aiter__(self):
        while True:
            try:
                yield await self._mailbox.aget()
            except MailboxClosed:
                return

    def close(self) -> None:
        if self._loop is not None and self._socket is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._socket.close)
            except RuntimeError:  # its loop already ended: the socket is closed
                pass
        self._mailbox.close()


class HTTPClient:
    """`Client` over HTTP. `user` is sent as X-LightLLM-User: only a proxy-role token may act for it."""

    def __init__(self, url: str, token: str, user: str | None = None, *, timeout: float = 600.0,
                 max_concurrency: int = 64):
        import httpx

        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        if user is not None:
            self._headers[USER_HEADER] = user
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._limits = httpx.Limits(max_connections=max_concurrency)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                  limits=self._limits)
        self._ahttp = None
        self._max_concurrency = max_concurrency
        self._user = user
        self._model_name: str | None = None

    # ---- plain requests --------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None):
        response = self._http.request(method, path, json=body)
        _raise_for(response.status_code, response.content)
        return response.json()

    async def _arequest(self, method: str, path: str, body: dict | None = None):
        response = await self._async_http().request(method, path, json=body)
        _raise_for(response.status_code, response.content)
        return response.json()

    def _async_http(self):
        """An AsyncClient bound to the running event loop (httpx's pools belong to one loop)."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._ahttp is None or self._ahttp[0] is not loop:
            self._ahttp = (loop, httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                                   limits=self._limits))
        return self._ahttp[1]

    @property
    def user(self) -> str:
        """The user this client acts as: the one given, else the token's own (asked once)."""
        if self._user is None:
            self._user = self.stats().get("user", {}).get("name", OPERATOR_USER)
        return self._user

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = self._request("GET", "/v1/models")["data"][0]["id"]
        return self._model_name

    # ---- Client ----------------------------------------------------------------------------
    def generate(self, prompts=None, sampling=None, *, prompt_token_ids=None, priority: int = 0,
                 progress: bool | None = None) -> list[Completion]:
        bodies = self._generate_bodies(prompts, sampling, prompt_token_ids, priority)
        from tqdm.auto import tqdm

        show = progress if progress is not None else len(bodies) >= 8
        with ThreadPoolExecutor(min(self._max_concurrency, len(bodies))) as pool, \
                tqdm(total=len(bodies), disable=not show, desc="generating", unit="req") as bar:
            def one(body):
                result = _completion(self._request("POST", "/api/generate", body))
                bar.update(1)
                return result
            return list(pool.map(one, bodies))

    async def agenerate(self, prompts=None, sampling=None, *, prompt_token_ids=None, priority: int = 0,
                        progress: bool | None = None) -> list[Completion]:
        bodies = self._generate_bodies(prompts, sampling, prompt_token_ids, priority)
        results = await asyncio.gather(*(self._arequest("POST", "/api/generate", b) for b in bodies))
        return [_completion(r) for r in results]

    @staticmethod
    def _generate_bodies(prompts, sampling, prompt_token_ids, priority) -> list[dict]:
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequestError("pass exactly one of prompts (text) or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None and any(isinstance(p, int) for p in prompt_token_ids):
            raise InvalidRequestError("prompt_token_ids takes a list of prompts, each a list of token ids: "
                                      "wrap a single prompt as [ids]")
        inputs = list(prompts if prompts is not None else prompt_token_ids)
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(inputs)
        if len(params) != len(inputs):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(inputs)} prompts: "
                                      "pass one, or one per prompt")
        text = prompts is not None
        return [_body(p if text else None, s, None if text else list(p), None, priority, False)
                for p, s in zip(inputs, params)]

    def stream(self, prompt=None, sampling=None, *, prompt_token_ids=None, messages=None,
               priority: int = 0) -> HTTPTextStream:
        body = _body(prompt, sampling, prompt_token_ids, messages, priority, True)
        response = self._http.send(self._http.build_request("POST", "/api/generate", json=body), stream=True)
        if response.status_code != 200:
            _raise_for(response.status_code, response.read())
        return HTTPTextStream(self, response)

    def astream(self, prompt=None, sampling=None, *, prompt_token_ids=None, messages=None,
                priority: int = 0) -> AsyncHTTPTextStream:
        """`async for delta in client.astream(...)`, or `stream = await client.astream(...)` first."""
        body = _body(prompt, sampling, prompt_token_ids, messages, priority, True)
        return AsyncHTTPTextStream(self, body)

    def chat(self, messages: list[dict], sampling=None) -> Completion:
        return _completion(self._request("POST", "/api/generate", _body(None, sampling, None, messages, 0, False)))

    async def achat(self, messages: list[dict], sampling=None) -> Completion:
        body = _body(None, sampling, None, messages, 0, False)
        return _completion(await self._arequest("POST", "/api/generate", body))

    def abort(self, request_id: str) -> bool:
        try:
            return self._request("POST", f"/api/abort/{request_id}")["aborted"]
        except InvalidRequestError:  # 404: unknown, finished, or someone else's
            return False

    async def aabort(self, request_id: str) -> bool:
        try:
            return (await self._arequest("POST", f"/api/abort/{request_id}"))["aborted"]
        except InvalidRequestError:
            return False

    def stats(self) -> dict:
        return self._request("GET", "/api/stats")

    async def astats(self) -> dict:
        return await self._arequest("GET", "/api/stats")

    def subscribe(self, *, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> HTTPEventSubscription:
        return HTTPEventSubscription(self.url, self._headers, pages=pages, maxsize=maxsize, max_rate=max_rate)

    async def asubscribe(self, *, pages: bool = False, maxsize: int = 256,
                         max_rate: float | None = None) -> HTTPEventSubscription:
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.subscribe(pages=pages, maxsize=maxsize, max_rate=max_rate))

    def close(self) -> None:
        self._http.close()
        self._ahttp = None  # its pool closes with its loop

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
