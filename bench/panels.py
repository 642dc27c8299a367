"""What a live Dashboard costs the engine, and how many messages it sends the browser.

    python bench/panels.py [--model demo] [--device cpu] [--batch 8] [--context 64] [--kv-tokens N]
    python bench/panels.py --device cuda --shape llama-1b --tokenizer DIR --batch 128 --context 512
    python bench/panels.py --host-only --batch 128 --context 512 --kv-tokens 3740555

Median decode-step time on the driver-loop thread with no panel and with a Dashboard following
the engine (KV grid with pages, batch bars, decisions, sparklines), interleaved rounds, best of
each; the Dashboard's comm messages per second per view while the steps run; the step thread's
own time handing events over (its mean counts the page-map copies a median step hides); and the
time one render of the KV grid takes at this pool size (on the panel's own thread, competing for
the GIL).
Comm messages are recorded in process instead of going to a kernel's iopub socket, so the send
itself costs a little less here than in a notebook. On the GPU, leave --kv-tokens out: the pool is
then sized from free memory (millions of token slots for the 1B shape).

--host-only: no model. The step as the host sees it when the GPU step is host-bound: a real KVPool
(page size 1, tiny K/V) whose requests take a page each a step, --host-work ms of Python standing
in for the step's launches and bookkeeping, then the engine's own event hand-over; step time with
no panel and with a Dashboard, the hand-over's own time, and the full GC collections during each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import comm
import numpy as np
import torch
from comm.base_comm import BaseComm

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.engine.step_outputs import StepOutputs
from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.notebook.panels import Dashboard
from lightllm_nb.notebook.panels.parts import KVPart
from lightllm_nb.scheduling.request import Request
from lightllm_nb.telemetry.events import StepEvent
from lightllm_nb.telemetry.hub import EventHub
from lightllm_nb.telemetry.step_rows import batch_rows
from lightllm_nb.telemetry.step_totals import StepTotals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import add_model_options, bench_engine, decode_latency  # noqa: E402


class FrontEndLog:
    """Stands in for the kernel's comm layer: counts what each widget sends."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent: list[tuple[str, float]] = []

    def make_comm(self, *args, **kwargs):
        log = self

        class CountingComm(BaseComm):
            def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
                if msg_type == "comm_msg":
                    with log.lock:
                        log.sent.append((self.comm_id, time.monotonic()))

        return CountingComm(*args, **kwargs)

    def rate(self, comm_id: str, start: float, end: float) -> float:
        with self.lock:
            return sum(1 for c, t in self.sent if c == comm_id and start <= t <= end) / (end - start)


class PublishTimer:
    """Times the step thread's hand-over of each StepEvent (the event, its KV holders and the
    EventHub.publish with its page-map copies), the part of a panel's cost that the step itself
    pays besides capturing its batch rows (a few microseconds)."""

    def __init__(self, engine: Engine):
        self.times: list[float] = []
        hub, publish = engine._events, engine._publish

        def timed(*args, **kwargs):
            if not hub:  # a step without subscribers: nothing is handed over
                return publish(*args, **kwargs)
            started = time.perf_counter()
            publish(*args, **kwargs)
            self.times.append(time.perf_counter() - started)

        engine._publish = timed  # this instance only, for the whole run

    def line(self) -> str:
        t = sorted(self.times)
        return (f"  step thread handing over events with a Dashboard: mean {1e3 * sum(t) / len(t):.3f} ms a step, "
                f"median {1e3 * t[len(t) // 2]:.3f}, max {1e3 * t[-1]:.2f} ms ({len(t)} steps)")


