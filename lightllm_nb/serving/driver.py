"""The driver loop: one thread owns an Engine and runs its steps; everyone else talks to it
through a thread-safe inbox and reads results from their own sinks.

The loop blocks when there is no work (no idle spin, no empty StepEvents) and wakes on a
command. Commands run between steps, so the engine only ever sees one thread. See
docs/serving.md for the contract.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import sys
import threading
import weakref
from collections import Counter, deque
from concurrent.futures import Future
from typing import Callable

from ..engine.prompt_checks import check_fits, check_user_and_priority, prompt_ids, sampling_params
from ..sampling_params import InvalidRequestError, SamplingParams
from ..scheduling.request import Completion, RequestOutput
from ..telemetry.hub import EventSubscription
from .request_handle import RequestHandle

log = logging.getLogger(__name__)


class DriverLoop:
    def __init__(self, engine, *, max_waiting: int = 4096, max_waiting_per_user: int = 1024):
        for name, value in (("max_waiting", max_waiting), ("max_waiting_per_user", max_waiting_per_user)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_waiting_per_user = max_waiting_per_user
        self._lock = threading.Lock()          # guards the handles, the counters and the inbox
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[tuple[Callable[[], object], Future | None]] = deque()
        self._handles: dict[str, RequestHandle] = {}
        self._waiting = 0                      # submitted requests that have had no output yet
        self._waiting_per_user: Counter[str] = Counter()
        self._stopping = False
        self._stopped = threading.Event()
        engine._adopt_loop(self)
        # The thread holds the loop only weakly while idle: an engine nobody references any more
        # (a notebook cell that made a new one) is collected, and the finalizer wakes the thread to end.
        weakref.finalize(self, _wake_up, self._wake)
        self._thread = threading.Thread(target=_drive, args=(weakref.ref(self), self._wake),
                                        name="lightllm-driver", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            # Let go of the engine here, not only on the dying thread: a caller that retries at once
            # must get a new loop, never this dead one.
            with self._lock:
                self._stopping = True
            engine._release_loop(self)
            raise RuntimeError(f"the driver loop could not take over the engine: {self._start_error}") \
                from self._start_error

    # ---- the caller's side (any thread) ----------------------------------------------------
    def submit(self, prompt_ids_: list[int], sampling: SamplingParams | dict | None = None, *, user: str,
               priority: int = 0, stream_text: bool = True, keep_outputs: bool = True,
               on_finish: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        """Queue a tokenized request; raises InvalidRequestError (bad input, or a waiting limit
        reached) before anything is queued. `keep_outputs=False` keeps only the completion (for
        callers that do not stream); `on_finish(handle)` runs on the loop thread: keep it short."""
        return self.submit_many([(prompt_ids_, sampling)], user=user, priority=priority, stream_text=stream_text,
                                keep_outputs=keep_outputs, on_finish=on_finish)[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams | dict | None]], *, user: str,
                    priority: int = 0, stream_text: bool = True, keep_outputs: bool = True,
                    on_finish: Callable[[RequestHandle], None] | None = None) -> list[RequestHandle]:
        """`submit` for several requests that enter the engine together (the same step), or none of them."""
        check_user_and_priority(user, priority)
        checked = []
        for ids, sampling in requests:
            sampling = sampling_params(sampling)
            ids = prompt_ids(None, self.engine.config.vocab_size, None, ids)
            check_fits(ids, sampling, self.engine.pool.max_context)
            checked.append((ids, sampling))
        # Text is decoded by each reader, off the step thread, unless the engine must watch for stop strings.
        handles = [RequestHandle(self, secrets.token_urlsafe(16), user, len(ids), keep_outputs=keep_outputs,
                                 on_finish=on_finish,
                                 text=self.engine.prompts.text_for(ids) if stream_text and not sampling.stop else None)
                   for ids, sampling in checked]
        n = len(handles)
        with self._lock:
            self._check_running()
            if self._waiting + n > self.max_waiting:
                raise InvalidRequestError(
                    f"the engine has {self._waiting} requests waiting to start and max_waiting={self.max_waiting}: "
                    f"{n} more do not fit; wait for some to finish, then retry")
            if self._waiting_per_user[user] + n > self.max_waiting_per_user:
                raise InvalidRequestError(
                    f"you have {self._waiting_per_user[user]} requests waiting to start and max_waiting_per_user="
                    f"{self.max_waiting_per_user}: {n} more do not fit; wait for some to finish, then retry")
            self._waiting += n
            self._waiting_per_user[user] += n
            for handle in handles:
                self._handles[handle.request_id] = handle
            self._post(lambda: self._add(handles, checked, priority), None)
        return handles

    def abort(self, request_id: str, *, user: str) -> bool:
        """False for an unknown id and for another user's (the same answer: ids cannot be probed)."""
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is None or handle.user != user or self._stopping:
                return False
            self._post(lambda: self.engine.abort(request_id), None)
        return True

    def subscribe(self, *, user: str | None = None, pages: bool = False, maxsize: int = 256,
                  max_rate: float | None = None) -> EventSubscription:
        """StepEvents through a bounded queue filled off the step thread; `user=None` sees everything,
        otherwise each event is redacted for `user`. `max_rate` (events a second) is for a reader
        that only draws: the newest step, with every skipped step's decisions."""
        return self.engine._events.subscribe(user=user, pages=pages, maxsize=maxsize, max_rate=max_rate)

    def stats(self, *, user: str | None = None, timeout: float = 30.0) -> dict:
        """The engine's stats, plus the user's own running and waiting requests when `user` is given."""
        return self.call(lambda: self._stats(user)).result(timeout)

    def clear_prefix_cache(self, timeout: float = 30.0) -> int:
        """Tokens freed."""
        return self.call(self.engine.clear_prefix_cache).result(timeout)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the loop thread between steps; its result (or error) comes in the Future."""
        future: Future = Future()
        if threading.current_thread() is self._thread:
            future.set_result(fn())
            return future
        with self._lock:
            self._check_running()
            self._post(fn, future)
        return future

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish every request with reason "abort", free all KV (prefix cache too), join the thread."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return not self._stopped.is_set()

    # ---- what the HTTP front end awaits (RemoteDriver has the same, across a process boundary) ----
    async def asubmit(self, prompt_ids_: list[int], sampling: SamplingParams, *, user: str, priority: int = 0,
                      stream_text: bool = True, keep_outputs: bool = True) -> RequestHandle:
        return self.submit(prompt_ids_, sampling, user=user, priority=priority, stream_text=stream_text,
                           keep_outputs=keep_outputs)

    async def aabort(self, request_id: str, *, user: str) -> bool:
        return self.abort(request_id, user=user)

    async def astats(self, *, user: str | None = None) -> dict:
        return await asyncio.wrap_future(self.call(lambda: self._stats(user)))

    async def ashutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # ---- the loop thread ---------------------------------------------------------------------
    def _begin(self) -> None:
        _name_os_thread(self._thread.name)
        self.engine._own(threading.get_ident())
        self._started.set()

    def _has_work(self) -> bool:
        """With the lock held."""
        return bool(self._inbox) or self._stopping or self.engine.has_unfinished()

    def _serve_once(self) -> bool:
        """Run the queued commands, then a step if there is work; False once shutting down."""
        with self._lock:
            if self._stopping:
                return False
            commands, self._inbox = self._inbox, deque()
        for fn, future in commands:
            self._run_command(fn, future)
        if self.engine.has_unfinished():
            self._step()
        return True

    def _end(self) -> None:
        self._finish_everything()
        self.engine._own(None)
        self.engine._release_loop(self)
        self._stopped.set()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()  # a failing batch comes back finished with "error"
        except Exception:
            # Beyond what the engine recovers from itself: end everything rather than hang callers.
            log.exception("the engine failed outside a step's batch; every request is aborted")
            outputs = self.engine.abort_all()
        self._deliver(outputs)

    def _run_command(self, fn: Callable[[], object], future: Future | None) -> None:
        try:
            result = fn()
        except BaseException as err:  # the caller gets it; the loop goes on
            if future is None:
                log.exception("a driver-loop command failed")
            else:
                future.set_exception(err)
        else:
            if future is not None:
                future.set_result(result)

    def _add(self, handles: list[RequestHandle], requests: list[tuple[list[int], SamplingParams]],
             priority: int) -> None:
        for handle, (ids, sampling) in zip(handles, requests):
            if handle.finished:
                continue
            try:
                # The engine decodes text only where it must: for stop strings (then it sends the deltas).
                self.engine.add_prepared(ids, sampling, user=handle.user, priority=priority,
                                         request_id=handle.request_id, stream_text=False)
            except Exception as err:
                self._deliver([_ended(handle, "error", f"the request could not be queued: {err}")])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their handles in one go, then wake each asyncio reader's event
        loop once (outputs of requests added through the low-level API before the loop started have
        no handle and are dropped)."""
        delivered = []
        with self._lock:
            for out in outputs:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                delivered.append((handle, out))
                if not handle.started:
                    handle.started = True
                    self._waiting -= 1
                    self._waiting_per_user[handle.user] -= 1
                    if not self._waiting_per_user[handle.user]:
                        del self._waiting_per_user[handle.user]
                if out.finished:
                    del self._handles[out.request_id]
        readers: dict[tuple, list[RequestHandle]] = {}
        for handle, out in delivered:
            handle._deliver(out)
            if handle.reader is not None:
                readers.setdefault(handle.reader, []).append(handle)
        # One wake-up per event loop per step (not one per output): a tornado IOLoop serving 256
        # streams resumes them all from a single callback.
        for (event_loop, waker), handles in readers.items():
            try:
                event_loop.call_soon_threadsafe(waker, handles)
            except RuntimeError:  # that event loop is closed: nobody reads there any more
                pass

    def _stats(self, user: str | None) -> dict:
        stats = {**self.engine.stats(), "max_waiting": self.max_waiting,
                 "max_waiting_per_user": self.max_waiting_per_user,
                 "event_subscriptions": len(self.engine._events)}  # each costs the step; see issue 8
        if user is not None:
            with self._lock:
                mine = [h for h in self._handles.values() if h.user == user]
            stats["user"] = {"name": user, "running": sum(h.started for h in mine),
                             "waiting": sum(not h.started for h in mine)}
        return stats

    def _finish_everything(self) -> None:
        try:
            self._deliver(self.engine.abort_all())
            self.engine.clear_prefix_cache()
        except Exception:
            log.exception("shutting the driver loop down: the engine failed to release its requests")
        with self._lock:
            commands, self._inbox = self._inbox, deque()
            left = list(self._handles.values())
        for _, future in commands:
            if future is not None:
                future.set_exception(RuntimeError("the driver loop shut down before running this command"))
        self._deliver([_ended(h, "abort", None) for h in left])  # queued but never added

    # ---- internals -----------------------------------------------------------------------------
    def _post(self, fn: Callable[[], object], future: Future | None) -> None:
        """With the lock held: queue a command and wake the loop."""
        self._inbox.append((fn, future))
        self._wake.notify()

    def _check_running(self) -> None:
        if self._stopping:
            raise RuntimeError("this driver loop is shut down (its engine was closed): create a new Engine")


