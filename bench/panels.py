"""What a live Dashboard costs the engine, and how many messages it sends the browser.

    python bench/panels.py [--model demo] [--device cpu] [--batch 8] [--context 64] [--kv-tokens N]
    python bench/panels.py --device cuda --shape llama-1b --tokenizer DIR --batch 128 --context 512

Median decode-step time on the driver-loop thread with no panel and with a Dashboard following
the engine (KV grid with pages, batch bars, decisions, sparklines), interleaved rounds, best of
each; the Dashboard's comm messages per second per view while the steps run; the step thread's
own time handing events over (its mean counts the page-map copies a median step hides); and the
time one render of the KV grid takes at this pool size (on the panel's own thread, competing for
the GIL).
Comm messages are recorded in process instead of going to a kernel's iopub socket, so the send
itself costs a little less here than in a notebook. On the GPU, leave --kv-tokens out: the pool is
then sized from free memory (millions of token slots for the 1B shape).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import comm
import numpy as np
from comm.base_comm import BaseComm

from lightllm_nb import Engine
from lightllm_nb.notebook.panels import Dashboard
from lightllm_nb.notebook.panels.parts import KVPart
from lightllm_nb.telemetry.events import StepEvent

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser, default_model="demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kv-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid-slots", type=int, default=1_000_000, help="pool size of the synthetic render timing")
    args = parser.parse_args()
    front_end = FrontEndLog()
    comm.create_comm = front_end.make_comm  # this script's own process: nothing else uses comms here
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
