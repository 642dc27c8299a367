"""The embedded API of an Engine (generate, stream, chat, subscribe) and who may drive it.

The calls here are thin: they go through the engine's own LocalClient and DriverLoop (the
serving room, imported on first use), so the embedded engine and a served one share one code path.
Until a loop starts, the low-level API belongs to whichever single thread calls it.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

from ..scheduling.request import Completion
from ..telemetry.events import StepEvent


class EmbeddedAPI:
    """Mixed into Engine; uses its `prompts`, `_events`, `_owner`, `_loop`, `_loop_lock`, `device`."""

    def client(self, user: str = "default"):
        """A thread- and asyncio-safe `LocalClient` acting as `user`. Its first request starts the
        engine's driver loop (a daemon thread that owns the engine until `close()`)."""
        from ..serving.client import LocalClient  # serving sits above the engine: imported on first use

        self._check_open()
        return LocalClient(self, user=user)

    def driver(self):
        """The engine's DriverLoop, started on first use (or the one made with `DriverLoop(engine, ...)`)."""
        with self._loop_lock:
            self._check_open()
            if self._loop is None:
                from ..serving.driver import DriverLoop

                DriverLoop(self)  # adopts itself as self._loop
            return self._loop

    def generate(self, prompts: str | Sequence[str] | None = None, sampling=None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None, user: str = "default",
                 priority: int = 0, progress: bool | None = None) -> list[Completion]:
        """Run many prompts together through continuous batching; results in input order.
        `sampling`: a SamplingParams (or dict of its fields), or one per prompt."""
        done = self.client(user).generate(prompts, sampling, prompt_token_ids=prompt_token_ids,
                                          priority=priority, progress=progress)
        self._events.flush()  # callbacks have seen every step of these requests
        return done

    def stream(self, prompt: str | None = None, sampling=None, *, prompt_token_ids: Sequence[int] | None = None,
               messages: list[dict] | None = None, user: str = "default", priority: int = 0):
        """A TextStream of text deltas as tokens are produced; leaving a loop over it early aborts the request."""
        return self.client(user).stream(prompt, sampling, prompt_token_ids=prompt_token_ids, messages=messages,
                                        priority=priority)

    def chat(self, messages: list[dict], sampling=None, *, user: str = "default") -> Completion:
        """One assistant reply to `messages`, formatted with the tokenizer's chat template."""
        return self.client(user).chat(messages, sampling)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.prompts.chat_ids(messages)

    def subscribe(self, callback: Callable[[StepEvent], None], *, pages: bool = False,
                  maxsize: int = 4096, max_rate: float | None = None) -> Callable[[], None]:
        """Call `callback` with every StepEvent, on a delivery thread of its own (never the step's);
        returns a function that unsubscribes. A callback more than `maxsize` events behind loses
        the oldest. `pages=True` adds the owner of every KV page (int32 array). `max_rate` (events
        a second, for a callback that only draws): the newest step with every skipped step's decisions."""
        return self._events.subscribe_callback(callback, pages=pages, maxsize=maxsize, max_rate=max_rate).close

    # ---- who drives the engine -------------------------------------------------------------
    def _on_foreign_thread(self) -> bool:
        """A driver loop owns the engine and this is not its thread."""
        return self._owner is not None and threading.get_ident() != self._owner

    def _check_caller(self, what: str) -> None:
        self._check_open()
        if self._on_foreign_thread():
            raise RuntimeError(
                f"Engine.{what}() was called from a thread that does not own the engine: its driver loop "
                "runs it now (started by generate/stream/chat/client). Use the thread-safe client instead: "
                "engine.client(user=...).generate / stream / abort, or engine.generate / engine.stream")

    def _own(self, thread_id: int | None) -> None:
        """The driver loop takes the engine (its thread id, called on that thread) or gives it back (None)."""
        if thread_id is not None and self.device.type == "cuda":
            # Per thread: Triton launches on the current device. A bare "cuda" names no index; the pool's
            # buffers (allocated on the constructing thread's current device) do.
            torch.cuda.set_device(self.pool.req_to_token.device)
        self._owner = thread_id

    def _adopt_loop(self, loop) -> None:
        with self._loop_lock:
            self._check_open()
            if self._loop is not None:
                raise RuntimeError("this Engine already has a driver loop: use engine.driver() or "
                                   "engine.client() instead of making a second one")
            self._loop = loop

    def _release_loop(self, loop) -> None:
        with self._loop_lock:
            if self._loop is loop:
                self._loop = None
