"""A livelock is a bug: fail fast and say why, instead of spinning until someone notices.

Two things never happen in a correct scheduler, and the guard checks both after every schedule():

- a running request is left out of a step that had token budget to spare (it could have run:
  nothing but a bug keeps it out, apart from the one step its final token is still on the GPU);
- no request gets anywhere for many steps in a row while there is work that could run (not only
  requests waiting for their grammar to compile). "Getting anywhere" means a request computes a
  token it never had computed before (its high-water mark rises): recomputing what a preemption
  threw away is not progress, so two requests that preempt each other forever are caught too. A resumed request may recompute its whole context, chunk by chunk, before it
  reaches new tokens, so the limit allows that many steps and some more.
"""

from __future__ import annotations

from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING

from .request import Status

if TYPE_CHECKING:
    from .scheduler import ScheduledBatch, Scheduler

# Consecutive steps a running request may be left out with budget to spare: one for a final token
# still on the GPU (overlapped steps), one more for slack.
SKIPPED_WITH_ROOM_LIMIT = 3
# Steps without progress allowed beyond the longest recompute (context / batch budget).
STALL_SLACK_STEPS = 16
_SHOWN = 8  # requests listed per queue in the error message
_REQUEST = itemgetter(0)  # of a batch item
_REQUEST_ID = attrgetter("request_id")


class LivelockError(RuntimeError):
    """The scheduler stopped making progress: a bug in the engine, never in the user's request."""


class ProgressGuard:
    def __init__(self, *, max_context: int, max_batch_tokens: int):
        self.stall_limit = -(-max_context // max_batch_tokens) + STALL_SLACK_STEPS
        self._high_water: dict[str, int] = {}   # request id -> most tokens it ever had computed
        self._skipped: dict[str, int] = {}      # request id -> steps in a row left out with room
        self._stalled_steps = 0

    def observe(self, scheduler: "Scheduler", batch: "ScheduledBatch") -> None:
        """Check the step `batch` that `scheduler` just planned; raise LivelockError on a livelock."""
        progressed = self._raise_high_water(batch)
        scheduled = set(map(_REQUEST_ID, map(_REQUEST, batch.items)))
        if not scheduled.issuperset(map(_REQUEST_ID, scheduler.running)):  # the common step has everyone
            self._count_left_out(scheduler, batch, scheduled)
        elif self._skipped:
            self._skipped.clear()  # everyone ran: no run of left-out steps goes on
        # Requests that wait only for their grammar to compile are not stalled: they cannot run yet.
        if progressed or not (scheduler.running or scheduler.waiting.any_ready()):
            self._stalled_steps = 0
        else:
            self._stalled_steps += 1
        if self._stalled_steps >= self.stall_limit:
            raise LivelockError(f"no request has computed a new token for {self._stalled_steps} steps although "
                                "requests are waiting or running: a scheduler bug. " + describe(scheduler, batch))
        self._forget_finished(scheduler)

    def _raise_high_water(self, batch: "ScheduledBatch") -> bool:
        """Note how far each request of `batch` will have computed; True if any goes further than ever."""
        progressed = False
        high_water = self._high_water
        for req, n in batch.items:
            reach = req.num_computed + n
            if reach > high_water.get(req.request_id, 0):
                high_water[req.request_id] = reach
                progressed = True
        return progressed

    def _count_left_out(self, scheduler: "Scheduler", batch: "ScheduledBatch", scheduled: set[str]) -> None:
        """Count the steps each running request was left out of with budget to spare (`scheduled`: the
        ids of the batch's requests); raise at the limit."""
        spare = scheduler.max_batch_tokens - sum(n for _, n in batch.items)
        # Rebuilt from the running requests: a step a request ran in (or was not running in: preempted,
        # finished) ends its run of left-out steps, as when everyone ran.
        before, self._skipped = self._skipped, {}
        for req in scheduler.running:
            left_out = (req.request_id not in scheduled and spare > 0 and req.status is Status.RUNNING
                        and not req.awaiting_final)
            count = before.get(req.request_id, 0) + 1 if left_out else 0
            if count:
                self._skipped[req.request_id] = count
            if count >= SKIPPED_WITH_ROOM_LIMIT:
                raise LivelockError(f"running request {req.request_id} was left out of {count} steps in a row "
                                    f"although {spare} tokens of budget were spare: a scheduler bug. "
                                    + describe(scheduler, batch))

    def _forget_finished(self, scheduler: "Scheduler") -> None:
        # Pruned in bulk, rarely: tracking needs no hook into every way a request can end.
        live = len(scheduler.running) + len(scheduler.waiting)
        if len(self._high_water) <= 2 * live + 64:
            return
        ids = {r.request_id for r in scheduler.running}
        # Only the heads of users' queues and preempted requests can have computed anything.
        ids.update(r.request_id for r in scheduler.waiting.in_admission_order({}))
        self._high_water = {k: v for k, v in self._high_water.items() if k in ids}
        self._skipped = {k: v for k, v in self._skipped.items() if k in ids}


def describe(scheduler: "Scheduler", batch: "ScheduledBatch") -> str:
    """The scheduler's state in one paragraph: what runs, what waits, memory, and this step's decisions."""
    view = scheduler.pool_view()

    def show(reqs, total: int) -> str:
        reqs = list(reqs)
        shown = ", ".join(f"{r.request_id}(user={r.user}, prio={r.priority}, computed={r.num_computed}/"
                          f"{len(r.token_ids)}, pages={len(r.pages)}, preempted={r.num_preemptions}x)"
                          for r in reqs[:_SHOWN])
        return f"{total}: [{shown}{', ...' if len(reqs) > _SHOWN else ''}]"

    decisions = "; ".join(f"{d.kind} {d.request_id}: {d.reason}" for d in batch.decisions[-_SHOWN:]) or "none"
    return (f"State: running {show(scheduler.running, len(scheduler.running))}; waiting (next candidates first) "
            f"{show(scheduler.waiting.in_admission_order({}), len(scheduler.waiting))}; "
            f"pool free {view.free} of {view.capacity} tokens (page size {view.page_size}, "
            f"{scheduler.reclaimable_tokens} reclaimable from the prefix cache); policy {scheduler.policy.name}; "
            f"max_running {scheduler.max_running}, max_batch_tokens {scheduler.max_batch_tokens}; "
            f"this step scheduled {len(batch.items)} requests; its decisions: {decisions}. "
            "Please report this with the message above.")