def _ended(handle: RequestHandle, reason: str, error: str | None) -> RequestOutput:
    """The last output of a request that ended before the engine produced anything for it."""
    completion = Completion(handle.request_id, "", [], reason, handle.prompt_tokens, {}, None, error)
    return RequestOutput(handle.request_id, [], "", True, reason, completion)


def _drive(ref: weakref.ref, wake: threading.Condition) -> None:
    """The loop thread: commands and steps while there is work, asleep on `wake` otherwise, with no
    strong reference to the DriverLoop while asleep (see DriverLoop.__init__)."""
    try:
        ref()._begin()
    except BaseException as err:  # the constructor must hear why, not wait on the loop forever
        loop = ref()
        loop._start_error = err  # it never took the engine and holds no request: nothing to finish
        loop._stopped.set()
        loop._started.set()
        return
    while True:
        with wake:
            while True:
                loop = ref()
                if loop is None:
                    return  # collected with its engine: nothing is left to serve
                if loop._has_work():
                    break
                del loop
                wake.wait()
        try:
            going = loop._serve_once()
        except BaseException:
            loop._end()
            raise
        if not going:
            loop._end()
            return
        del loop


def _name_os_thread(name: str) -> None:
    """Give the calling thread its Python name in the OS too (Linux; Python 3.11 does not), so that
    top -H, py-spy and /proc (bench/serving.py's CPU by thread) tell the step thread from the main
    thread and zmq's (threads it starts later, such as OpenMP's workers on a CPU, inherit the name)."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):  # no libc prctl: the name is only cosmetic
        pass


def _wake_up(wake: threading.Condition) -> None:
    with wake:
        wake.notify_all()
