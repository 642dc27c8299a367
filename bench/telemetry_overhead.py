"""What StepEvent subscribers cost an engine step: the median decode step with 0, 1 and 8 event
subscribers (issue 8's target: 8 subscribers cost at most 3%).

    python bench/telemetry_overhead.py --batch 16 --context 64 --kv-tokens 16384    # CPU, tiny random Llama
    python bench/telemetry_overhead.py --device cuda --shape llama-1b --tokenizer DIR --batch 128 \\
        --context 512 --rounds 6 [--switch-intervals 5 0.5]
    python bench/telemetry_overhead.py --served --api-server-count 1 --model demo --batch 4 --context 32
    python bench/telemetry_overhead.py --served --api-server-count 1 --device cuda --shape llama-1b \\
        --tokenizer DIR --batch 128 --context 512

`--served` times it as served (`telemetry_served.py`): `lightllm-nb serve` under a steady decode load
and a probe on the event websocket reading each StepEvent's own `duration`, alone and with 8 more
websocket subscribers (other users, one with pages).

Each subscriber is what the event stream (`GET /api/events`) serves a notebook: a subscription
through the driver loop, drained on its own thread into its user's view and the stream's record
(`serving/event_records.py`: made once per view for all readers); one of the 8 also asks for the
KV page map, as a KV grid does, without a rate cap: it gets a map at most hub.PAGE_MAPS_PER_SECOND
(each map is copied by changed blocks on the step thread, then joined and turned into bytes on its
reader's: that cost grows with the pool, so leave --kv-tokens out on the GPU to time the pool a
server has, or give a GPU's 3,740,555 on a CPU). The step runs on the
driver-loop thread, as served: events leave it through bounded queues, so the readers compete with
it only for the GIL. Rounds are interleaved (every other round in reverse order) and each setting's
best round is reported, with every round's ratio to 0 subscribers (the same round) and their
median: noise on a shared machine is larger than the effect. `--switch-intervals` times each
setting under several GIL switch intervals (how long the loop thread may wait for the GIL behind a
busy reader), interleaved the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from lightllm_nb import DriverLoop, EventSubscription
from lightllm_nb.serving.event_records import EventRecords

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import add_model_options, bench_engine, decode_latency, model_label  # noqa: E402

SUBSCRIBERS = (0, 1, 8)
TARGET = 1.03  # issue 8: 8 subscribers' step at most 3% slower than none


def stream_events(subscription: EventSubscription, user: str, records: EventRecords) -> None:
    """The event stream's work per event, off the step thread: the user's view and its record (the
    JSON text and, where asked for, the page map's bytes), made once per view for all readers."""
    for event in subscription:
        records.record(records.view(event, user), subscription.dropped)


def subscribe(loop: DriverLoop, count: int) -> list[EventSubscription]:
    """`count` viewers, each drained by its own thread; with several, the first also takes pages."""
    records = EventRecords()  # one server's
    subscriptions = [loop.subscribe(pages=count > 1 and i == 0) for i in range(count)]
    for i, subscription in enumerate(subscriptions):
        threading.Thread(target=stream_events, args=(subscription, f"viewer{i}", records), daemon=True).start()
    return subscriptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--served", action="store_true", help="time `lightllm-nb serve` (telemetry_served.py)")
    parser.add_argument("--api-server-count", type=int, default=1, help="with --served: serve's front-end processes")
    parser.add_argument("--seconds", type=float, default=4.0, help="with --served: probe time per setting per round")
    parser.add_argument("--output-len", type=int, default=256, help="with --served: tokens per load request")
    parser.add_argument("--viewer-rate", type=float, default=None,
                        help="with --served: the 8 extra readers ask for at most this many events a second")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per round")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="KV pool size (default: as served, from free GPU memory or the CPU budget)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-intervals", type=float, nargs="+", default=[sys.getswitchinterval() * 1e3],
                        metavar="MS", help="the interpreter's GIL switch intervals to time, in ms (default: "
                                           "this interpreter's); each is compared with 0 subscribers at the same")
    args = parser.parse_args()
    if args.served:
        from telemetry_served import run_served

        return run_served(args, SUBSCRIBERS[-1], TARGET)
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp, kv_tokens=args.kv_tokens, max_running=args.batch,
                              max_batch_tokens=max(2048, args.batch))
    loop = engine.driver()
    settings = [(interval, count) for interval in args.switch_intervals for count in SUBSCRIBERS]
    steps = {setting: [] for setting in settings}
    dropped = dict.fromkeys(settings, 0)
    for round_ in range(args.rounds):
        for interval, count in settings if round_ % 2 == 0 else settings[::-1]:
            subscriptions = subscribe(loop, count)
            sys.setswitchinterval(interval / 1e3)
            steps[interval, count].append(loop.call(
                lambda: decode_latency(engine, args.batch, args.context, steps=args.steps)).result())
            time.sleep(0.05)  # let the readers catch up before counting what they lost
            for subscription in subscriptions:
                dropped[interval, count] += subscription.dropped
                subscription.close()
    kv_tokens = engine.stats()["kv_capacity_tokens"]
    engine.close()
    print(f"\n{model_label(args)} on {args.device}, batch {args.batch}, context {args.context}, {kv_tokens:,} KV tokens: "
          f"median decode step on the driver-loop thread, best of {args.rounds} interleaved rounds")
    print(f"{'switch ms':>9} | {'subscribers':>11} | {'step ms':>9} | {'vs 0':>6} | {'vs 0, median round':>18} | "
          f"{'events dropped':>14} | vs 0, each round")
    for (interval, count), times in steps.items():
        base = steps[interval, 0]
        each = [t / b for t, b in zip(times, base)]
        print(f"{interval:9.2f} | {count:>11} | {min(times) * 1e3:9.3f} | {min(times) / min(base):6.3f} | "
              f"{statistics.median(each):18.3f} | {dropped[interval, count]:>14} | {' '.join(f'{r:.3f}' for r in each)}")
    print(f"target (issue 8): 8 subscribers at most {TARGET:.2f} x the step with none")


if __name__ == "__main__":
    main()
