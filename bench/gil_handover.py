"""What busy event readers cost a step through the GIL alone, without a GPU: issue 8's mechanism
on the CPU.

    python bench/gil_handover.py [--readers 8] [--rows 128] [--intervals 5 0.5]

A stand-in for the driver-loop thread runs "steps" shaped like an overlapped GPU step: short
Python bursts (launching kernels; every torch call drops and retakes the GIL) and one GIL-free
wait (reading back the previous tokens), then publishes a StepEvent of `--rows` decode rows
through an EventHub. Each reader does what the event stream does with it: its subscription
redacts it for its own user, then the JSON record. When the loop thread wants the GIL back it can
wait up to the interpreter's switch interval behind a busy reader. Prints the median step with
the readers under each switch interval against the same process's step with no readers; rounds
interleave (every other round reversed) because the machine is shared: median [min-max] over
rounds. Before/after a change to the telemetry code: run it once per tree, alternately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from lightllm_nb.telemetry.events import BatchRow, KVHolder, StepEvent  # noqa: E402
from lightllm_nb.telemetry.hub import EventHub, EventSubscription  # noqa: E402


def spin(seconds: float) -> None:
    """Pure Python that holds the GIL (checking the clock lets the interpreter switch)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def step(bursts: int, burst_s: float, wait_s: float) -> None:
    for _ in range(bursts):
        spin(burst_s)
        time.sleep(0)  # a GIL release and retake, as a torch call or a kernel launch makes
    time.sleep(wait_s)  # the token read-back: GIL free while the GPU finishes


def decode_event(step: int, rows: int) -> StepEvent:
    """A decode step of `rows` requests spread over four users (none of them a reader's)."""
    batch = [BatchRow(f"req-{i}", f"user{i % 4}", "decode", 1, 512 + step) for i in range(rows)]
    return StepEvent(step=step, time=step * 2e-3, duration=2e-3, rows=batch, decisions=[], kv_capacity=262144,
                     kv_free=100000, kv_cached=0, running=rows, waiting=0, page_size=1,
                     kv_holders=[KVHolder(i, r.request_id, r.user, r.context) for i, r in enumerate(batch)])


def stream_events(subscription: EventSubscription) -> None:
    """The event stream's work per event: redaction (in the subscription), then the JSON record."""
    for event in subscription:
        json.dumps(dataclasses.replace(event, page_owner=None).to_dict())


def timed_steps(args, readers: int, interval_s: float) -> float:
    hub = EventHub()
    threads = [threading.Thread(target=stream_events, args=(hub.subscribe(user=f"viewer{i}"),), daemon=True)
               for i in range(readers)]
    for t in threads:
        t.start()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(args.bursts, args.burst_ms / 1e3, args.wait_ms / 1e3)
            hub.publish(decode_event(i, args.rows), lambda: np.zeros(0))
            times.append(time.perf_counter() - start)
    finally:
        sys.setswitchinterval(previous)
        hub.close()
        for t in threads:
            t.join()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=128, help="decode rows per event (the batch)")
    parser.add_argument("--intervals", type=float, nargs="+", default=[5.0, 0.5], help="switch intervals, ms")
    parser.add_argument("--bursts", type=int, default=10, help="Python bursts per step")
    parser.add_argument("--burst-ms", type=float, default=0.05)
    parser.add_argument("--wait-ms", type=float, default=1.5, help="GIL-free wait per step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = {interval: [] for interval in args.intervals}
    loaded = {interval: [] for interval in args.intervals}
    for round_ in range(args.rounds):
        for interval in args.intervals if round_ % 2 == 0 else args.intervals[::-1]:
            base[interval].append(timed_steps(args, 0, interval / 1e3))
            loaded[interval].append(timed_steps(args, args.readers, interval / 1e3))
    print(f"\nstep: {args.bursts} x {args.burst_ms} ms Python + {args.wait_ms} ms GIL-free; {args.readers} readers of "
          f"{args.rows}-row events; median step, median [min-max] over {args.rounds} interleaved rounds")
    print(f"{'switch ms':>9} | {'no readers ms':>13} | {'readers ms':>10} | x no readers")
    for interval in args.intervals:
        each = sorted(t / b for t, b in zip(loaded[interval], base[interval]))
        print(f"{interval:9.2f} | {statistics.median(base[interval]) * 1e3:13.3f} | "
              f"{statistics.median(loaded[interval]) * 1e3:10.3f} | {statistics.median(each):.2f} [{each[0]:.2f}-{each[-1]:.2f}]")


if __name__ == "__main__":
    main()
