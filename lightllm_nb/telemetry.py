"""One StepEvent per engine step: the single source for panels, metrics, traces and the CLI summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .decisions import Decision


@dataclass
class BatchRow:
    request_id: str
    user: str
    phase: str          # "prefill" or "decode"
    tokens: int         # tokens computed for this request in this step
    context: int        # its context length after the step


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
    page_owner: list[int] | None = None   # per page: owner row, -1 free, -2 cached (when asked for)
    counters: dict = field(default_factory=dict)

    @property
    def prefill_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "prefill")

    @property
    def decode_tokens(self) -> int:
        return sum(r.tokens for r in self.rows if r.phase == "decode")

    def to_dict(self) -> dict:
        return asdict(self)

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
