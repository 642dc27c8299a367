"""The decode fast path of Scheduler.schedule (and ProgressGuard.observe's shortcut) against the
general path it replaces: over random workloads, with page sizes 1 and 16, the prefix cache on, tight
pools (eviction, preemption, resumes), priorities, aborts, stops and overlapped steps, both must make
the same batches, decisions, page assignments, guard state and timelines, step by step.

The general path is the scheduler's loop as it was before the fast path: every running request
sorted by one key, offering its prompt to the cache and growing through `_grow` every step; and the
guard looking at every running request's left-out count every step.
"""

import random

import pytest
import torch

from lightllm_nb.kv.cache_scope import CacheScopes
from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.scheduling.admission import AggressivePolicy
from lightllm_nb.scheduling.past_future import PastFuturePolicy
from lightllm_nb.scheduling.progress_guard import LivelockError, ProgressGuard, describe
from lightllm_nb.scheduling.request import Request, Status
from lightllm_nb.scheduling.scheduler import ScheduledBatch, Scheduler
from lightllm_nb.scheduling.timeline import TimelineRecorder
from model_free import HANG_SECONDS

pytestmark = pytest.mark.timeout(HANG_SECONDS)

SEEDS = range(12)
STEPS = 160


class GeneralPathGuard(ProgressGuard):
    def observe(self, scheduler, batch):
        progressed = self._raise_high_water(batch)
        self._count_left_out(scheduler, batch, {req.request_id for req, _ in batch.items})  # every step
        self._stalled_steps = 0 if progressed or not scheduler.has_work() else self._stalled_steps + 1
        if self._stalled_steps >= self.stall_limit:
            raise LivelockError(f"no request has computed a new token for {self._stalled_steps} steps although "
                                "requests are waiting or running: a scheduler bug. " + describe(scheduler, batch))
        self._forget_finished(scheduler)


class GeneralPathScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = GeneralPathGuard(max_context=self.pool.max_context, max_batch_tokens=self.max_batch_tokens)

    def schedule(self):
        batch = ScheduledBatch()
        budget = self.max_batch_tokens
        in_batch = set()
        for req in sorted(self.running, key=lambda r: (r.num_uncomputed != 1, -r.priority)):
            if req.status is not Status.RUNNING or budget == 0 or req.awaiting_final:
                continue
            if self.cache is not None:
                self._share_prompt(req)
            n = min(req.num_uncomputed, budget)
            if self._grow_or_preempt_outside(req, req.num_computed + n, batch, in_batch):
                batch.items.append((req, n))
                in_batch.add(id(req))
                budget -= n
                if n != 1 or req.num_computed < req.num_prompt:
                    self.timelines.prefill(req, n)
        self._admit_waiting(batch, budget)
        batch.items.sort(key=lambda item: item[1] != 1)
        self.progress.observe(self, batch)
        return batch

    def _grow_or_preempt_outside(self, req, length, batch, in_batch):
        while not self._grow(req, length, batch.decisions):
            others = (r for r in reversed(self.running) if id(r) not in in_batch and r is not req)
            victim = min(others, key=lambda r: r.priority, default=req)
            victim = req if victim.priority > req.priority else victim
            self.preempt(victim, batch.decisions, needed_by=req)
            if victim is req:
                return False
        return True


def make(cls, rng, page_size, declared=()):
    """A scheduler of random limits; `declared`: a shared prefix the operator declared."""
    max_running = rng.randint(2, 10)
    capacity = page_size * rng.randint(6, 24) if page_size > 1 else rng.randint(30, 120)
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=capacity, page_size=page_size,
                  max_requests=max_running, max_context=capacity, dtype=torch.float32, device=torch.device("cpu"))
    policy = PastFuturePolicy(min_history=2) if rng.random() < 0.5 else AggressivePolicy()
    steps = iter(range(10**9))
    scopes = CacheScopes(mode=rng.choice(["user", "shared"]), shared_prefixes=[declared] if declared else [])
    return cls(pool, policy, max_batch_tokens=max_running * rng.randint(1, 8), max_running=max_running,
               prefix_cache=True, cache_scopes=scopes, timelines=TimelineRecorder(lambda: next(steps)))


def snapshot(scheduler, batch, finished):
    """The state after a step that planned `batch` and in which `finished` (decisions) ended."""
    cache, guard = scheduler.cache, scheduler.progress
    return {
        "items": [(r.request_id, n) for r, n in batch.items],
        "decisions": [(d.kind, d.request_id, d.code, d.numbers, d.user, d.related, d.policy_reason)
                      for d in batch.decisions + finished],
        "running": [(r.request_id, r.status, r.row, r.num_computed, list(r.pages), list(r.token_ids))
                    for r in scheduler.running],
        "waiting": [r.request_id for r in scheduler.waiting.in_admission_order({})],
        "pool": (scheduler.pool.page_owner.tolist(), list(scheduler.pool._free_pages)),
        "cache": (cache.cached_tokens, cache.reclaimable_pages),
        "guard": (dict(guard._high_water), dict(guard._skipped), guard._stalled_steps),
    }


