"""The Past-Future admission policy (the idea of LightLLM's ASPLOS'25 scheduler).

Conservative admission reserves every request's max_tokens and leaves most of the KV cache empty;
aggressive admission fills it and then preempts. Past-Future asks instead: if this candidate joins,
how high will KV usage climb *in the future*, before requests finish and hand their tokens back?
The future comes from the past: each request's final output length is sampled from the lengths of
recently finished requests, conditioned on how many tokens it has already produced.

Given each request's tokens held now and its remaining output, every request grows by one token a
step until it finishes, so usage is piecewise linear and peaks just before some request finishes:
with requests sorted by remaining length r_1 <= ... <= r_n,

    peak = max_i ( sum_{j >= i} held_j  +  (n - i + 1) * r_i )

A few sampled futures guard against an unlucky draw: the worst of them must stay under capacity
minus a reserve.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from .admission import PoolView, Verdict
from .request import Request


def future_peak(held: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """Peak total tokens of requests holding `held` tokens now that each grow by one token a step
    for `remaining` more steps and then free everything. Rows of `remaining` are independent
    scenarios: shape (scenarios, n) -> (scenarios,)."""
    remaining = np.atleast_2d(remaining).astype(np.int64)
    if remaining.shape[1] == 0:
        return np.zeros(remaining.shape[0], dtype=np.int64)
    order = np.argsort(remaining, axis=1, kind="stable")
    rem_sorted = np.take_along_axis(remaining, order, axis=1)
    held_sorted = np.asarray(held, dtype=np.int64)[order]
    # Suffix sums: tokens held now by the requests still running when the i-th shortest finishes.
    held_after = np.cumsum(held_sorted[:, ::-1], axis=1)[:, ::-1]
    still_running = np.arange(remaining.shape[1], 0, -1, dtype=np.int64)
    return (held_after + still_running * rem_sorted).max(axis=1)


class PastFuturePolicy:
    """Admit a request only if the sampled future peak of KV usage, with it, fits under the limit.

    Until `min_history` requests have finished there is no past to sample from, and every request
    is assumed to run to its max_tokens (the conservative prior). The default is small on purpose:
    a backlog built while cold outlasts the cold start, and a request longer than every length
    seen still falls back to max_tokens.
    """

    name = "past_future"

    def __init__(self, *, window: int = 1000, samples: int = 4, reserve: float = 0.05,
                 min_history: int = 5, seed: int = 0):
        if window < 1:
            raise ValueError(f"window={window} is invalid: keep at least 1 finished length")
        if samples < 1:
            raise ValueError(f"samples={samples} is invalid: sample at least 1 future")
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve={reserve} is invalid: it is a fraction of capacity in [0, 1)")
        if not 1 <= min_history <= window:
            raise ValueError(f"min_history={min_history} is invalid: it must be in [1, window={window}]")
        self.window = window
        self.samples = samples
        self.reserve = reserve
        self.min_history = min_history
        self._lengths: deque[int] = deque(maxlen=window)
        self._sorted: np.ndarray | None = None   # sorted copy of _lengths, rebuilt when it changes
        self._rng = np.random.default_rng(seed)

    @property
    def history(self) -> list[int]:
        """Output lengths of the most recently finished requests, oldest first."""
        return list(self._lengths)

    def record_finished(self, request: Request) -> None:
        # Aborted requests count too (what a request really held is what the future will hold),
        # but only once admitted: a mass cancel of queued requests would flood the window with 0s.
        if request.admit_time is None:
            return
        self._lengths.append(request.num_output)
        self._sorted = None

    def sample_final_lengths(self, produced: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        """`samples` draws of each request's final output length, shape (samples, n): a past length
        longer than what the request has produced, capped by its max_tokens. A request already
        longer than every past length is assumed to run to max_tokens."""
        produced = np.asarray(produced, dtype=np.int64)
        max_tokens = np.asarray(max_tokens, dtype=np.int64)
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self._lengths, dtype=np.int64, count=len(self._lengths)))
        past = self._sorted
        first_longer = np.searchsorted(past, produced, side="right")
        longer = len(past) - first_longer
        picks = first_longer + (self._rng.random((self.samples, len(produced))) * longer).astype(np.int64)
        drawn = np.where(longer > 0, past[np.minimum(picks, len(past) - 1)], max_tokens)
        return np.maximum(produced, np.minimum(drawn, max_tokens))

    def check(self, candidate: Request, running: Sequence[Request], pool: PoolView) -> Verdict:
        batch = [*running, candidate]
        # Tokens a request holds once its known tokens are computed, plus its last page's rounding.
        held = np.array([len(r.token_ids) + pool.page_size - 1 for r in batch], dtype=np.int64)
        produced = np.array([r.num_output for r in batch], dtype=np.int64)
        max_tokens = np.array([r.sampling.max_tokens for r in batch], dtype=np.int64)
        limit = int(pool.capacity * (1 - self.reserve))
        cold = len(self._lengths) < self.min_history
        final = max_tokens[None, :] if cold else self.sample_final_lengths(produced, max_tokens)
        peak = int(future_peak(held, np.maximum(final - produced, 0)).max())
        numbers = {"peak": peak, "limit": limit, "capacity": pool.capacity, "running": len(running),
                   "history": len(self._lengths), "samples": 1 if cold else self.samples}
        # Alone, a request waits for nothing by being deferred: admit it and let preemption cover a miss.
        fits = peak <= limit or not running
        compare = "<=" if fits else ">"
        bound = f"limit {limit} (capacity {pool.capacity} less {self.reserve:.0%} reserve)"
        if not running and peak > limit:
            reason = f"the batch is empty, so waiting frees nothing: admitted though its peak {peak} > {bound}"
        elif cold:
            reason = (f"cold start: {len(self._lengths)} of {self.min_history} finished lengths seen, so every "
                      f"request is assumed to run to max_tokens: peak {peak} {compare} {bound}")
        else:
            reason = (f"future peak {peak} {compare} {bound}, worst of {self.samples} futures sampled "
                      f"from {len(self._lengths)} past lengths, {len(batch)} requests")
        return Verdict(fits, reason, numbers)
