"""One StepEvent per engine step: the single source for panels, metrics, traces and the CLI summary,
and the view of it that one user may see."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields, replace
from numbers import Real

import numpy as np

from ..scheduling.decisions import Decision

# Aliases a redacting reader remembers; older ones are forgotten (a long-gone request reappearing
# would only get a new alias).
MAX_ALIASES = 65536


@dataclass
class BatchRow:
    request_id: str
    user: str
    phase: str          # "prefill" or "decode"
    tokens: int         # tokens computed for this request in this step
    context: int        # its context length after the step
    allowed_tokens: int | None = None  # structured output: tokens its grammar's mask allowed this step


@dataclass
class KVHolder:
    """A running request that holds a row of req_to_token: what a page owner code (the row) means.
    Running requests skipped by this step's batch hold pages too, so these are not the BatchRows."""

    row: int            # its req_to_token row: the code page_owner gives its pages
    request_id: str
    user: str
    tokens: int         # tokens in its KV cache (context computed so far, cached prefix included)


@dataclass
class StepEvent:
    step: int
    time: float                 # seconds since the engine started
    duration: float             # wall seconds of this step
    rows: list[BatchRow]
    decisions: list[Decision]
    kv_capacity: int
    kv_free: int
    kv_cached: int              # reclaimable prefix-cache tokens, included in kv_free
    running: int
    waiting: int
    page_size: int
    # Per page: owner row, -1 free, -2 cached, -3 shared; only for subscribers that ask (int32).
    page_owner: np.ndarray | None = None
    # Who holds each owner row after the step; None in traces recorded before it existed.
    kv_holders: list[KVHolder] | None = None
    # Since the engine started: tokens its steps computed (prompt and decode) and tokens it sampled.
    # A reader that sees only some steps (rate-capped) gets rates from these exactly; None in traces
    # recorded before they existed.
    computed_tokens_total: int | None = None
    generated_tokens_total: int | None = None
    # Seconds from arrival to first token of each request whose first token came in this step (and,
    # for a rate-capped reader, in the steps it skipped); None in traces recorded before.
    first_token_seconds: list[float] | None = None

    @property
    def prefill_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "prefill")

    @property
    def decode_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "decode")

    def to_dict(self) -> dict:
        # Row by row rather than dataclasses.asdict, whose recursive deep copy of every row cost
        # milliseconds per event at batch 128: each event-stream reader pays this every step.
        d = {name: getattr(self, name) for name in _STEP_FIELDS}
        d["rows"] = [dict(vars(r)) for r in self.rows]
        d["kv_holders"] = None if self.kv_holders is None else [dict(vars(h)) for h in self.kv_holders]
        d["decisions"] = [x.to_dict() for x in self.decisions]
        d["page_owner"] = None if self.page_owner is None else self.page_owner.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepEvent":
        pages, holders = d.get("page_owner"), d.get("kv_holders")
        return cls(**{**d, "rows": [BatchRow(**r) for r in d["rows"]],
                      "kv_holders": None if holders is None else [KVHolder(**h) for h in holders],
                      "decisions": [Decision.from_dict(x) for x in d["decisions"]],
                      "page_owner": None if pages is None else np.asarray(pages, dtype=np.int32)})

    def redacted_for(self, user: str, aliases: dict[str, str] | None = None) -> "StepEvent":
        """The event as `user` may see it: other users' requests keep their token counts but lose
        their names, ids and how narrow their grammar's mask was. Each id becomes a random alias (not derived from the id, so it cannot
        be reversed); pass the same `aliases` dict for a whole stream to keep them stable."""
        aliases = {} if aliases is None else aliases

        def alias(request_id: str | None) -> str | None:
            if request_id is None:
                return None
            if request_id not in aliases:
                if len(aliases) >= MAX_ALIASES:
                    del aliases[next(iter(aliases))]
                aliases[request_id] = "other-" + secrets.token_hex(6)
            return aliases[request_id]

        def own_or_alias(request_id: str | None, owner: str | None) -> str | None:
            return request_id if owner == user else alias(request_id)

        # Built directly, not with dataclasses.replace: this runs per subscriber per step for every row.
        # Another user's grammar (how many tokens its mask allowed) is theirs too: left out.
        rows = [r if r.user == user else BatchRow(alias(r.request_id), "other", r.phase, r.tokens, r.context)
                for r in self.rows]
        holders = None if self.kv_holders is None else [
            h if h.user == user else KVHolder(h.row, alias(h.request_id), "other", h.tokens)
            for h in self.kv_holders]
        decisions = []
        for d in self.decisions:
            related = tuple((own_or_alias(rid, owner), owner if owner == user else "other")
                            for rid, owner in d.related)
            if d.user == user:
                decisions.append(replace(d, related=related))
                continue
            # Only plain numbers of another user's decision pass: no string can carry a name.
            numbers = {k: v for k, v in d.numbers.items() if isinstance(v, Real)}
            decisions.append(replace(d, request_id=alias(d.request_id), user=None if d.user is None else "other",
                                     numbers=numbers, related=related, policy_reason=""))
        return replace(self, rows=rows, decisions=decisions, kv_holders=holders)

    def summary(self) -> str:
        used = self.kv_capacity - self.kv_free
        kinds = {}
        for d in self.decisions:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        extra = " ".join(f"{k}={v}" for k, v in kinds.items())
        return (f"step {self.step:4d} | batch {len(self.rows):3d} rows: {self.prefill_tokens:5d} prefill + "
                f"{self.decode_tokens:3d} decode tokens | KV {used:6d}/{self.kv_capacity} "
                f"({100 * used / self.kv_capacity:5.1f}%) | running {self.running} waiting {self.waiting}"
                + (f" | {extra}" if extra else ""))


_STEP_FIELDS = tuple(f.name for f in fields(StepEvent))