def run(cls, seed, page_size, overlap):
    """Per-step snapshots of a random workload, then every request's timeline (times left out)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 3 * page_size + 8))] for _ in range(3)]
    scheduler = make(cls, rng, page_size, declared=prefixes[0])
    capacity = scheduler.pool.capacity
    requests, inflight, history = {}, [], []

    def finish_on(req, index):
        """The token at `index` arrived: maybe the request's last (length, or a random stop)."""
        if index + 1 - req.num_prompt >= req.sampling.max_tokens or rng.random() < 0.02:
            req.drop_tokens_after(index)
            finished.append(scheduler.finish(req, "length" if rng.random() < 0.5 else "stop"))

    for step in range(STEPS):
        for _ in range(rng.choice([0, 0, 1, 1, 2]) if step < STEPS // 2 else 0):
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 2 * page_size + 10))]
            prompt = prompt[-capacity // 2:]  # the engine turns down what can never fit
            max_tokens = min(rng.randint(1, 6 * page_size + 40), capacity - len(prompt))
            rid = f"r{len(requests)}"
            requests[rid] = req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens),
                                          user=rng.choice(["a", "b"]), priority=rng.choice([0, 0, 1, 2]))
            scheduler.add(req)
        live = [rid for rid, r in requests.items() if not r.finished]
        finished = [scheduler.finish(requests[rng.choice(live)], "abort")] if live and rng.random() < 0.04 else []
        try:
            batch = scheduler.schedule()
        except LivelockError as err:
            history.append(("livelock", str(err)))
            break
        for req, n in batch.items:
            req.num_computed += n
        sampled = [req for req, _ in batch.items if req.num_computed == len(req.token_ids)]
        if overlap:  # tokens stay on the "GPU" until the next step has been scheduled
            arrived, inflight = inflight, [(req, req.add_pending_token()) for req in sampled]
            for req, index in arrived:
                if not req.finished:
                    req.fill_pending_token(index, rng.randrange(50))
                    finish_on(req, index)
        else:
            for req in sampled:
                req.token_ids.append(rng.randrange(50))
                finish_on(req, len(req.token_ids) - 1)
        history.append(snapshot(scheduler, batch, finished))
    timelines = {rid: [{k: v for k, v in entry.items() if k not in ("t", "last_t")} for entry in r.timeline]
                 for rid, r in requests.items()}
    return history, timelines


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
def test_the_fast_path_decides_exactly_as_the_general_path(page_size, overlap):
    seen = set()
    for seed in SEEDS:
        general, general_timelines = run(GeneralPathScheduler, seed, page_size, overlap)
        fast, fast_timelines = run(Scheduler, seed, page_size, overlap)
        for step, (want, got) in enumerate(zip(general, fast)):
            assert got == want, f"seed {seed}: step {step} differs"
        assert len(fast) == len(general)
        assert fast_timelines == general_timelines, f"seed {seed}: timelines differ"
        seen.update(kind for snap in general if isinstance(snap, dict) for kind, *_ in snap["decisions"])
    # The workloads must reach the paths where the two could differ.
    assert {"preempt", "resume", "evict", "prefix_hit", "finish"} <= seen


@pytest.mark.parametrize("seed", range(20))
def test_the_guard_counts_left_out_requests_as_before(seed):
    # A correct scheduler leaves nobody out, so the workloads above never reach this count: batches
    # of a buggy scheduler (some running requests missing, others twice) are made up here.
    rng = random.Random(seed)
    scheduler = make(Scheduler, rng, page_size=1)
    for i in range(scheduler.max_running):
        scheduler.add(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50)))
    scheduler.schedule()
    guards = [GeneralPathGuard(max_context=64, max_batch_tokens=scheduler.max_batch_tokens),
              ProgressGuard(max_context=64, max_batch_tokens=scheduler.max_batch_tokens)]
    for _ in range(40):
        rows = [r for r in scheduler.running if rng.random() < 0.8] + rng.sample(scheduler.running, 1)
        batch = ScheduledBatch(items=[(r, rng.choice([0, 1])) for r in rows[:rng.randint(0, len(rows))]])
        outcomes = []
        for guard in guards:
            try:
                guard.observe(scheduler, batch)
                outcomes.append((dict(guard._skipped), dict(guard._high_water), guard._stalled_steps))
            except LivelockError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1]
        if isinstance(outcomes[0], str):
            break


def test_awaiting_final_is_a_pending_token_past_max_tokens():
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=2))
    for _ in range(4):
        req.add_pending_token()
        assert req.awaiting_final == (req.newest_is_pending and req.num_output >= req.sampling.max_tokens)
        req.fill_pending_token(len(req.token_ids) - 1, 9)
        assert not req.awaiting_final
