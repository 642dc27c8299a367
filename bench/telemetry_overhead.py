"""What recording StepEvents costs per engine step: off, events, events with KV pages, a JSONL trace.

    python bench/telemetry_overhead.py [--model DIR] [--batch 64] [--kv-tokens 65536]

The host work of an event (rows, decisions, page owners) is the same on any device, so this runs
on the CPU with a small model whose steps are short enough for the overhead to show.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.telemetry.events import BatchRow, TraceRecorder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import decode_latency  # noqa: E402  (the same median-step measurement as on the GPU)


def event_cost(engine: Engine, batch: int, subscribers, repeats: int = 200) -> float:
    """Seconds to describe one step of `batch` running requests to these subscribers."""
    rng = random.Random(1)
    rids = [engine.add_request(prompt_token_ids=[rng.randrange(3, 30000) for _ in range(64)],
                               sampling=SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
            for _ in range(batch)]
    engine.step()
    undo = [engine.subscribe(cb, pages=pages) for cb, pages in subscribers]
    items = [(r, 1) for r in engine.scheduler.running]
    t = time.perf_counter()
    for _ in range(repeats):
        started = time.perf_counter()
        rows = [BatchRow(r.request_id, r.user, "decode", n, r.num_computed + n)
                for r, n in items] if engine._events else []
        engine._publish(started, rows, [])
    cost = (time.perf_counter() - t) / repeats
    for u in undo:
        u()
    for rid in rids:
        engine.abort(rid)
    engine.step()
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a HF folder; default: a tiny random Llama made here")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import make_tiny_model

            from lightllm_nb.loading import load_checkpoint

            make_tiny_model("llama", tmp, load_checkpoint("demo").tokenizer)
            model = tmp
        engine = Engine(model, device="cpu", kv_tokens=args.kv_tokens, max_running=args.batch, progress=False)
        recorder = TraceRecorder(Path(tmp) / "trace.jsonl")
        settings = {"off": [], "events": [(lambda e: None, False)],
                    "events + KV pages": [(lambda e: None, True)], "JSONL trace": [(recorder, False)]}
        results = {name: float("inf") for name in settings}
        for _ in range(3):  # interleaved rounds, best of three: the CPU's noise is larger than the effect
            for name, subscribers in settings.items():
                undo = [engine.subscribe(cb, pages=pages) for cb, pages in subscribers]
                results[name] = min(results[name], decode_latency(engine, args.batch, 64, steps=40))
                for u in undo:
                    u()
        per_event = {name: event_cost(engine, args.batch, subscribers) for name, subscribers in settings.items()}
        recorder.close()
        engine.close()
    base = results["off"]
    print(f"\nbatch {args.batch}, {args.kv_tokens} KV pages (page_size 1): median step, and the host time of "
          "describing one step (rows + event + delivery), timed directly")
    for name, t in results.items():
        print(f"  {name:<18} step {t * 1e3:7.3f} ms ({(t - base) * 1e6:+6.0f} us)   event {per_event[name] * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
