"""Continuous batching: each step runs every running request's next tokens plus the prefill the
token budget and the admission policy allow.

When memory runs short, unused prefix-cache entries are evicted first (least recently used);
only then is a request preempted. A preempted request's computed tokens go into the prefix cache
before its memory is released, so when it resumes it recomputes only what was evicted meanwhile.

Admission is fair between users (see waiting_queue.py), so one engine can serve a whole JupyterHub.
A request turned down for memory is never overtaken (see waiting_admission.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter

from .admission import AdmissionPolicy, PoolView
from .decisions import Decision
from ..kv.kv_pool import KVPool
from ..kv.cache_scope import CacheScopes
from ..kv.prefix_cache import PrefixCache
from .request import Request, Status
from .progress_guard import ProgressGuard
from .timeline import TimelineRecorder
from .waiting_admission import WaitingAdmission
from .waiting_queue import WaitingQueue

# A waiting request whose next this-many tokens a running prefill is computing right now waits a
# step and takes them from the prefix cache, rather than computing them a second time.
SHARED_PREFILL_PROBE_TOKENS = 32
_PRIORITY = attrgetter("priority")


@dataclass
class ScheduledBatch:
    """This step's work: (request, number of its tokens to compute), decodes first."""

    items: list[tuple[Request, int]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler(WaitingAdmission):
    def __init__(self, pool: KVPool, policy: AdmissionPolicy, *, max_batch_tokens: int, max_running: int,
                 prefix_cache: bool = False, max_running_per_user: int | None = None,
                 cache_scopes: CacheScopes | None = None, timelines: TimelineRecorder | None = None):
        if max_batch_tokens < max_running:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= max_running={max_running}: "
                             "every running request needs room for its next token each step")
        if max_running_per_user is not None and max_running_per_user < 1:
            raise ValueError(f"max_running_per_user={max_running_per_user} is invalid: it must be >= 1, "
                             "or None for no per-user cap")
        self.pool = pool
        self.policy = policy
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_running_per_user = max_running_per_user
        self.cache = PrefixCache(pool, cache_scopes) if prefix_cache else None
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self._running_per_user: Counter[str] = Counter()
        self._shared_probe = pool.pages_for(SHARED_PREFILL_PROBE_TOKENS) * pool.page_size
        self._prompt_shared: set[int] = set()  # rows whose whole prompt was offered to the prefix cache
        self.progress = ProgressGuard(max_context=pool.max_context, max_batch_tokens=max_batch_tokens)
        # Per-request timelines (the engine's, with its step numbers); none by default (the simulator).
        self.timelines = timelines if timelines is not None else TimelineRecorder(enabled=False)

    # ---- queue -----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.add(req)
        self.timelines.queued(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pool_view(self) -> PoolView:
        return PoolView(capacity=self.pool.capacity, free=self.pool.free_tokens + self.reclaimable_tokens,
                        page_size=self.pool.page_size)

    # ---- prefix cache ----------------------------------------------------------------------
    @property
    def reclaimable_tokens(self) -> int:
        """Prefix-cache tokens no request uses (0 without a cache): free for admission, evicted on demand."""
        return self.cache.reclaimable_tokens if self.cache is not None else 0

    def clear_prefix_cache(self) -> Decision | None:
        """Evict every cached prefix no running request uses; the evict decision, if anything went."""
        if self.cache is None:
            return None
        freed = self.cache.clear() * self.pool.page_size
        if not freed:
            return None
        return Decision("evict", None, "cache_cleared",
                        {"evicted": freed, "free": self.pool.free_tokens, "cached": self.cache.cached_tokens})

    def _share_prompt(self, req: Request) -> None:
        """Offer `req`'s computed prompt to the cache now, taking the cache's pages where it
        already had them."""
        shared = self.cache.share_prompt(req.row, req.prompt_ids, req.pages, req.num_computed, req.user)
        if shared is not None:
            req.pages[:len(shared)] = shared
        if req.num_computed >= req.num_prompt:
            # From now on the offer is the same (the prompt's whole pages) and this row holds all of
            # it in the cache: share_prompt would return at its first check until the row is released.
            self._prompt_shared.add(req.row)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        # Decodes before prefill chunks: a waiting prompt never stalls tokens already streaming.
        # Higher priorities first: a request that finds the pool dry may only preempt requests
        # not yet in this batch, so it must come before the ones it outranks.
        decodes, chunks = self._running_in_step_order()
        budget = self._schedule_decodes(decodes, batch, self.max_batch_tokens)
        num_decodes = len(batch.items)
        budget = self._schedule_chunks(chunks, batch, budget)
        self._admit_waiting(batch, budget)
        if len(batch.items) > num_decodes:  # only rows added after the decodes can be out of order
            batch.items.sort(key=lambda item: item[1] != 1)
        self.progress.observe(self, batch)  # a livelock raises here, saying why
        return batch

    def _running_in_step_order(self) -> tuple[list[Request], list[Request]]:
        """The running requests in this step's order, as two lists: those with one token to compute
        (decodes), then the others. Each is by priority, highest first; a reversed sort is still
        stable, so equal priorities keep running order."""
        decodes = [r for r in self.running if len(r.token_ids) - r.num_computed == 1]
        chunks = [r for r in self.running if len(r.token_ids) - r.num_computed != 1] \
            if len(decodes) < len(self.running) else []
        return sorted(decodes, key=_PRIORITY, reverse=True), sorted(chunks, key=_PRIORITY, reverse=True)

    def _schedule_decodes(self, decodes: list[Request], batch: ScheduledBatch, budget: int) -> int:
        """Schedule one token of each of `decodes`; returns the budget left.

        The decode step of a large batch is this loop alone, so a request whose prompt the cache
        already has costs a few attribute reads. One whose next token starts a page is owed one
        while the free list has enough for all owed so far: they are handed out together, in order,
        before anything else touches the pool (sharing a prompt, growing the slow way, the end of
        the loop), so each gets the very page that allocating it there and then would have given.
        """
        page_size = self.pool.page_size
        cache, prompt_shared = self.cache, self._prompt_shared
        owed: list[Request] = []
        for req in decodes:
            if req.status is not Status.RUNNING or budget == 0 or req.awaiting_final:
                continue  # preempted earlier in this step, no budget left, or its final token still on the GPU
            if cache is not None and req.row not in prompt_shared:
                self._hand_out_pages(owed)
                self._share_prompt(req)
            held = len(req.pages) * page_size
            if req.num_computed == held and len(owed) < self.pool.num_free_pages:
                owed.append(req)
            elif req.num_computed >= held:
                self._hand_out_pages(owed)
                if not self._grow_or_preempt(req, req.num_computed + 1, batch):
                    continue
            batch.items.append((req, 1))
            budget -= 1
            if req.num_computed < len(req.prompt_ids):  # the prompt's last token, or a recompute
                self.timelines.prefill(req, 1)
        self._hand_out_pages(owed)
        return budget

    def _hand_out_pages(self, owed: list[Request]) -> None:
        """Give each request of `owed` one more page, in order, and empty the list."""
        if owed:
            for req, page in zip(owed, self.pool.alloc_page_each([r.row for r in owed])):
                req.pages.append(page)
            owed.clear()

    def _schedule_chunks(self, chunks: list[Request], batch: ScheduledBatch, budget: int) -> int:
        """Schedule as much of each of `chunks` (requests with more or less than one token to compute)
        as the budget allows; returns the budget left."""
        for req in chunks:
            if req.status is not Status.RUNNING or budget == 0 or req.awaiting_final:
                continue
            if self.cache is not None:
                self._share_prompt(req)
            n = min(req.num_uncomputed, budget)
            if self._grow_or_preempt(req, req.num_computed + n, batch):
                batch.items.append((req, n))
                budget -= n
                if n != 1 or req.num_computed < req.num_prompt:  # a prefill (or recompute) chunk
                    self.timelines.prefill(req, n)
        return budget

    def _grow_or_preempt(self, req: Request, length: int, batch: ScheduledBatch) -> bool:
        """Make room for `req` to hold `length` tokens, preempting others (never one already in
        this step's batch). False if `req` itself had to go."""
        while not self._grow(req, length, batch.decisions):
            victim = self._victim(req, batch)
            self.preempt(victim, batch.decisions, needed_by=req)
            if victim is req:
                return False
        return True

    def _victim(self, req: Request, batch: ScheduledBatch) -> Request:
        """The newest request of the lowest priority outside this step's batch; `req` itself when
        every such request outranks it, or none is left."""
        in_batch = {id(r) for r, _ in batch.items}
        others = (r for r in reversed(self.running) if id(r) not in in_batch and r is not req)
        victim = min(others, key=lambda r: r.priority, default=req)
        return req if victim.priority > req.priority else victim

    def _grow(self, req: Request, length: int, decisions: list[Decision]) -> bool:
        need = self.pool.pages_for(length) - len(req.pages)
        if need <= 0:
            return True
        pages = self.pool.alloc_pages(need, owner=req.row)
        if pages is None and self._evict(need - self.pool.num_free_pages, req, decisions):
            pages = self.pool.alloc_pages(need, owner=req.row)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _evict(self, num_pages: int, req: Request, decisions: list[Decision]) -> bool:
        """Free `num_pages` pages of unused prefix cache for `req`; nothing when that cannot
        free enough (the cache would be thrown away for no gain)."""
        if self.cache is None or self.cache.reclaimable_pages < num_pages:
            return False
        tokens = self.cache.evict(num_pages) * self.pool.page_size
        decisions.append(Decision("evict", req.request_id, "evicted_for", {
            "evicted": tokens, "free": self.pool.free_tokens, "cached": self.cache.cached_tokens}, req.user))
        return True

    # ---- leaving the batch -----------------------------------------------------------------
    def preempt(self, req: Request, decisions: list[Decision], needed_by: Request) -> None:
        released = len(req.pages) * self.pool.page_size
        # What the prefix cache keeps of it (whole computed pages), so a resume need not recompute them.
        kept = min(req.num_computed // self.pool.page_size, len(req.pages)) * self.pool.page_size \
            if self.cache is not None else 0
        self._release(req)
        self._stop_running(req)
        req.status = Status.WAITING
        req.computed_at_preemption = req.num_computed
        req.num_computed = 0
        req.num_preemptions += 1
        req.waiting_since = time.perf_counter()
        self.waiting.push_front(req)
        code, related = ("pool_full", ()) if req is needed_by else \
            ("preempted_for", ((needed_by.request_id, needed_by.user),))
        decisions.append(Decision("preempt", req.request_id, code,
                                  {"freed": released, "free": self.pool_view().free}, req.user, related))
        self.timelines.preempted(req, code, needed_by, req.computed_at_preemption, kept)

    def finish(self, req: Request, reason: str) -> Decision:
        if req.status is Status.RUNNING:
            self._stop_running(req)
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.policy.record_finished(req)
        self.timelines.finished(req, reason)
        return Decision("finish", req.request_id, reason,
                        {"output_tokens": req.num_output, "free": self.pool_view().free}, req.user)

    def _stop_running(self, req: Request) -> None:
        self.running.remove(req)
        self._running_per_user[req.user] -= 1
        if not self._running_per_user[req.user]:
            del self._running_per_user[req.user]

    def _release(self, req: Request) -> None:
        """Give back `req`'s memory; with a prefix cache its computed pages are cached first."""
        if self.cache is not None and req.row is not None:
            self.cache.release(req.row, req.token_ids, req.pages, req.num_computed, req.user)
            self._prompt_shared.discard(req.row)
        else:
            self.pool.free_pages(req.pages)
        req.pages = []
        if req.row is not None:
            self.pool.free_row(req.row)
            req.row = None