def render_cost(engine: Engine, repeats: int = 20) -> float:
    """Seconds for one KV grid render (aggregate, diff, send) of the pool as it is now, from scratch
    (a new panel: every cell computed and sent)."""
    events = []
    unsubscribe = engine.subscribe(events.append, pages=True)
    engine.driver().call(lambda: None).result()
    engine.generate(["one more step"], None)
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    unsubscribe()
    times = []
    for _ in range(repeats):
        part = KVPart()
        part.consume(events[-1])
        t = time.perf_counter()
        part.render()
        times.append(time.perf_counter() - t)
        part.view.close()
    return sorted(times)[len(times) // 2]


def synthetic_render_cost(slots: int, repeats: int = 10, decode: bool = False) -> float:
    """One KV grid render for a made-up pool of `slots` pages, 60% held by 256 requests, where
    1% of the pages change owner between renders, anywhere (the worst case: every cell changes),
    or (`decode`) each request takes the next free page (a decode step at page size 1)."""
    rng = np.random.default_rng(0)
    pages = np.full(slots, -1, dtype=np.int32)
    pages[: int(slots * 0.6)] = rng.integers(0, 256, int(slots * 0.6))
    part = KVPart()
    template = StepEvent(step=0, time=0.0, duration=0.0, rows=[], decisions=[], kv_capacity=slots, kv_free=slots // 3,
                         kv_cached=0, running=256, waiting=0, page_size=1)
    part.consume(replace(template, page_owner=pages.copy()))
    part.render()
    times = []
    for step in range(1, repeats + 1):
        if decode:
            taken = np.flatnonzero(pages == -1)[:256]
            pages[taken] = np.arange(len(taken))
        else:
            changed = rng.integers(0, slots, slots // 100)
            pages[changed] = rng.integers(-1, 256, len(changed))
        part.consume(replace(template, step=step, page_owner=pages.copy()))
        t = time.perf_counter()
        part.render()
        times.append(time.perf_counter() - t)
    part.view.close()
    return sorted(times)[len(times) // 2]


class HostOnlyEngine(StepOutputs):
    """An engine's step without a model: `batch` requests each take a page of a real KVPool a step
    (one in 64 is replaced by a new request of `context` tokens once it has decoded 200), `work`
    seconds of Python stand in for the rest of the step's host time, and the events are handed over
    as Engine._run_step and StepOutputs._publish do."""

    def __init__(self, pages: int, batch: int, context: int):
        self.pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=pages, page_size=1,
                           max_requests=batch, max_context=context + 4096, dtype=torch.float16,
                           device=torch.device("cpu"))
        self.scheduler = SimpleNamespace(running=[], waiting=[], reclaimable_tokens=0,
                                         pool_view=lambda: SimpleNamespace(free=self.pool.free_tokens))
        self._events, self._step, self._start = EventHub(), 0, time.perf_counter()
        self._totals, self._batch = StepTotals(), None
        self.context, self._admitted = context, 0
        self.scheduler.running = [self._admit(self.pool.alloc_row()) for _ in range(batch)]

    def _admit(self, row: int) -> Request:
        self._admitted += 1
        req = Request(f"req-{self._admitted}", list(range(self.context)), SamplingParams(max_tokens=10**6))
        req.row, req.pages, req.num_computed = row, self.pool.alloc_pages(self.context, row), self.context
        return req

    def step(self, work: float) -> tuple[float, float]:
        """Seconds of the whole step and of its event hand-over."""
        started = time.perf_counter()
        running = self.scheduler.running
        items = [(req, 1) for req in running]
        rows = batch_rows(items) if self._events else []
        handover = time.perf_counter() - started
        self._batch = items  # as Engine._run_step at schedule time (it lets go of the last step's batch here)
        while time.perf_counter() < started + work:
            sum(range(50))
        for req in running:
            req.pages += self.pool.alloc_pages(1, req.row)
            req.num_computed += 1
        slot = self._step % 64
        if running[slot].num_computed >= self.context + 200:
            self.pool.free_pages(running[slot].pages)
            running[slot] = self._admit(running[slot].row)
        before_publish = time.perf_counter()
        self._publish(started, rows, [])
        now = time.perf_counter()
        return now - started, handover + now - before_publish


def host_only(args: argparse.Namespace) -> None:
    engine = HostOnlyEngine(args.kv_tokens or 3_740_555, args.batch, args.context)
    full_gcs = []
    gc.callbacks.append(lambda phase, info: full_gcs.append(1) if phase == "stop" and info["generation"] == 2 else None)
    results = {"no panel": [], "Dashboard": []}
    for round_ in range(args.rounds):  # interleaved, best of each
        for name in results if round_ % 2 == 0 else reversed(results):
            dashboard = Dashboard(engine._events) if name == "Dashboard" else None
            for _ in range(100):  # its first render (every cell) before the timing
                engine.step(args.host_work / 1e3)
            time.sleep(1.0)
            full_gcs.clear()
            times = [engine.step(args.host_work / 1e3) for _ in range(args.steps)]
            results[name].append(([t for t, _ in times], [h for _, h in times], len(full_gcs)))
            if dashboard is not None:
                dashboard.close()
    print(f"\nhost only, {engine.pool.num_pages:,} KV pages, batch {args.batch}, {args.host_work} ms of host work a "
          f"step, {args.steps} steps a round, best of {args.rounds} rounds")
    base = {"median": None, "mean": None}
    for name, rounds in results.items():
        median = min(statistics.median(steps) for steps, _, _ in rounds)
        mean = min(statistics.fmean(steps) for steps, _, _ in rounds)
        base = base if base["median"] else {"median": median, "mean": mean}
        handover = min(statistics.median(h) for _, h, _ in rounds)
        handover_mean = min(statistics.fmean(h) for _, h, _ in rounds)
        print(f"  {name:<10} step median {median * 1e3:.3f} ms ({100 * (median / base['median'] - 1):+.1f}%), "
              f"mean {mean * 1e3:.3f} ms ({100 * (mean / base['mean'] - 1):+.1f}%); hand-over median "
              f"{handover * 1e6:.1f} us, mean {handover_mean * 1e6:.1f} us; full GCs a round "
              f"{[gcs for _, _, gcs in rounds]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default_model="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kv-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid-slots", type=int, default=1_000_000, help="pool size of the synthetic render timing")
    parser.add_argument("--host-only", action="store_true", help="no model: the step's host side (see above)")
    parser.add_argument("--host-work", type=float, default=1.9, help="--host-only: ms of Python a step")
    args = parser.parse_args()
    front_end = FrontEndLog()
    comm.create_comm = front_end.make_comm  # this script's own process: nothing else uses comms here
    if args.host_only:
        return host_only(args)
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp, kv_tokens=args.kv_tokens)
    loop = engine.driver()
    best = {"no panel": float("inf"), "Dashboard": float("inf")}
    rates: dict[str, float] = {}
    publish = PublishTimer(engine)
    for round_ in range(args.rounds):  # interleaved, best of each: the noise is larger than the effect
        for name in best if round_ % 2 == 0 else reversed(best):
            dashboard = Dashboard(engine) if name == "Dashboard" else None
            start = time.monotonic()
            step = loop.call(lambda: decode_latency(engine, args.batch, args.context, steps=args.steps)).result()
            end = time.monotonic()
            best[name] = min(best[name], step)
            if dashboard is not None:
                for part in dashboard.parts:
                    view = type(part.view).__name__
                    rates[view] = max(rates.get(view, 0.0), front_end.rate(part.view.comm.comm_id, start, end))
                dashboard.close()
    publish_line = publish.line()  # steps without subscribers are not counted: these are the Dashboard's
    render = render_cost(engine)
    stats = engine.stats()
    engine.close()
    base = best["no panel"]
    print(f"\n{stats['model']} on {args.device}, batch {args.batch}, context {args.context}, "
          f"{stats['kv_capacity_tokens']:,} KV token slots: median decode step, best of {args.rounds} rounds")
    for name, t in best.items():
        print(f"  {name:<10} step {t * 1e3:9.3f} ms ({100 * (t - base) / base:+5.1f}%)")
    print("  front-end messages per second while stepping (the most in any round):")
    for view, r in rates.items():
        print(f"    {view:<16} {r:5.1f}/s")
    print(publish_line)
    print(f"  one KV grid render at this pool size: {render * 1e3:.2f} ms (panel thread; at most 10 a second)")
    print(f"  one KV grid render of a {args.grid_slots:,}-slot pool, 1% of pages changed: "
          f"{synthetic_render_cost(args.grid_slots) * 1e3:.2f} ms")
    print(f"  one KV grid render of a {args.grid_slots:,}-slot pool after a decode step of 256 requests: "
          f"{synthetic_render_cost(args.grid_slots, decode=True) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
