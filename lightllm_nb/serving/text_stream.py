"""A request's text as it is produced, for a thread (`for delta in stream`) or asyncio
(`async for delta in stream`).

What aborts the request (and frees its KV): leaving a `for` or `async for` loop over the stream
before its end (break, return, an exception), cancelling the task that reads it, `close()` /
`abort()`, the end of a `with` / `async with` block, or the stream being garbage-collected unread.
Each loop gets an iterator of its own (a generator), which a loop left early drops at once: that
is how leaving is seen, even while the stream itself is still held in a variable. To read one
delta, keep the iterator (`deltas = iter(stream); next(deltas)`): `next(iter(stream))` drops it.
"""

from __future__ import annotations

from ..scheduling.request import Completion
from .request_handle import RequestHandle


class TextStream:
    def __init__(self, handle: RequestHandle):
        self._handle = handle
        self._aborted = False  # by this stream, when a loop over it was left early (or close())

    @property
    def request_id(self) -> str:
        return self._handle.request_id

    @property
    def completion(self) -> Completion | None:
        """The whole result, set once the request has finished."""
        return self._handle.completion

    def abort(self) -> bool:
        """Stop the request; False if it ended on its own. True too when a loop left early has just
        aborted it (an interrupted `for` loop, then abort(): the abort may already be through)."""
        return self._handle.abort() or self._aborted

    def close(self) -> None:
        """Stop reading; aborts the request if it is still running."""
        if not self._handle.finished and self._handle.abort():
            self._aborted = True

    def __iter__(self):
        try:
            for out in self._handle:
                if out.text_delta:
                    yield out.text_delta
        finally:  # also when the loop is left early: its generator is closed as it is dropped
            self.close()

    async def __aiter__(self):
        try:
            async for out in self._handle:
                if out.text_delta:
                    yield out.text_delta
        finally:  # a loop left early (asyncio closes the generator) or a cancelled reading task
            self.close()

    async def aclose(self) -> None:
        self.close()

    def __await__(self):
        """`await client.astream(...)` gives the stream itself (its request is already submitted)."""
        return _ready(self).__await__()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "TextStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A stream dropped without being read to its end by a loop: the request stops too.
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.finished:
            try:
                handle.abort()
            except Exception:  # interpreter shutdown: nothing left to free
                pass


async def _ready(stream: TextStream) -> TextStream:
    return stream
