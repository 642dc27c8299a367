"""Continuous batching: each step runs every running request's next tokens plus the prefill the
token budget and the admission policy allow; when memory runs short, the newest request is
preempted (its cache freed, recomputed later) instead of failing the step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .admission import AdmissionPolicy, PoolView
from .decisions import Decision
from .kv_pool import KVPool
from .request import Request, Status


@dataclass
class ScheduledBatch:
    """This step's work: (request, number of its tokens to compute), decodes first."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, pool: KVPool, policy: AdmissionPolicy, *, max_batch_tokens: int, max_running: int):
        if max_batch_tokens < max_running:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= max_running={max_running}: "
                             "every running request needs room for its next token each step")
        self.pool = pool
        self.policy = policy
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ---- queue -----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pool_view(self) -> PoolView:
        return PoolView(capacity=self.pool.capacity, free=self.pool.free_tokens, page_size=self.pool.page_size)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batch_tokens
        in_batch: set[int] = set()
        # Decodes before prefill chunks: a waiting prompt never stalls tokens already streaming.
        for req in sorted(self.running, key=lambda r: r.num_uncomputed != 1):
            if req.status is not Status.RUNNING or budget == 0:
                continue
            n = min(req.num_uncomputed, budget)
            if self._grow_or_preempt(req, req.num_computed + n, batch, in_batch):
                batch.items.append((req, n))
                in_batch.add(id(req))
                budget -= n
        self._admit_waiting(batch, budget)
        batch.items.sort(key=lambda item: item[1] != 1)
        return batch

    def _grow_or_preempt(self, req: Request, length: int, batch: ScheduledBatch, in_batch: set[int]) -> bool:
        """Make room for `req` to hold `length` tokens, preempting the newest other requests
        (never one already in this step's batch). False if `req` itself had to go."""
        while not self._grow(req, length):
            victims = [r for r in self.running if id(r) not in in_batch and r is not req]
            victim = victims[-1] if victims else req
            self.preempt(victim, batch.decisions, needed_by=req)
            if victim is req:
                return False
        return True

    def _grow(self, req: Request, length: int) -> bool:
        need = self.pool.pages_for(length) - len(req.pages)
        if need <= 0:
            return True
        pages = self.pool.alloc_pages(need, owner=req.row)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            verdict = self.policy.check(req, self.running, self.pool_view())
            if not verdict.admit:
                batch.decisions.append(Decision("defer", req.request_id, verdict.reason, verdict.numbers, req.user))
                return
            row = self.pool.alloc_row()
            if row is None:
                return
            req.row = row
            n = min(req.num_uncomputed, budget)
            if not self._grow(req, req.num_computed + n):
                self._release(req)
                batch.decisions.append(Decision(
                    "defer", req.request_id, f"{n} tokens do not fit in {self.pool.free_tokens} free slots",
                    {"need": n, "free": self.pool.free_tokens}, req.user))
                return
            self.waiting.popleft()
            kind = "resume" if req.num_preemptions else "admit"
            req.status = Status.RUNNING
            req.admit_time = req.admit_time or time.perf_counter()
            self.running.append(req)
            batch.items.append((req, n))
            batch.decisions.append(Decision(kind, req.request_id, verdict.reason, verdict.numbers, req.user))
            budget -= n

    # ---- leaving the batch -----------------------------------------------------------------
    def preempt(self, req: Request, decisions: list[Decision], needed_by: Request) -> None:
        freed = len(req.pages) * self.pool.page_size
        self._release(req)
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        reason = ("it cannot grow: the pool is full" if req is needed_by
                  else f"{needed_by.request_id} needs room to grow")
        decisions.append(Decision("preempt", req.request_id, f"KV pool full: {reason}",
                                  {"freed": freed, "free": self.pool.free_tokens}, req.user))

    def finish(self, req: Request, reason: str) -> Decision:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.policy.record_finished(req)
        return Decision("finish", req.request_id, reason,
                        {"output_tokens": req.num_output, "free": self.pool.free_tokens}, req.user)

    def _release(self, req: Request) -> None:
        self.pool.free_pages(req.pages)
        req.pages = []
        if req.row is not None:
            self.pool.free_row(req.row)
            req.row = None
