"""Admitting waiting requests into a step: fairness order, the admission policy, prefix-cache
matches, and the defer decisions that say why a request waits. Mixed into Scheduler
(scheduler.py), which owns the state it uses."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..kv.prefix_cache import PrefixMatch
from .decisions import Decision
from .request import Request, Status

if TYPE_CHECKING:
    from .scheduler import ScheduledBatch


class WaitingAdmission:
    """Uses Scheduler's `waiting`, `running`, `max_running`, `max_running_per_user`, `_running_per_user`,
    `cache`, `pool`, `policy`, `timelines`, `_shared_probe`, `pool_view`, `_grow` and `_release`."""

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit candidates in fairness order while the budget, rows and the policy allow.

        A candidate turned down for memory (by the policy or the pool) stops admission for this
        step: nobody behind it overtakes, so a large request is never starved by a stream of
        small ones; it goes first once running requests finish. Users at their cap are skipped
        instead (waiting on them would leave memory idle that others can use), and so are users
        whose next request would compute the same tokens as a prefill running now: a step later
        it finds them in the prefix cache.
        """
        if not self.waiting or budget == 0 or len(self.running) >= self.max_running:
            return  # the common decode-only step: nothing to look at
        skipped: set[str] = set()
        in_flight = {self._next_tokens(r, self.cache.held(r.row)): (r.request_id, r.user)
                     for r in self.running if r.num_computed < r.num_prompt} if self.cache is not None else {}
        tried: set[str] = set()
        while budget > 0 and len(self.running) < self.max_running:
            picked = self._next_candidate(batch.decisions, skipped, in_flight)
            if picked is None:
                return
            req, match = picked
            # An admitted candidate leaves the queue and a deferred one ends the step, so picking
            # one twice is a bug: without this it would be tried again for ever.
            if req.request_id in tried:
                raise RuntimeError(f"scheduler: {req.request_id!r} picked twice in one step "
                                   f"(running {len(self.running)}, waiting {len(self.waiting)}, budget {budget})")
            tried.add(req.request_id)
            n = self._try_admit(req, match, budget, batch)
            if n == 0:
                return
            budget -= n
            if self.cache is not None:
                in_flight[self._next_tokens(req, self.cache.held(req.row))] = (req.request_id, req.user)

    def _next_candidate(self, decisions: list[Decision], skipped: set[str],
                        in_flight: dict) -> tuple[Request, PrefixMatch | None] | None:
        """The first candidate in fairness order that may try now, with its cached prefix.
        Users passed over get one defer decision each per step, saying why."""
        cap = self.max_running_per_user
        for req in self.waiting.in_admission_order(self._running_per_user):
            if req.user in skipped:
                continue
            if req.newest_is_pending:
                # Preempted this very step with its newest token still on the GPU: that token is
                # read back at the end of the step, so it can resume from the next one.
                continue
            running = self._running_per_user[req.user]
            if cap is not None and running >= cap:
                skipped.add(req.user)  # one decision per user and step is enough to say why
                decisions.append(Decision("defer", req.request_id, "user_cap", {"running": running, "cap": cap},
                                          req.user))
                self.timelines.deferred(req, decisions[-1])
                continue
            if self.cache is None:
                return req, None
            # Never match the last token: the step must compute at least one token to yield logits.
            match = self.cache.match(req.token_ids[:-1], req.user)
            sharer = in_flight.get(self._next_tokens(req, match))
            if sharer is None:
                return req, match
            skipped.add(req.user)
            decisions.append(Decision("defer", req.request_id, "shared_prefill",
                                      {"matched": match.length, "shared": self._shared_probe}, req.user, (sharer,)))
            self.timelines.deferred(req, decisions[-1])
        return None

    def _next_tokens(self, req: Request, match: PrefixMatch) -> tuple:
        """Where `req` stands in the prefix tree and the tokens it computes next: two requests with
        the same key would compute the same K/V under the same scope (across scopes, waiting would
        show one user that another is computing the same tokens right now)."""
        return match.node, match.next_scope, tuple(req.token_ids[match.length:match.length + self._shared_probe])

    def _try_admit(self, req: Request, match: PrefixMatch | None, budget: int, batch: ScheduledBatch) -> int:
        """Tokens of `req` scheduled this step, or 0 when it must wait (a defer decision says why)."""
        row = self.pool.alloc_row()
        if row is None:
            return 0
        req.row = row
        if match is not None:
            self.cache.hold(row, match)
            req.pages, req.num_computed = list(match.pages), match.length
        matched = req.num_computed
        verdict = self.policy.check(req, self.running, self.pool_view())
        n = min(req.num_uncomputed, budget)
        code, policy_reason, numbers = "policy", verdict.reason, verdict.numbers
        admitted = verdict.admit and self._grow(req, req.num_computed + n, batch.decisions)
        if verdict.admit and not admitted:
            free = self.pool_view().free
            code, policy_reason, numbers = "no_room", "", {"need": n, "free": free}
        if not admitted:
            self._release(req)
            req.num_computed = 0
            batch.decisions.append(Decision("defer", req.request_id, code, numbers, req.user,
                                            policy_reason=policy_reason))
            self.timelines.deferred(req, batch.decisions[-1])
            return 0
        self.waiting.take(req)
        kind = "resume" if req.num_preemptions else "admit"
        req.status = Status.RUNNING
        now = time.perf_counter()
        req.admit_time = req.admit_time or now
        req.queue_time += now - req.waiting_since
        req.waiting_since = None
        self.running.append(req)
        self._running_per_user[req.user] += 1
        batch.items.append((req, n))
        batch.decisions.append(Decision(kind, req.request_id, code, numbers, req.user, policy_reason=policy_reason))
        if matched:
            if not req.num_preemptions:  # a resume finds its own tokens: not reused prompt tokens
                req.num_cached = matched
            self.pool.map_prefix(row, req.pages, matched)
            batch.decisions.append(Decision("prefix_hit", req.request_id, "prefix_hit",
                                            {"matched": matched, "tokens": len(req.token_ids), **match.sources()},
                                            req.user))
        if req.num_preemptions:
            recomputed = max(0, req.computed_at_preemption - matched)
            req.num_recomputed += recomputed
            self.timelines.resumed(req, matched, recomputed)
        else:
            self.timelines.admitted(req, matched, match.sources() if matched else {})
        self.timelines.prefill(req, n)
        return n
