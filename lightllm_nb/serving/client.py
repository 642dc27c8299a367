"""One client interface for an engine in this process (`LocalClient`) or behind HTTP (`HTTPClient`,
in http_client.py): the magic, the panels and the extension use only `Client`.

Tokenization and chat templating happen here, on the caller's thread; the driver loop's thread
only schedules, runs and samples.
"""

from __future__ import annotations

import asyncio
import numbers
import queue
from typing import Protocol, Sequence, runtime_checkable

from tqdm.auto import tqdm

from ..engine.engine import Engine
from ..sampling_params import InvalidRequestError
from ..scheduling.request import Completion
from ..telemetry.hub import EventSubscription
from .driver import DriverLoop
from .text_stream import TextStream


@runtime_checkable
class Client(Protocol):
    model_name: str
    user: str

    def generate(self, prompts=None, sampling=None, *, prompt_token_ids=None, priority: int = 0,
                 progress: bool | None = None) -> list[Completion]: ...
    def stream(self, prompt=None, sampling=None, *, prompt_token_ids=None, messages=None,
               priority: int = 0) -> TextStream: ...
    def chat(self, messages, sampling=None) -> Completion: ...
    def abort(self, request_id: str) -> bool: ...
    def stats(self) -> dict: ...
    def subscribe(self, *, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> EventSubscription: ...
    async def agenerate(self, prompts=None, sampling=None, *, prompt_token_ids=None,
                        priority: int = 0) -> list[Completion]: ...
    def astream(self, prompt=None, sampling=None, *, prompt_token_ids=None, messages=None,
                priority: int = 0) -> TextStream: ...  # `async for d in client.astream(...)`, or awaited
    async def achat(self, messages, sampling=None) -> Completion: ...
    async def aabort(self, request_id: str) -> bool: ...
    async def astats(self) -> dict: ...
    async def asubscribe(self, *, pages: bool = False, maxsize: int = 256,
                         max_rate: float | None = None) -> EventSubscription: ...
    def close(self) -> None: ...


class LocalClient:
    """A `Client` on a DriverLoop in this process, acting as `user`. Thread-safe and asyncio-safe;
    many clients (one per user) may share one loop."""

    def __init__(self, loop: DriverLoop, *, user: str = "default"):
        """`loop` may also be an Engine: its driver loop then starts on the first request (so a
        mistake caught before submitting leaves the engine's low-level API to this thread)."""
        if not isinstance(user, str) or not user:
            raise InvalidRequestError(f"user={user!r} is invalid: it must be a non-empty string")
        self._loop_source = loop
        self.user = user
        engine = loop if isinstance(loop, Engine) else loop.engine
        self.model_name = engine.model_name
        self._prompts = engine.prompts
        self._subscriptions: list[EventSubscription] = []

    @property
    def loop(self) -> DriverLoop:
        source = self._loop_source
        return source.driver() if isinstance(source, Engine) else source

    # ---- sync --------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None, sampling=None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, priority: int = 0,
                 progress: bool | None = None) -> list[Completion]:
        """Many prompts through continuous batching; completions in input order. `sampling` is
        one SamplingParams (or dict) for all, or one per prompt. Interrupting aborts them all."""
        requests = self._batch(prompts, sampling, prompt_token_ids)
        finished: queue.SimpleQueue = queue.SimpleQueue()
        show = progress if progress is not None else len(requests) >= 8
        handles = []
        with tqdm(total=len(requests), disable=not show, desc="generating", unit="req") as bar:
            try:
                handles = self.loop.submit_many(requests, user=self.user, priority=priority, stream_text=False,
                                                keep_outputs=False, on_finish=finished.put)
                for _ in handles:
                    finished.get()
                    bar.update(1)
            finally:  # an interrupted generate must not leave its requests holding KV slots
                for handle in handles:
                    if not handle.finished:
                        handle.abort()
        return [h.completion for h in handles]

    def stream(self, prompt: str | None = None, sampling=None, *, prompt_token_ids: Sequence[int] | None = None,
               messages: list[dict] | None = None, priority: int = 0) -> TextStream:
        """Text deltas as they are produced; leaving a loop over it early (or `close()`, or the end of a
        `with` block) aborts the request."""
        ids, params = self._prompts.request(prompt, prompt_token_ids, messages, sampling)
        return TextStream(self.loop.submit(ids, params, user=self.user, priority=priority, stream_text=True))

    def chat(self, messages: list[dict], sampling=None) -> Completion:
        """One assistant reply to `messages`, formatted with the model's chat template."""
        ids, params = self._prompts.request(None, None, messages, sampling)
        handle = self.loop.submit(ids, params, user=self.user, stream_text=False, keep_outputs=False)
        try:
            return handle.result()
        finally:
            if not handle.finished:
                handle.abort()

    def abort(self, request_id: str) -> bool:
        return self.loop.abort(request_id, user=self.user)

    def stats(self) -> dict:
        return self.loop.stats(user=self.user)

    def subscribe(self, *, pages: bool = False, maxsize: int = 256, max_rate: float | None = None) -> EventSubscription:
        """StepEvents as this client's user may see them (other users' requests anonymized); at most
        `max_rate` a second (the newest step, every skipped step's decisions kept) if given."""
        subscription = self.loop.subscribe(user=self.user, pages=pages, maxsize=maxsize, max_rate=max_rate)
        self._subscriptions.append(subscription)
        return subscription

    def close(self) -> None:
        """End this client's subscriptions (the engine and its loop stay up)."""
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()

    # ---- async -------------------------------------------------------------------------------
    async def agenerate(self, prompts: str | Sequence[str] | None = None, sampling=None, *,
                        prompt_token_ids: Sequence[Sequence[int]] | None = None,
                        priority: int = 0) -> list[Completion]:
        requests = self._batch(prompts, sampling, prompt_token_ids)
        handles = []
        try:
            handles = self.loop.submit_many(requests, user=self.user, priority=priority, stream_text=False,
                                            keep_outputs=False)
            return list(await asyncio.gather(*(h.aresult() for h in handles)))
        finally:  # cancelled: its requests stop now
            for handle in handles:
                if not handle.finished:
                    handle.abort()

    def astream(self, prompt: str | None = None, sampling=None, *, prompt_token_ids: Sequence[int] | None = None,
                messages: list[dict] | None = None, priority: int = 0) -> TextStream:
        """`async for delta in client.astream(...)`, or `stream = await client.astream(...)` first (the
        request is submitted at once, without blocking); leaving the loop early or cancelling the
        reading task aborts the request."""
        return self.stream(prompt, sampling, prompt_token_ids=prompt_token_ids, messages=messages,
                           priority=priority)

    async def achat(self, messages: list[dict], sampling=None) -> Completion:
        ids, params = self._prompts.request(None, None, messages, sampling)
        handle = self.loop.submit(ids, params, user=self.user, stream_text=False, keep_outputs=False)
        try:
            return await handle.aresult()
        finally:
            if not handle.finished:
                handle.abort()

    async def aabort(self, request_id: str) -> bool:
        return self.abort(request_id)  # never blocks: the abort goes through the loop's inbox

    async def astats(self) -> dict:
        return await asyncio.wrap_future(self.loop.call(lambda: self.loop._stats(self.user)))

    async def asubscribe(self, *, pages: bool = False, maxsize: int = 256,
                         max_rate: float | None = None) -> EventSubscription:
        return self.subscribe(pages=pages, maxsize=maxsize, max_rate=max_rate)

    # ---- internals -----------------------------------------------------------------------------
    def _batch(self, prompts, sampling, prompt_token_ids) -> list[tuple[list[int], object]]:
        """Every prompt of a generate call encoded and checked before any is queued, so a bad
        prompt leaves no half-run batch."""
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequestError("pass exactly one of prompts (text) or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)):
                raise InvalidRequestError(f"prompts must be a string or a list of strings, got "
                                          f"{type(prompts).__name__}")
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise InvalidRequestError(f"prompts[{i}] is {type(p).__name__}: each prompt must be a "
                                              "string (for token ids, pass prompt_token_ids=[[...], ...])")
            inputs = [(p, None) for p in prompts]
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__"):
                raise InvalidRequestError("prompt_token_ids takes a list of prompts, each a list of token ids")
            prompt_token_ids = list(prompt_token_ids)
            if any(isinstance(p, numbers.Integral) or not hasattr(p, "__iter__") for p in prompt_token_ids):
                raise InvalidRequestError("prompt_token_ids takes a list of prompts, each a list of token ids: "
                                          "wrap a single prompt as [ids]")
            inputs = [(None, p) for p in prompt_token_ids]
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(inputs)
        if len(params) != len(inputs):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(inputs)} prompts: "
                                      "pass one, or one per prompt")
        return [self._prompts.request(text, ids, None, p) for (text, ids), p in zip(inputs, params)]
