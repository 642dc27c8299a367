"""A scheduler decision: its kind, a reason code, numbers and the requests it concerns; what panels,
traces and notebooks show as *why*.

The readable reason is rendered from the code, the numbers and the ids, never stored as free text:
a view redacted for one user replaces other users' ids and the text follows, so no name can hide
in a sentence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DECISION_KINDS = ("admit", "defer", "preempt", "resume", "finish", "reject", "prefix_hit", "evict")

# Reason code -> template over the numbers plus {id} (the request decided on) and {other} (the
# first related request). Finish decisions use the finish reason itself as their code.
REASONS = {
    "user_cap": "this request's user already runs {running} requests, the cap max_running_per_user={cap}: "
                "others go first",
    "shared_prefill": "{other} is computing the same next {shared}+ tokens now: {id} reuses them from the "
                      "prefix cache a step later",
    "no_room": "{need} tokens do not fit in {free} free slots",
    "prefix_hit": "{matched} of {tokens} tokens found in the prefix cache: their prefill is skipped",
    "evicted_for": "evicted {evicted} least recently used prefix-cache tokens: {id} needs room",
    "cache_cleared": "prefix cache cleared: {evicted} tokens freed",
    "pool_full": "KV pool full: it cannot grow: the pool is full",
    "preempted_for": "KV pool full: {other} needs room to grow",
    "stop": "stop", "length": "length", "abort": "abort",
    "error": "error: the step running it failed",
}


@dataclass
class Decision:
    kind: str
    request_id: str | None
    code: str                                # a key of REASONS, or "policy"
    numbers: dict = field(default_factory=dict)
    user: str | None = None
    related: tuple = ()                      # (request_id, user) of other requests the reason names
    policy_reason: str = ""                  # code "policy": the admission policy's own sentence

    @property
    def reason(self) -> str:
        if self.code == "policy":
            # Policies see lengths and counts only, so their sentences hold numbers, not names.
            return self.policy_reason or "admission policy: " + ", ".join(f"{k}={v}" for k, v in self.numbers.items())
        template = REASONS.get(self.code)
        if template is None:
            return self.code
        other = self.related[0][0] if self.related else "another request"
        return template.format(id=self.request_id, other=other, **self.numbers)

    def to_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        d = {k: v for k, v in d.items() if k != "reason"}
        return cls(**{**d, "related": tuple(tuple(r) for r in d.get("related", ()))})
