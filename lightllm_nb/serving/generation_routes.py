"""The routes that generate: OpenAI's completions and chat completions and the native
`/api/generate`, streaming (server-sent events) or not. A client that goes away aborts its request."""

from __future__ import annotations

import abc
import asyncio
import json
import time

from tornado.iostream import StreamClosedError

from ..sampling_params import InvalidRequestError
from .api_errors import ApiError
from .http_app import ApiHandler, log
from .native_api import completion_record, output_record, parse_generate
from .openai_api import OpenAIShapes, parse_chat, parse_completion
from .request_fields import parse_json_object, sampling_for


def sse(record: dict | str) -> bytes:
    return b"data: " + (record if isinstance(record, str) else json.dumps(record)).encode() + b"\n\n"


class _GenerationHandler(ApiHandler, metaclass=abc.ABCMeta):
    """Parse, check, submit, then stream or collect; subclasses say how a body is read and outputs look."""

    handle = None   # the submitted request's RequestHandle
    gone = False    # the client closed its connection

    @abc.abstractmethod
    def parse(self, body: dict):
        """The body as a GenerationRequest (an ApiError if it is bad)."""

    async def post(self) -> None:
        if self.ctx.stopping:
            raise ApiError(503, "the server is shutting down: retry against its successor")
        try:
            request = self.parse(parse_json_object(self.request.body))
            sampling = await self.sampling(request)
        except ApiError:
            self.ctx.metrics.request_rejected()
            raise
        if self.ctx.stopping:  # SIGTERM came while its constraint compiled: the drain did not wait for it
            raise ApiError(503, "the server began shutting down while this request was checked: retry against "
                                "its successor")
        if self.gone:  # it left while its constraint compiled: nobody would read the answer
            log.info("%s: the client left before its request was queued", self.request.path)
            return
        try:
            self.handle = await self.ctx.driver.asubmit(request.prompt_ids, sampling, user=self.caller.user,
                                                        priority=request.priority, stream_text=request.stream,
                                                        keep_outputs=request.stream)
        except InvalidRequestError as err:
            self.ctx.metrics.request_rejected()
            raise ApiError(429 if "waiting" in str(err) else 400, str(err)) from None
        self.started = time.perf_counter()
        self.ctx.active.add(self)
        completion = None
        try:
            completion = await (self.stream(request) if request.stream else self.collect())
        except StreamClosedError:
            pass  # the client left; the finally below aborts its request
        finally:
            self.ctx.active.discard(self)
            if completion is None:
                self.handle.abort()
        if completion is None:  # counted and logged like any other request, once its abort lands
            completion = await self.handle.aresult()
        if completion is not None:
            self.ctx.metrics.request_finished(completion)
            self._log_request(completion)

    async def sampling(self, request):
        """The request's SamplingParams. Making them compiles a structured-output constraint to check
        it: seconds for a big schema, during which xgrammar lets go of the GIL, so that runs on the
        context's worker threads while this loop serves on; without a constraint they take
        microseconds, less than the hop to a thread, and are made here."""
        if not request.has_constraint:
            return sampling_for(request, self.ctx.model.max_context)
        return await asyncio.get_running_loop().run_in_executor(self.ctx.checks, sampling_for, request,
                                                                self.ctx.model.max_context)

    async def collect(self):
        completion = await self.handle.aresult()
        if completion is None:
            raise ApiError(503, "the engine stopped before this request finished")
        self.send_json(self.complete(completion))
        return completion

    async def stream(self, request):
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Request-Id", self.handle.request_id)
        # Each event is a small write: with Nagle's algorithm on, a kept-alive connection (the
        # extension's proxy keeps its upstream ones, OpenAI clients keep theirs) holds an event back
        # until the reader has acknowledged the previous one: ~3.5 ms on a lone stream (bench/proxy.py).
        self.request.connection.stream.set_nodelay(True)
        self.flush()
        # A stream that fell behind sends everything produced since its last write as one record
        # (OpenAI clients take multi-token deltas): the cost per token falls as the load rises.
        async for out in self.handle.coalesced():
            self.write(b"".join(sse(r) for r in self.records(out, request)))
            await self.flush()
            if out.completion is not None:
                self.finish()
                return out.completion
        raise StreamClosedError()  # the loop shut down under us: nothing more will come

    def on_connection_close(self) -> None:
        self.gone = True
        if self.handle is not None:
            self.handle.abort()

    @abc.abstractmethod
    def complete(self, completion) -> dict:
        """The whole answer of a request that does not stream."""

    @abc.abstractmethod
    def records(self, out, request) -> list:
        """The server-sent records of one step's output of a streamed request."""

    def _log_request(self, completion) -> None:
        m = completion.metrics
        ttft = m.get("time_to_first_token")
        log.info("%s %s user=%s prompt=%d output=%d finish=%s ttft=%s e2e=%.3fs", self.request.path,
                 completion.request_id, self.caller.user, completion.prompt_tokens, completion.completion_tokens,
                 completion.finish_reason, f"{ttft:.3f}s" if ttft is not None else "-",
                 time.perf_counter() - self.started)


class NativeGenerateHandler(_GenerationHandler):
    def parse(self, body):
        return parse_generate(body, self.ctx.model)

    def complete(self, completion):
        return completion_record(completion)

    def records(self, out, request):
        return [output_record(out)]


class _OpenAIHandler(_GenerationHandler):
    chat = False

    def complete(self, completion):
        return OpenAIShapes(self.ctx.model, completion.request_id, chat=self.chat).response(completion)

    def records(self, out, request):
        shapes = getattr(self, "shapes", None)
        first = shapes is None
        if first:
            shapes = self.shapes = OpenAIShapes(self.ctx.model, out.request_id, chat=self.chat)
        done = out.completion
        # Logprobs are known per request once it finishes: they ride on the last chunk.
        logprobs = done.logprobs if done is not None else None
        records = []
        if out.text_delta or first or done is None:
            records.append(shapes.chunk(out.text_delta, None, first=first))
        if done is not None:
            records.append(shapes.chunk("", done.finish_reason, logprobs))
            if request.include_usage:
                records.append(shapes.usage_chunk(done))
            records.append("[DONE]")
        return records


class CompletionHandler(_OpenAIHandler):
    def parse(self, body):
        return parse_completion(body, self.ctx.model)


class ChatHandler(_OpenAIHandler):
    chat = True

    def parse(self, body):
        return parse_chat(body, self.ctx.model)
