"""Replay a request trace through the real Scheduler and KVPool with no model: each step costs
what a cost model says, so admission policies can be compared on a CPU in seconds.

Everything a policy sees is real: the same Scheduler code admits, chunks prefills, grows
requests and preempts, against a real (tiny: one layer, one head, head_dim 1) KV pool. Only the
forward pass is replaced, by a clock that advances by the step's modelled cost, and sampling, by
a dummy token; each request ends when it reaches the output length its trace gave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..scheduling.admission import AdmissionPolicy
from ..kv.kv_pool import KVPool
from ..scheduling.request import Request
from ..sampling_params import SamplingParams
from ..scheduling.scheduler import Scheduler
from .workloads import TraceRequest

DUMMY_TOKEN = 0


@dataclass(frozen=True)
class StepCost:
    """Seconds one batched step takes: a fixed part (weights read once, launches) plus parts
    proportional to prompt tokens computed, decode rows and context tokens attended.

    Defaults: roughly Llama-3.1-8B on one H100 (see shared/ANCHORS.md). Decode with CUDA graphs
    is 7.0 ms at batch 1 and 11.8 ms at batch 128 (LightLLM blog, H800), so about 7 ms fixed and
    ~35 us a row; attention reads 128 KiB of KV per context token at ~3.0 TB/s, ~0.044 us a
    token; prefill is compute bound, 16 GFLOP a token at about half of ~800 TFLOP/s, ~40 us.
    """

    fixed: float = 7.0e-3
    per_prefill_token: float = 40e-6
    per_decode_row: float = 35e-6
    per_context_token: float = 0.044e-6

    def __call__(self, prefill_tokens: int, decode_rows: int, context_tokens: int) -> float:
        return (self.fixed + self.per_prefill_token * prefill_tokens + self.per_decode_row * decode_rows
                + self.per_context_token * context_tokens)


@dataclass
class RequestRecord:
    """What happened to one request, in seconds since the trace started."""

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    preemptions: int = 0
    last_token: float | None = None
    longest_gap: float = 0.0       # longest wait between two of its output tokens: a visible stall

    @property
    def queueing(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time between output tokens after the first (0 for one-token outputs)."""
        if self.first_token is None or self.finished is None:
            return None
        return (self.finished - self.first_token) / max(self.output_len - 1, 1)


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration: float = 0.0      # simulated seconds from the first arrival to the last finish
    busy: float = 0.0          # simulated seconds spent running steps
    steps: int = 0
    kv_token_seconds: float = 0.0  # KV tokens in use, integrated over busy time
    kv_capacity: int = 0
    pool_whole: bool = False   # every KV page and row was returned at the end

    @property
    def mean_kv_used(self) -> float:
        """Fraction of the KV pool in use, averaged over the time steps ran."""
        return self.kv_token_seconds / (self.busy * self.kv_capacity) if self.busy else 0.0


