"""A request's text as it is produced, for a thread (`for delta in stream`) or asyncio
(`async for delta in stream`). Leaving early, closing it or cancelling the reading task aborts
the request, so an abandoned stream never holds KV slots."""

from __future__ import annotations

import asyncio

from ..scheduling.request import Completion
from .request_handle import RequestHandle


class TextStream:
    def __init__(self, handle: RequestHandle):
        self._handle = handle

    @property
    def request_id(self) -> str:
        return self._handle.request_id

    @property
    def completion(self) -> Completion | None:
        """The whole result, set once the request has finished."""
        return self._handle.completion

    def abort(self) -> bool:
        return self._handle.abort()

    def close(self) -> None:
        """Stop reading; aborts the request if it is still running."""
        if not self._handle.finished:
            self._handle.abort()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        for out in self._handle:
            if out.text_delta:
                return out.text_delta
        raise StopIteration

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        try:
            async for out in self._handle:
                if out.text_delta:
                    return out.text_delta
        except asyncio.CancelledError:
            self.close()
            raise
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A loop left early (`break`) drops the last reference here: the request stops too.
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.finished:
            try:
                handle.abort()
            except Exception:  # interpreter shutdown: nothing left to free
                pass
