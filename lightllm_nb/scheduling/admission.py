"""Admission policies: may this waiting request start now? One interface, each answer with its reason.

Memory is counted in pages; with page_size 1 a page is a token. `reclaimable` pages hold prefix-
cache entries no request uses: the pool can evict them on demand, so they count as free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .request import Request


@dataclass(frozen=True)
class PoolView:
    """What a policy may know about memory, in tokens (whole pages)."""

    capacity: int
    free: int             # free now, counting reclaimable cache
    page_size: int

    def pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def tokens(self, tokens: int) -> int:
        """Tokens rounded up to whole pages: what `tokens` really cost."""
        return self.pages(tokens) * self.page_size


@dataclass(frozen=True)
class Verdict:
    admit: bool
    reason: str
    numbers: dict


class AdmissionPolicy(Protocol):
    name: str

    def check(self, candidate: Request, running: Sequence[Request], pool: PoolView) -> Verdict: ...

    def record_finished(self, request: Request) -> None: ...


class ConservativePolicy:
    """Reserve every request's worst case (prompt + max_tokens): never preempts, often under-fills."""

    name = "conservative"

    def check(self, candidate, running, pool):
        reserved = sum(pool.tokens(r.max_length) for r in running)
        need = pool.tokens(candidate.max_length)
        numbers = {"reserved": reserved, "need": need, "capacity": pool.capacity}
        if reserved + need <= pool.capacity:
            return Verdict(True, f"reserved {reserved} + worst case {need} <= capacity {pool.capacity}", numbers)
        return Verdict(False, f"reserved {reserved} + worst case {need} > capacity {pool.capacity}", numbers)

    def record_finished(self, request):
        pass


class AggressivePolicy:
    """Admit whenever the prompt fits in memory free now; growth beyond that is met by preemption."""

    name = "aggressive"

    def check(self, candidate, running, pool):
        need = pool.tokens(candidate.num_uncomputed)
        numbers = {"need": need, "free": pool.free, "capacity": pool.capacity}
        if need <= pool.free:
            return Verdict(True, f"prompt {need} fits in free {pool.free}", numbers)
        return Verdict(False, f"prompt {need} > free {pool.free}", numbers)

    def record_finished(self, request):
        pass
