"""A scheduler decision with its reason and numbers: what panels, traces and notebooks show as *why*."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# admit, defer, preempt, resume, finish, reject, prefix_hit, evict
DECISION_KINDS = ("admit", "defer", "preempt", "resume", "finish", "reject", "prefix_hit", "evict")


@dataclass
class Decision:
    kind: str
    request_id: str | None
    reason: str
    numbers: dict = field(default_factory=dict)
    user: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
