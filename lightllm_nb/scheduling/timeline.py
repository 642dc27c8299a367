"""A request's timeline: what happened to it and when, built from the decisions the scheduler makes
anyway (nothing per token), so a user can ask why one request was slow.

Each entry is a dict `{"t": seconds since arrival, "step": engine step, "event": ..., ...numbers}`:

| event | numbers |
| --- | --- |
| `queued` | `prompt_tokens` |
| `deferred` | `code`, `reason` (the policy's sentence), the decision's numbers, and `last_t`, `last_step`, `count`: consecutive deferrals for one reason collapse into one entry |
| `admitted` | `cached_tokens` (prompt tokens found in the prefix cache), by source (`own`, `declared`, `shared`) |
| `prefill` | `tokens` computed in this chunk |
| `first_token` | (the step during which the engine saw it) |
| `preempted` | `code` (`pool_full`: it could not grow itself; `preempted_for`: another needed room), `by` (that request's id when it is the same user's, else None), `by_priority`, `priority`, `computed`, `kept` (of those, tokens left in the prefix cache) |
| `resumed` | `cached_tokens`, `recomputed` (tokens computed before the preemption that must be computed again) |
| `finished` | `reason` (stop, length, abort or error), `output_tokens` |
"""

from __future__ import annotations

import time
from typing import Callable

from .decisions import Decision
from .request import Request


class TimelineRecorder:
    """Appends entries to `request.timeline`; `step()` tells the engine step being scheduled.

    Disabled (the simulator's default), every call returns at once and timelines stay empty.
    """

    def __init__(self, step: Callable[[], int] = lambda: 0, *, enabled: bool = True):
        self.step = step
        self.enabled = enabled

    def _add(self, req: Request, event: str, **numbers) -> dict:
        entry = {"t": time.perf_counter() - req.arrival_time, "step": self.step(), "event": event, **numbers}
        req.timeline.append(entry)
        return entry

    def queued(self, req: Request) -> None:
        if self.enabled:
            self._add(req, "queued", prompt_tokens=req.num_prompt)

    def deferred(self, req: Request, decision: Decision) -> None:
        """Consecutive deferrals for one reason are one entry: its first time and step, its last
        ones, how many, and the latest numbers (why it is still waiting)."""
        if not self.enabled:
            return
        last = req.timeline[-1] if req.timeline else None
        if last is not None and last["event"] == "deferred" and last["code"] == decision.code:
            last.update(decision.numbers, reason=decision.reason, last_t=time.perf_counter() - req.arrival_time,
                        last_step=self.step(), count=last["count"] + 1)
            return
        entry = self._add(req, "deferred", code=decision.code, reason=decision.reason, **decision.numbers)
        entry.update(last_t=entry["t"], last_step=entry["step"], count=1)

    def admitted(self, req: Request, cached_tokens: int, sources: dict) -> None:
        if self.enabled:
            self._add(req, "admitted", cached_tokens=cached_tokens, **sources)

    def resumed(self, req: Request, cached_tokens: int, recomputed: int) -> None:
        if self.enabled:
            self._add(req, "resumed", cached_tokens=cached_tokens, recomputed=recomputed)

    def prefill(self, req: Request, tokens: int) -> None:
        if self.enabled:
            self._add(req, "prefill", tokens=tokens)

    def first_token(self, req: Request) -> None:
        if self.enabled:
            self._add(req, "first_token")

    def preempted(self, req: Request, code: str, needed_by: Request, computed: int, kept: int) -> None:
        """`by` names the request that needed room only when it is the same user's: another user's
        request id never reaches this one's owner (its priority does, a number)."""
        if self.enabled:
            by = needed_by.request_id if needed_by is not req and needed_by.user == req.user else None
            self._add(req, "preempted", code=code, by=by, by_priority=needed_by.priority,
                      priority=req.priority, computed=computed, kept=kept)

    def finished(self, req: Request, reason: str) -> None:
        if self.enabled:
            self._add(req, "finished", reason=reason, output_tokens=req.num_output)

