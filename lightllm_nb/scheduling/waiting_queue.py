"""Waiting requests in fair admission order: one engine, many users, nobody starved."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Iterator, Mapping

from .request import Request


class WaitingQueue:
    """Waiting requests, grouped by priority and user so that picking the next one fairly costs
    O(users), not O(waiting).

    Admission order: preempted requests first (most recently preempted first: they held memory a
    moment ago); then higher `priority` first; within a priority, the user with the fewest running
    requests, ties going to the user admitted least recently (round robin); FIFO within a user,
    among the requests that are ready (a structured-output request waits for its grammar).
    """

    def __init__(self) -> None:
        self._preempted: deque[Request] = deque()
        self._by_priority: dict[int, dict[str, deque[Request]]] = {}
        self._last_admitted: dict[str, int] = {}   # user -> admission number: the round-robin memory
        self._admissions = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def add(self, req: Request) -> None:
        self._by_priority.setdefault(req.priority, {}).setdefault(req.user, deque()).append(req)
        self._size += 1

    def push_front(self, req: Request) -> None:
        """Requeue a preempted request ahead of everyone."""
        self._preempted.appendleft(req)
        self._size += 1

    def in_admission_order(self, running_per_user: Mapping[str, int]) -> Iterator[Request]:
        """Candidates, best first: every preempted request, then each user's first ready request (one
        whose grammar is still compiling does not hold up the same user's later requests)."""
        yield from self._preempted
        for priority in sorted(self._by_priority, reverse=True):
            users = self._by_priority[priority]
            for user in sorted(users, key=lambda u: (running_per_user.get(u, 0), self._last_admitted.get(u, -1))):
                first_ready = next((r for r in users[user] if r.ready), None)
                if first_ready is not None:
                    yield first_ready

    def any_ready(self) -> bool:
        """Whether any waiting request may be admitted now (not all of them wait for a grammar)."""
        return bool(self._preempted) or any(r.ready for users in self._by_priority.values()
                                            for queue in users.values() for r in queue)

    def take(self, req: Request) -> None:
        """Remove an admitted request and remember that its user just had a turn."""
        self.remove(req)
        self._last_admitted[req.user] = next(self._admissions)

    def remove(self, req: Request) -> None:
        # A waiting request that was ever preempted sits in _preempted until it runs again.
        queue = self._preempted if req.num_preemptions else self._by_priority[req.priority][req.user]
        del queue[next(i for i, r in enumerate(queue) if r is req)]  # identity: Requests compare by value
        self._size -= 1
        if not req.num_preemptions and not queue:
            users = self._by_priority[req.priority]
            del users[req.user]
            if not users:
                del self._by_priority[req.priority]