def simulate(trace: list[TraceRequest], policy: AdmissionPolicy, *, kv_tokens: int, page_size: int = 1,
             max_batch_tokens: int = 2048, max_running: int = 256, cost: StepCost = StepCost(),
             clients: int | None = None, seed: int = 0, max_steps: int = 10_000_000, progress=None) -> SimResult:
    """Run `trace` to completion under `policy`. `progress`, if given, is called with the number
    of requests that finished in each step (a tqdm bar's `update` fits).

    `clients=None` is an open loop: requests arrive at their trace times whatever the server does.
    `clients=N` is a closed loop, as in LightLLM's own overload benchmark: N clients each send
    their next request (in trace order) the moment their previous one finishes, so the trace's
    arrival times are ignored and a request's arrival is when its client sent it.
    """
    if not trace:
        raise ValueError("the trace is empty: give at least one request")
    if clients is not None and clients < 1:
        raise ValueError(f"clients={clients} is invalid: a closed loop needs at least 1 client")
    max_context = max(t.prompt_len + t.max_tokens for t in trace)
    if max_context > kv_tokens:
        raise ValueError(f"a request may need {max_context} KV tokens but kv_tokens={kv_tokens}: "
                         f"raise kv_tokens or lower max_tokens")
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=kv_tokens, page_size=page_size,
                  max_requests=max_running, max_context=max_context, dtype=torch.float16,
                  device=torch.device("cpu"))
    scheduler = Scheduler(pool, policy, max_batch_tokens=max_batch_tokens, max_running=max_running)
    rng = np.random.default_rng(seed)
    pending = sorted(trace, key=lambda t: t.arrival)
    records = {t.request_id: RequestRecord(t.request_id, t.arrival, t.prompt_len, t.output_len) for t in pending}
    result = SimResult(records=list(records.values()), kv_capacity=pool.capacity)
    clock, arrived, outstanding = (0.0 if clients else pending[0].arrival), 0, 0
    while arrived < len(pending) or scheduler.has_work():
        while arrived < len(pending) and (outstanding < clients if clients else pending[arrived].arrival <= clock):
            t, record = pending[arrived], records[pending[arrived].request_id]
            if clients:
                record.arrival = clock
            # Random prompt ids: distinct prompts, so a prefix cache finds no accidental hits.
            prompt = rng.integers(1, 30_000, t.prompt_len).tolist()
            scheduler.add(Request(t.request_id, prompt, SamplingParams(max_tokens=t.max_tokens, ignore_eos=True),
                                  arrival_time=record.arrival))
            arrived += 1
            outstanding += 1
        batch = scheduler.schedule()
        if not batch:
            if scheduler.running or arrived == len(pending) or clients:
                raise RuntimeError(f"the scheduler made no progress at step {result.steps} with "
                                   f"{len(scheduler.waiting)} waiting: {batch.decisions[-1:]}")
            clock = pending[arrived].arrival  # idle until the next request arrives
            continue
        for d in batch.decisions:
            if d.kind == "admit":
                records[d.request_id].admitted = clock
        step_time = _step_time(batch.items, cost)
        clock += step_time
        result.busy += step_time
        result.kv_token_seconds += (pool.capacity - pool.free_tokens) * step_time
        result.steps += 1
        if result.steps > max_steps:
            raise RuntimeError(f"the simulation passed max_steps={max_steps}: requests are not finishing")
        finished = _advance(batch.items, scheduler, records, clock)
        outstanding -= finished
        if progress is not None and finished:
            progress(finished)
    result.duration = clock - min(r.arrival for r in result.records)
    result.pool_whole = pool.is_whole()
    return result


def _step_time(items: list[tuple[Request, int]], cost: StepCost) -> float:
    decode_rows = sum(1 for r, n in items if n == 1 and r.is_decoding)
    # Everything else is prompt work: first prefills, their chunks, and recomputation after preemption.
    prefill_tokens = sum(n for r, n in items if not (n == 1 and r.is_decoding))
    context_tokens = sum(r.num_computed + n for r, n in items)
    return cost(prefill_tokens, decode_rows, context_tokens)


def _advance(items: list[tuple[Request, int]], scheduler: Scheduler, records: dict[str, RequestRecord],
             now: float) -> int:
    """The step's tokens are computed: requests at the end of their tokens sample one, and those
    that reach their trace's output length finish. Returns how many finished."""
    finished = 0
    for req, n in items:
        req.num_computed += n
        if req.num_uncomputed:
            continue  # a prefill chunk short of the end samples nothing
        req.token_ids.append(DUMMY_TOKEN)
        record = records[req.request_id]
        if record.first_token is None:
            record.first_token = now
        else:
            record.longest_gap = max(record.longest_gap, now - record.last_token)
        record.last_token = now
        if req.num_output >= record.output_len:
            scheduler.finish(req, "length" if req.num_output >= req.sampling.max_tokens else "stop")
            record.finished = now
            record.preemptions = req.num_preemptions
            finished += 1
    return finished
