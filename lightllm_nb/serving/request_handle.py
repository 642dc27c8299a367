"""A caller's sink for one request: its outputs as they come (blocking or async iteration), its
completion at the end, and `abort()`."""

from __future__ import annotations

import threading
from typing import Callable

from ..engine.prompt_checks import CallerText
from ..scheduling.request import Completion, RequestOutput
from ..telemetry.mailbox import Mailbox, MailboxClosed


class RequestHandle:
    def __init__(self, loop, request_id: str, user: str, prompt_tokens: int, *, keep_outputs: bool = True,
                 on_finish: Callable[["RequestHandle"], None] | None = None, text: CallerText | None = None):
        self.request_id = request_id   # unguessable (secrets.token_urlsafe)
        self.user = user
        self.prompt_tokens = prompt_tokens
        self.completion: Completion | None = None   # set once finished
        self.started = False           # has had an output (the driver loop's waiting count)
        self._loop = loop
        self._keep = keep_outputs
        self._on_finish = on_finish
        self._text = text              # decodes text deltas as outputs are read (off the step thread)
        self._outputs = Mailbox()      # unbounded: a request's outputs are never dropped
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def abort(self) -> bool:
        """Stop the request; False if it already ended."""
        return self._loop.abort(self.request_id, user=self.user)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the completion (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.completion

    async def aresult(self) -> Completion:
        """`result` for asyncio; consumes any outputs not yet read."""
        while True:
            try:
                await self._outputs.aget()
            except MailboxClosed:
                return self.completion

    def __iter__(self):
        return self

    def __next__(self) -> RequestOutput:
        try:
            return self._with_text(self._outputs.get())
        except MailboxClosed:
            raise StopIteration from None

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return self._with_text(await self._outputs.aget())
        except MailboxClosed:
            raise StopAsyncIteration from None

    def _with_text(self, out: RequestOutput) -> RequestOutput:
        if self._text is not None:
            out.text_delta = self._text.delta(out.new_token_ids, out.finish_reason)
        return out

    def _deliver(self, out: RequestOutput) -> None:
        """On the loop thread: one output; the last one closes the sink."""
        if self._keep:
            self._outputs.put(out)
        if out.finished:
            self.completion = out.completion
            self._done.set()
            self._outputs.close()
            if self._on_finish is not None:
                self._on_finish(self)

    def __repr__(self) -> str:
        state = self.completion.finish_reason if self.completion else "running"
        return f"RequestHandle({self.request_id!r}, user={self.user!r}, {state})"
