"""A step's grammar work on the host: advance each constrained request's matcher past its newest
tokens and fill its row of the batch's bitmask, split over threads that live as long as the engine,
into one host buffer reused every step.

Why not xgrammar's BatchGrammarMatcher with several threads: in 0.2.9 every
batch_fill_next_token_bitmask call starts a new thread pool and joins it (a fixed cost per step,
paid at batch 1 too), and accepting stays serial on the calling thread. Per row, on one core of
the CPU box, the demo tokenizer padded to a 128k vocabulary, inside a JSON string: accepting the
token ~15 us by id, ~1 us by its text (grammar.py says why and when that is exact); filling the row
~8 us in a string with a minLength, ~200 us in a free one (~6 and ~5 us without the padding ids).
xgrammar releases the GIL inside each call, so chunks of rows on Python threads run in parallel.

A chunk is three xgrammar calls whatever its size (accept, "did any refuse?", fill), so it takes
the GIL three times, not twice per row more as xgrammar's accept wrappers would. Its own cost is a
few microseconds, so chunks are small and outnumber the threads: whoever is free takes the next
one, the caller included, so a helper that finds no free core (the scheduler can keep a woken
thread off the CPU for a whole slice, ~4 ms on a 16-core host) delays nothing but leaves its
chunks to the others.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

ROWS_PER_CHUNK = 8  # ~0.08 ms of xgrammar work in a minLength string; a chunk's own cost is ~3 us


class MaskFiller:
    """Advances matchers and fills bitmask rows, on up to `max_threads` threads (the caller's included)."""

    def __init__(self, max_threads: int, rows_per_chunk: int = ROWS_PER_CHUNK):
        import xgrammar as xgr
        from xgrammar.base import _core  # the binding xgrammar's wrappers call (see _chunk)

        self.max_threads = max_threads
        self.rows_per_chunk = rows_per_chunk
        self._accept_ids = _core.BatchGrammarMatcher.batch_accept_token
        self._accept_texts = _core.BatchGrammarMatcher.batch_accept_string
        self._serial = xgr.BatchGrammarMatcher(1)  # one thread: xgrammar loops on the calling thread
        self._helpers: concurrent.futures.ThreadPoolExecutor | None = None  # started for the first big batch

    def chunks_for(self, rows: int) -> list[range]:
        if self.max_threads == 1:
            return [range(rows)]  # one thread: one chunk, the fewest calls
        return [range(a, min(a + self.rows_per_chunk, rows)) for a in range(0, rows, self.rows_per_chunk)]

    def run(self, matchers: Sequence, tokens: Sequence[Sequence[int | bytes]], bitmask: torch.Tensor,
            rows: Sequence[int]) -> list[int]:
        """Matcher i accepts tokens[i] (each an id, or a text where that gives the same state: see
        grammar.py), then fills bitmask row rows[i]. Returns the indices i whose matcher refused one
        of its tokens (their rows are left as they were)."""
        chunks = self.chunks_for(len(matchers))
        threads = min(self.max_threads, len(chunks))
        if threads == 1:
            return [i for chunk in chunks for i in self._chunk(matchers, tokens, bitmask, rows, chunk)]
        if self._helpers is None:
            self._helpers = concurrent.futures.ThreadPoolExecutor(self.max_threads - 1,
                                                                  thread_name_prefix="grammar-mask")
        free = queue.SimpleQueue()
        for c in range(len(chunks)):
            free.put(c)
        results: list = [None] * len(chunks)
        done = [threading.Event() for _ in chunks]

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
        # Every chunk first, even after a failure: a helper still filling would write into the
        # shared host bitmask after we returned, into rows of the next step's mask.
        for event in done:
            event.wait()  # only chunks a helper is running are not done by now
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            raise failed[0]
        return [i for refused in results for i in refused]

    def _chunk(self, matchers, tokens, bitmask, rows, chunk: range) -> list[int]:
        refused: set[int] = set()
        # A matcher normally has one new token per step (none before its first); accept the k-th
        # tokens of every matcher that has one in one call per kind (ids, texts), then ask the
        # result (an FFI array) once whether any refused instead of reading it row by row.
        for k in range(max((len(tokens[i]) for i in chunk), default=0)):
            batch = [i for i in chunk if len(tokens[i]) > k and i not in refused]
            by_id = [i for i in batch if isinstance(tokens[i][k], int)]
            by_text = [i for i in batch if not isinstance(tokens[i][k], int)]
            for accept, taking in ((self._accept_ids, by_id), (self._accept_texts, by_text)):
                if taking:
                    accepted = accept([matchers[i]._handle for i in taking], [tokens[i][k] for i in taking], False)
                    if 0 in accepted:  # a bug, reported by the caller
                        refused.update(i for i, ok in zip(taking, accepted) if not ok)
        filling = [i for i in chunk if i not in refused]
        if filling:
            self._serial.batch_fill_next_token_bitmask([matchers[i] for i in filling], bitmask,
                                                       [rows[i] for i in filling])
        return sorted(refused)

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)


class BitmaskBuffer:
    """The host side of each step's mask: a flag per row (1: constrained) followed by the rows'
    bitmask, in one buffer reused every step, pinned on CUDA so that its upload (one copy for both)
    does not wait for the forward. Only constrained rows' bits are ever read: the others are left
    as they were.

    Not a fresh torch.full per step: from 32k words up (a batch of 8 rows at a 128k vocabulary)
    torch fills in parallel on its OpenMP threads, which wakes all of them (16 on the H200 host) and
    leaves them spinning on the cores the mask threads need; on this 2-core box that fill alone
    took 17 ms for 32 rows.
    """

    def __init__(self, words: int, pinned: bool):
        self.words = words
        self.pinned = pinned
        self._host = torch.empty(0, dtype=torch.int32)
        self._read: torch.cuda.Event | None = None  # recorded behind the latest upload
        self._stream: torch.cuda.Stream | None = None  # the uploads' own (CUDA only)

    def rows(self, batch: int, filled: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(whole, flags [batch], bitmask [batch, words]): views of one region, `whole`; flags set
        for the `filled` rows, which the caller fills in the bitmask."""
        if self._read is not None:
            self._read.synchronize()  # the previous upload has read the buffer (long done, normally)
        size = batch * (self.words + 1)
        if size > len(self._host):
            self._host = torch.empty(max(size, 2 * len(self._host)), dtype=torch.int32, pin_memory=self.pinned)
        whole = self._host[:size]
        flags = whole[:batch]
        flags_np = flags.numpy()
        flags_np[:] = 0
        flags_np[list(filled)] = 1
        return whole, flags, whole[batch:].view(batch, self.words)

    def upload(self, whole: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`whole` on the CUDA device, for work queued from now on the current stream. The copy runs
        on a stream of its own, beside the forward already queued (up to 2 MB at batch 128 and a
        128k vocabulary: tens of microseconds on the copy engine instead of in the step)."""
        if self._read is None:
            self._read = torch.cuda.Event()
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            on_device = whole.to(device, non_blocking=True)
            self._read.record(self._stream)
        computing = torch.cuda.current_stream(device)
        computing.wait_event(self._read)
        on_device.record_stream(computing)  # its memory is not reused before the mask kernel has run
        return on_device
