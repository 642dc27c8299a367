"""A request as the engine tracks it, and the finished result handed back to users.

This module alone knows the overlap placeholder: a `Request` puts one in (`add_pending_token`),
replaces it (`fill_pending_token`) and leaves it out of results; the runner fills placeholders of
a step's device tensor with `fill_pending`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams


# Stands in token_ids for a sampled token still on its way back from the GPU: with overlapped
# steps the next step is launched before this one's tokens reach the host.
PENDING_TOKEN = -1


def has_pending(token_ids: list[int]) -> bool:
    return PENDING_TOKEN in token_ids


def fill_pending(token_ids: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """`token_ids` (on the device) with each placeholder replaced by `newest` at the same index:
    the tokens the previous step sampled, which only the device has seen yet."""
    return torch.where(token_ids == PENDING_TOKEN, newest, token_ids)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Prefill and decode are one thing here: each step computes the tokens of `token_ids`
    past `num_computed` (the prompt in chunks at first, then the one token sampled last)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    user: str = "default"
    priority: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(init=False)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    row: int | None = None        # row of req_to_token while running
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0         # leading tokens whose K/V sit in the cache
    num_cached: int = 0           # of those, how many came from the prefix cache (not computed here)
    admit_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    # Waiting is counted across preemptions: queue_time sums the closed waits, waiting_since opens one.
    waiting_since: float | None = None   # arrival, or the last preemption, while waiting
    queue_time: float = 0.0
    queue_time_before_first_token: float | None = None
    computed_at_preemption: int = 0      # tokens computed when last preempted
    num_recomputed: int = 0              # computed again after preemptions
    timeline: list[dict] = field(default_factory=list)  # see scheduling/timeline.py
    sampler: object = None        # RequestSampler, set on first admission
    grammar: object = None        # RequestGrammar of a structured-output request
    logprobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        self.waiting_since = self.arrival_time

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        """Every output token, a placeholder of one still on the GPU included."""
        return self.token_ids[self.num_prompt:]

    @property
    def known_output_ids(self) -> list[int]:
        """The output tokens the host has seen (placeholders left out)."""
        return [t for t in self.output_ids if t != PENDING_TOKEN]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def ready(self) -> bool:
        """May be admitted: a structured-output request's grammar must be compiled first."""
        return self.grammar is None or self.grammar.ready

    @property
    def is_decoding(self) -> bool:
        return self.num_computed >= self.num_prompt

    @property
    def max_length(self) -> int:
        """Tokens this request holds in the KV cache at most (prompt + max_tokens)."""
        return self.num_prompt + self.sampling.max_tokens

    @property
    def newest_is_pending(self) -> bool:
        """Its newest token was sampled but is still on its way back from the GPU."""
        return self.token_ids[-1] == PENDING_TOKEN

    @property
    def awaiting_final(self) -> bool:
        """Its newest token is still on the GPU and will be its last (max_tokens): nothing left to compute."""
        # newest_is_pending and num_output, spelled out: the scheduler asks every running request each step.
        token_ids = self.token_ids
        return token_ids[-1] == PENDING_TOKEN and len(token_ids) - len(self.prompt_ids) >= self.sampling.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def add_pending_token(self) -> int:
        """A placeholder for a token sampled on the device, so the scheduler already sees one more
        uncomputed token; returns its index, for `fill_pending_token` once the value arrives."""
        self.token_ids.append(PENDING_TOKEN)
        return len(self.token_ids) - 1

    def fill_pending_token(self, index: int, token: int) -> None:
        self.token_ids[index] = token

    def drop_tokens_after(self, index: int) -> None:
        """Forget tokens past `index`: a stop seen a step late leaves a placeholder behind it."""
        del self.token_ids[index + 1:]


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    metrics: dict
    logprobs: list | None = None
    error: str | None = None  # what went wrong, when finish_reason is "error"
    timeline: list[dict] = field(default_factory=list)  # see scheduling/timeline.py

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def explain(self) -> "Explanation":
        """Why this request took as long as it did, in plain words (and a Gantt bar in a notebook)."""
        from ..telemetry.explain import explain

        return explain(self)


@dataclass
class RequestOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    completion: Completion | None = None  # set when finished


def request_metrics(req: Request) -> dict:
    """Latency figures in seconds: time to first token, time per output token, and the phases, which
    add up to the end-to-end time: queue (waiting, first and after each preemption), prefill (running
    until the first token) and decode (running after it, recomputation after a preemption included)."""
    end = req.finish_time or time.perf_counter()
    queue = req.queue_time + (end - req.waiting_since if req.waiting_since is not None else 0.0)
    ttft = prefill = decode = tpot = None
    if req.first_token_time is not None:
        ttft = req.first_token_time - req.arrival_time
        prefill = ttft - req.queue_time_before_first_token
        decode = end - req.first_token_time - (queue - req.queue_time_before_first_token)
        if req.num_output > 1:
            tpot = (end - req.first_token_time) / (req.num_output - 1)
    return {
        "queue_time": queue,
        "prefill_time": prefill,
        "decode_time": decode,
        "time_to_first_token": ttft,
        "time_per_output_token": tpot,
        "e2e_latency": end - req.arrival_time,
        "cached_tokens": req.num_cached,  # prompt tokens reused from the prefix cache
        "preemptions": req.num_preemptions,
        "recomputed_tokens": req.num_recomputed,
    }
