"""A step's grammar work on the host: advance each constrained request's matcher past its newest
tokens and fill its row of the batch's bitmask, on threads that live as long as the engine, into
one host buffer reused every step.

The work is started (`MaskFiller.start`) and collected later (`FillJob.wait`): the engine starts it
as soon as the previous step's tokens are on the host and collects it only when it must queue the
sampling, so the step thread's own work (token handling, the next schedule, the next inputs) runs
beside it instead of before or after it.

Why not xgrammar's BatchGrammarMatcher with several threads: in 0.2.9 every
batch_fill_next_token_bitmask call starts a new thread pool and joins it (a fixed cost per step,
paid at batch 1 too), and accepting tokens stays serial on the calling thread although it costs
more than a fill (here ~10-25 us a token inside a JSON string against ~7-18 us a row). xgrammar
releases the GIL inside each call, so chunks of rows on Python threads run in parallel; a chunk is
one accept call and one fill call, whatever its size. Handing a chunk over costs tens of
microseconds, so a thread gets at least ROWS_PER_THREAD rows.

Whoever waits never waits for a helper that has not started: chunks are taken from a shared queue,
and `wait` takes the ones still there, so a helper that finds no free core (the scheduler can keep
a woken thread off the CPU for a whole slice, ~4 ms on a 16-core host) leaves its chunk to others.

The GIL: a helper needs it to start its chunk, and the thread that started the job goes on with
pure Python (token handling, scheduling), which hands the GIL over only when it blocks or after
the 5 ms switch interval. So `start` blocks, up to START_WAIT_S, until every chunk has been taken:
the helpers are then inside xgrammar's accept call, without the GIL, while the starter works.
Between accept and fill they need it again: `breathe` (the engine calls it before scheduling the
next step) releases it for GIL_BREATHER_S when the job is not done.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

ROWS_PER_THREAD = 16
START_WAIT_S = 0.0002  # past this, a helper kept off the CPU leaves its chunk to `wait`
GIL_BREATHER_S = 0.0001  # long enough for a woken waiter to take the GIL (tens of microseconds)


class MaskFiller:
    """Advances matchers and fills bitmask rows, in up to `max_threads` chunks on helper threads."""

    def __init__(self, max_threads: int):
        import xgrammar as xgr

        self.max_threads = max_threads
        self._xgr = xgr
        self._serial = xgr.BatchGrammarMatcher(1)  # one thread: xgrammar loops on the calling thread
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None  # started with the first job

    def threads_for(self, rows: int) -> int:
        return max(1, min(self.max_threads, rows // ROWS_PER_THREAD))

    def start(self, matchers: Sequence, tokens: Sequence[Sequence[int]], bitmask: torch.Tensor,
              rows: Sequence[int], fill: Sequence[bool] | None = None) -> FillJob:
        """Matcher i accepts tokens[i], then fills bitmask row rows[i] (unless fill[i] is False: a
        matcher that has accepted a stop token has no next token), on the helper threads. Nothing
        may touch these matchers or rows until the job's `wait` has returned."""
        if self._helpers is None:
            # As many helpers as chunks: the thread that starts a job goes on with other work.
            self._helpers = concurrent.futures.ThreadPoolExecutor(self.max_threads, thread_name_prefix="grammar-mask")
        fill = [True] * len(matchers) if fill is None else fill
        threads = self.threads_for(len(matchers))
        bounds = [len(matchers) * t // threads for t in range(threads + 1)]
        chunks = [range(bounds[t], bounds[t + 1]) for t in range(threads)]
        job = FillJob(lambda chunk: self._chunk(matchers, tokens, bitmask, rows, fill, chunk), chunks)
        for _ in chunks:
            self._helpers.submit(job.work)
        job.taken.wait(START_WAIT_S)  # releases the GIL to the helpers (see the module's docstring)
        return job

    def run(self, matchers: Sequence, tokens: Sequence[Sequence[int]], bitmask: torch.Tensor,
            rows: Sequence[int]) -> list[int]:
        """`start` and `wait`: the indices i whose matcher refused one of its tokens (their rows are
        left as they were)."""
        return self.start(matchers, tokens, bitmask, rows).wait()

    def _chunk(self, matchers, tokens, bitmask, rows, fill, chunk: range) -> list[int]:
        refused = []
        # A matcher normally has one new token per step (none before its first); accept the k-th
        # tokens of every matcher that has one in one call.
        for k in range(max((len(tokens[i]) for i in chunk), default=0)):
            batch = [i for i in chunk if len(tokens[i]) > k and i not in refused]
            accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(
                [matchers[i] for i in batch], [tokens[i][k] for i in batch])
            refused += [i for i, ok in zip(batch, accepted) if not ok]
        filling = [i for i in chunk if fill[i] and i not in refused]
        if filling:
            self._serial.batch_fill_next_token_bitmask([matchers[i] for i in filling], bitmask,
                                                       [rows[i] for i in filling])
        return refused

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)


class FillJob:
    """One step's chunks, taken from a shared queue by the helpers and by whoever waits."""

    def __init__(self, run_chunk, chunks: list[range]):
        self._run_chunk = run_chunk
        self._chunks = chunks
        self._free = queue.SimpleQueue()
        for c in range(len(chunks)):
            self._free.put(c)
        self._results: list = [None] * len(chunks)
        self._done = [threading.Event() for _ in chunks]
        self.taken = threading.Event()  # set when every chunk has been taken by someone

    def work(self) -> None:
        while True:
            try:
                c = self._free.get_nowait()
            except queue.Empty:
                return
            if self._free.empty():
                self.taken.set()
            try:
                self._results[c] = self._run_chunk(self._chunks[c])
            except BaseException as err:  # raised on the waiting thread
                self._results[c] = err
            finally:
                self._done[c].set()

    def breathe(self) -> None:
        """Let helpers waiting for the GIL (done accepting, about to fill) take it, if any may be."""
        if not all(done.is_set() for done in self._done):
            time.sleep(GIL_BREATHER_S)

    def wait(self) -> list[int]:
        """Every chunk done (the ones no helper has started, here); the indices of matchers that
        refused a token. A chunk's error is raised here."""
        self.work()
        refused = []
        for c, done in enumerate(self._done):
            done.wait()  # only chunks a helper is running are not done by now
            if isinstance(self._results[c], BaseException):
                raise self._results[c]
            refused += self._results[c]
        return refused


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
