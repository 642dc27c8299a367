"""A step's grammar work on the host: advance each constrained request's matcher past its newest
tokens and fill its row of the batch's bitmask, with xgrammar's batch calls, into one host buffer
reused every step.

Per row, inside a JSON string, on one core of the H200 host at the tokenizer's width: accepting a
token's text ~3 us (by id ~36 us where a padded vocabulary made 79k ids special: grammar.py says
why text is exact), filling its row ~12-20 us. Accepting is one batch call per token position, on
the step thread (it holds the GIL: two threads accept no faster than one).
Filling lets go of the GIL, so rows are filled in chunks at once: the step thread fills one chunk
and threads of our own, started once and kept, fill the others. xgrammar 0.2.9's own
BatchGrammarMatcher starts and joins its threads on every call. On the H200 host (16 torch threads,
bench/structured.py, 2026-12-03) both fill 128 rows in about the same wall time (grammar host side
1.39-1.49 ms ours, 1.38-1.56 theirs, in constrained 128-row GPU steps); on a 2-core box ours was ~25%
faster (1.12-1.55 against 1.57-1.80 ms). More threads help less than their count: on the H200 host
128 rows took 1.52 ms on one thread, 0.96-1.06 on four or eight.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Sequence

import torch

ROWS_PER_THREAD = 32  # fewer: on the H200 host two threads filled 32 rows slower than one (0.44-0.54 ms against 0.33-0.36)


class MaskFiller:
    """Advances matchers and fills bitmask rows: the filling on up to `max_threads` threads (the
    caller's and kept workers), one chunk of rows each."""

    def __init__(self, max_threads: int, rows_per_thread: int = ROWS_PER_THREAD):
        from xgrammar.base import _core  # the binding xgrammar's wrappers call: no list copies of handles

        self.max_threads = max_threads
        self.rows_per_thread = rows_per_thread
        self._accept_ids = _core.BatchGrammarMatcher.batch_accept_token
        self._accept_texts = _core.BatchGrammarMatcher.batch_accept_string
        self._fill_here = _core.BatchGrammarMatcher(1).batch_fill_next_token_bitmask
        self._workers: list[FillWorker] = []  # started as batches first need them
        self._finished: queue.SimpleQueue = queue.SimpleQueue()  # each worker's chunk: None, or its error
        # Dropped without close() (an engine collected unclosed), its workers stop all the same. Not
        # at interpreter exit: this finalizer, made after its engine's, would run first, stopping
        # workers under a step still filling (a chunk given to a stopped worker is waited for
        # forever); the engine's own close stops them once its loop has stopped.
        self._stop_workers = weakref.finalize(self, stop_workers, self._workers)
        self._stop_workers.atexit = False

    def threads_for(self, rows: int) -> int:
        return max(1, min(self.max_threads, rows // self.rows_per_thread))

    def run(self, matchers: Sequence, tokens: Sequence[Sequence[int | bytes]], bitmask: torch.Tensor,
            rows: Sequence[int]) -> list[int]:
        """Matcher i accepts tokens[i] (each an id, or a text where that gives the same state: see
        grammar.py), then fills bitmask row rows[i]. Returns the indices i whose matcher refused one
        of its tokens (their rows are left as they were)."""
        refused: set[int] = set()
        # A matcher normally has one new token per step (none before its first); accept the k-th
        # tokens of every matcher that has one in one call per kind (ids, texts), then ask the
        # result (an FFI array) once whether any refused instead of reading it row by row.
        for k in range(max((len(t) for t in tokens), default=0)):
            batch = [i for i in range(len(matchers)) if len(tokens[i]) > k and i not in refused]
            by_id = [i for i in batch if isinstance(tokens[i][k], int)]
            by_text = [i for i in batch if not isinstance(tokens[i][k], int)]
            for accept, taking in ((self._accept_ids, by_id), (self._accept_texts, by_text)):
                if taking:
                    accepted = accept([matchers[i]._handle for i in taking], [tokens[i][k] for i in taking], False)
                    if 0 in accepted:  # a bug, reported by the caller
                        refused.update(i for i, ok in zip(taking, accepted) if not ok)
        filling = [i for i in range(len(matchers)) if i not in refused]
        if filling:
            self._fill([matchers[i]._handle for i in filling], bitmask, [rows[i] for i in filling])
        return sorted(refused)

    def _fill(self, handles: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        chunks = self.threads_for(len(rows))
        bounds = [len(rows) * c // chunks for c in range(chunks + 1)]
        while len(self._workers) < chunks - 1:
            self._workers.append(FillWorker(self._finished))
        for worker, c in zip(self._workers, range(1, chunks)):
            worker.give(handles[bounds[c]:bounds[c + 1]], bitmask, rows[bounds[c]:bounds[c + 1]])
        errors = []
        try:
            self._fill_here(handles[:bounds[1]], bitmask, rows[:bounds[1]], False)
        finally:  # every worker's chunk is waited for: none may write into the buffer after we return
            for _ in range(chunks - 1):
                if (error := self._finished.get()) is not None:
                    errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        self._stop_workers()


def stop_workers(workers: list[FillWorker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class FillWorker:
    """A kept thread that fills the bitmask rows of the chunks it is given, one at a time, and says
    on `finished` when each is done (None, or the exception it raised)."""

    def __init__(self, finished: queue.SimpleQueue):
        from xgrammar.base import _core

        self._fill = _core.BatchGrammarMatcher(1).batch_fill_next_token_bitmask
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = finished
        self._thread = threading.Thread(target=self._serve, name="grammar-mask-fill", daemon=True)
        self._thread.start()

    def give(self, handles: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        self._chunks.put((handles, bitmask, rows))

    def stop(self) -> None:
        self._chunks.put(None)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            try:
                self._fill(*chunk, False)
                self._finished.put(None)
            except Exception as err:  # handed to the step thread, which raises it
                self._finished.put(err)


class BitmaskBuffer:
    """The host side of each step's mask: a flag per row (1: constrained) followed by the rows'
    bitmask, in one buffer reused every step, pinned on CUDA so that its upload (one copy for both)
    does not wait for the forward. Only constrained rows' bits are ever read: the others are left
    as they were.

    Not a fresh torch.full per step: from 32k words up (a batch of 8 rows at a 128k vocabulary)
    torch fills in parallel on its OpenMP threads, which wakes all of them (16 on the H200 host) and
    leaves them spinning on the cores xgrammar's fill threads need; on this 2-core box that fill alone
    took 17 ms for 32 rows.
    """

    def __init__(self, words: int, pinned: bool):
        self.words = words
        self.pinned = pinned
        self._host = torch.empty(0, dtype=torch.int32)
        self._device: torch.Tensor | None = None  # where uploads land (CUDA only), reused too
        self._copied: torch.cuda.Event | None = None  # recorded behind the latest upload

    def rows(self, batch: int, filled: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(whole, flags [batch], bitmask [batch, words]): views of one region, `whole`; flags set
        for the `filled` rows, which the caller fills in the bitmask."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous upload has read the buffer (long done, normally)
        head = self.flag_words(batch)
        size = head + batch * self.words
        if size > len(self._host):
            self._host = torch.empty(max(size, 2 * len(self._host)), dtype=torch.int32, pin_memory=self.pinned)
        whole = self._host[:size]
        flags = whole[:batch]
        flags_np = flags.numpy()
        flags_np[:] = 0
        flags_np[list(filled)] = 1
        return whole, flags, whole[head:].view(batch, self.words)

    @staticmethod
    def flag_words(batch: int) -> int:
        """Words the flags take at the region's start: padded to 16 bytes, so that the bitmask after
        them is aligned (the race kernel is compiled for aligned pointers only)."""
        return -(-batch // 4) * 4

    def upload(self, whole: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`whole` on the CUDA device, copied on the current stream behind the forward already
        queued there: a few microseconds for 6 KB a row at a 49k-token vocabulary. (A copy on a
        stream of its own, beside the forward, cost the host more in stream and event calls than it
        saved the GPU.) The device buffer is reused too: the next step's copy is queued behind this
        step's mask kernel."""
        if self._device is None or self._device.numel() < whole.numel():
            self._device = torch.empty(len(self._host), dtype=torch.int32, device=device)
        on_device = self._device[:whole.numel()]
        on_device.copy_(whole, non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device
