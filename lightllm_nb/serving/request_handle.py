"""A caller's sink for one request: its outputs as they come (blocking or async iteration), its
completion at the end, and `abort()`.

An asyncio reader is not woken once per output: the handle remembers the event loop that reads it
and what wakes it there (`reader`), and the driver loop calls each such waker once per step with all
of its handles that got outputs. A reader that fell behind takes everything queued at once
(`coalesced`).
"""

from __future__ import annotations

import asyncio
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
        # (event loop, waker): once per step the driver loop has `waker(handles)` called there
        self.reader: tuple[asyncio.AbstractEventLoop, Callable[[list], None]] | None = None
        self._reader_waiting: asyncio.Future | None = None         # that reader, asleep until a step wakes it

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
                await self._next_queued()
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
            return self._with_text(await self._next_queued())
        except MailboxClosed:
            raise StopAsyncIteration from None

    async def coalesced(self):
        """Async iteration that yields, at each wake-up, one output merging everything produced
        since the last one (token ids and text joined; the last one's end and completion)."""
        while True:
            try:
                outs = [await self._next_queued()]
            except MailboxClosed:
                return
            outs += self.take_queued()
            yield self._with_text(outs[0] if len(outs) == 1 else _merged(outs))

    def _with_text(self, out: RequestOutput) -> RequestOutput:
        if self._text is not None:
            out.text_delta = self._text.delta(out.new_token_ids, out.finish_reason)
        return out

    async def _next_queued(self) -> RequestOutput:
        """The oldest output, asleep until the driver loop's once-per-step wake-up if none is queued."""
        loop = asyncio.get_running_loop()
        while True:
            # Say where the reader sleeps before looking: an output put after the look is then
            # followed by a wake-up on this loop (see DriverLoop._deliver).
            waiting = self._reader_waiting = loop.create_future()
            if self.reader is None or self.reader[0] is not loop:
                self.reader = (loop, wake_readers)
            if len(self._outputs) or self._outputs.closed:
                self._reader_waiting = None
                return self._outputs.get()  # MailboxClosed once closed and empty
            await waiting

    def read_on(self, loop: asyncio.AbstractEventLoop, waker: Callable[[list["RequestHandle"]], None]) -> None:
        """Have `waker(handles)` called on `loop` once per step for the handles that got outputs
        (for a reader of many handles; it takes them with `take_queued`)."""
        self.reader = (loop, waker)

    def take_queued(self) -> list[RequestOutput]:
        """Every output queued now, without waiting (as they came: text is not decoded)."""
        outs = []
        while len(self._outputs):  # one reader: what is counted here is there to take
            outs.append(self._outputs.get())
        return outs

    def wake_reader(self) -> None:
        """On the reader's event loop: outputs (or the end) arrived."""
        waiting, self._reader_waiting = self._reader_waiting, None
        if waiting is not None and not waiting.done():  # a cancelled reader's future is done already
            waiting.set_result(None)

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


def wake_readers(handles: list[RequestHandle]) -> None:
    """One event loop's wake-up for a step: every handle of that loop that got outputs."""
    for handle in handles:
        handle.wake_reader()


def _merged(outs: list[RequestOutput]) -> RequestOutput:
    last = outs[-1]
    return RequestOutput(last.request_id, [t for out in outs for t in out.new_token_ids],
                         "".join(out.text_delta for out in outs), last.finished, last.finish_reason,
                         last.completion)
