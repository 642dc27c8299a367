"""A step's grammar work on the host: advance each constrained request's matcher past its newest
tokens and fill its row of the batch's bitmask, split over threads that live as long as the engine,
into one host buffer reused every step.

Why not xgrammar's BatchGrammarMatcher with several threads: in 0.2.9 every
batch_fill_next_token_bitmask call starts a new thread pool and joins it (a fixed cost per step,
paid at batch 1 too), and accepting tokens stays serial on the calling thread although it costs
more than a fill (here ~25 us a token inside a JSON string against ~12-18 us a row). xgrammar
releases the GIL inside each call, so chunks of rows on Python threads run in parallel; a chunk is
one accept call and one fill call, whatever its size. Handing a chunk over costs tens of
microseconds, so a thread gets at least ROWS_PER_THREAD rows and small batches stay on the caller.

The caller never waits for a helper that has not started: chunks are taken from a shared queue,
and the caller takes them too, so a helper that finds no free core (the scheduler can keep a woken
thread off the CPU for a whole slice, ~4 ms on a 16-core host) leaves its chunk to the others.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

ROWS_PER_THREAD = 16


class MaskFiller:
    """Advances matchers and fills bitmask rows, on up to `max_threads` threads (the caller's included)."""

    def __init__(self, max_threads: int):
        import xgrammar as xgr

        self.max_threads = max_threads
        self._xgr = xgr
        self._serial = xgr.BatchGrammarMatcher(1)  # one thread: xgrammar loops on the calling thread
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None  # started for the first big batch

    def threads_for(self, rows: int) -> int:
        return max(1, min(self.max_threads, rows // ROWS_PER_THREAD))

    def run(self, matchers: Sequence, tokens: Sequence[Sequence[int]], bitmask: torch.Tensor,
            rows: Sequence[int]) -> list[int]:
        """Matcher i accepts tokens[i], then fills bitmask row rows[i]. Returns the indices i whose
        matcher refused one of its tokens (their rows are left as they were)."""
        threads = self.threads_for(len(matchers))
        bounds = [len(matchers) * t // threads for t in range(threads + 1)]
        chunks = [range(bounds[t], bounds[t + 1]) for t in range(threads)]
        if threads == 1:
            return self._chunk(matchers, tokens, bitmask, rows, chunks[0])
        if self._helpers is None:
            self._helpers = concurrent.futures.ThreadPoolExecutor(self.max_threads - 1,
                                                                  thread_name_prefix="grammar-mask")
        free = queue.SimpleQueue()
        for c in range(threads):
            free.put(c)
        results: list = [None] * threads
        done = [threading.Event() for _ in range(threads)]

        def work() -> None:
            while True:
                try:
                    c = free.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[c] = self._chunk(matchers, tokens, bitmask, rows, chunks[c])
                except BaseException as err:  # raised on the caller's thread below
                    results[c] = err
                finally:
                    done[c].set()

        for _ in range(threads - 1):
            self._helpers.submit(work)
        work()
        refused = []
        for c in range(threads):
            done[c].wait()  # only chunks a helper is running are not done by now
            if isinstance(results[c], BaseException):
                raise results[c]
            refused += results[c]
        return refused

    def _chunk(self, matchers, tokens, bitmask, rows, chunk: range) -> list[int]:
        refused = []
        # A matcher normally has one new token per step (none before its first); accept the k-th
        # tokens of every matcher that has one in one call.
        for k in range(max((len(tokens[i]) for i in chunk), default=0)):
            batch = [i for i in chunk if len(tokens[i]) > k and i not in refused]
            accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(
                [matchers[i] for i in batch], [tokens[i][k] for i in batch])
            refused += [i for i, ok in zip(batch, accepted) if not ok]
        filling = [i for i in chunk if i not in refused]
        if filling:
            self._serial.batch_fill_next_token_bitmask([matchers[i] for i in filling], bitmask,
                                                       [rows[i] for i in filling])
        return refused

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)


class BitmaskBuffer:
    """The host side of each step's bitmask: one buffer, reused step after step, pinned on CUDA so
    that its upload does not wait for the forward.

    Not a fresh torch.full per step: from 32k words up (a batch of 8 rows at a 128k vocabulary)
    torch fills in parallel on its OpenMP threads, which wakes all of them (16 on the H200 host) and
    leaves them spinning on the cores the mask threads need; on this 2-core box that fill alone
    took 17 ms for 32 rows. Here numpy resets, on the calling thread, only the rows no grammar fills.
    """

    def __init__(self, words: int, pinned: bool):
        self.words = words
        self.pinned = pinned
        self._host = torch.empty((0, words), dtype=torch.int32)
        self._read: torch.cuda.Event | None = None  # recorded behind the latest upload
        self._stream: torch.cuda.Stream | None = None  # the uploads' own (CUDA only)

    def rows(self, batch: int, filled: Sequence[int]) -> torch.Tensor:
        """A [batch, words] view whose rows other than `filled` allow every token (every bit set);
        the caller fills the `filled` rows."""
        if self._read is not None:
            self._read.synchronize()  # the previous upload has read the buffer (long done, normally)
        if batch > len(self._host):
            self._host = torch.empty((max(batch, 2 * len(self._host)), self.words), dtype=torch.int32,
                                     pin_memory=self.pinned)
        view = self._host[:batch]
        free = np.ones(batch, dtype=bool)
        free[list(filled)] = False
        view.numpy()[free] = -1
        return view

    def upload(self, view: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`view` on the CUDA device, for work queued from now on the current stream. The copy runs
        on a stream of its own, beside the forward already queued (up to 2 MB at batch 128 and a
        128k vocabulary: tens of microseconds on the copy engine instead of in the step)."""
        if self._read is None:
            self._read = torch.cuda.Event()
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            on_device = view.to(device, non_blocking=True)
            self._read.record(self._stream)
        computing = torch.cuda.current_stream(device)
        computing.wait_event(self._read)
        on_device.record_stream(computing)  # its memory is not reused before the mask kernel has run
        return on_device
