"""What StepEvents cost an engine step: no subscribers, 1 and 8 panel-like readers (each on its own
thread, redacting for a user), one that asks for KV pages, and a JSONL trace.

    python bench/telemetry_overhead.py [--model DIR] [--device cpu|cuda] [--batch 64] [--kv-tokens 65536]
    python bench/telemetry_overhead.py --device cuda --shape llama-1b --tokenizer DIR --batch 128 --context 512

The step runs on the engine's driver-loop thread, as served: events leave it through bounded
queues, and the readers' work (redaction, JSON) competes only for the GIL. On the GPU use a real
model folder (e.g. the Llama-3.2-1B shape) to see the overhead against a real step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from lightllm_nb import Engine
from lightllm_nb.telemetry.traces import TraceRecorder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import decode_latency  # noqa: E402  (the same median-step measurement as on the GPU)


def start_readers(engine: Engine, count: int, pages: bool) -> list:
    """`count` subscriptions, each drained by a thread as a panel would (redacted for one user)."""
    subscriptions = [engine.driver().subscribe(user=f"viewer{i}", pages=pages) for i in range(count)]
    for sub in subscriptions:
        threading.Thread(target=lambda s=sub: [None for _ in s], daemon=True).start()
    return subscriptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a HF folder; default: a tiny random Llama made here")
    parser.add_argument("--shape", default=None, help="CUDA only: random bf16 weights of this shape (bench/roofline.py)")
    parser.add_argument("--tokenizer", default=None, help="with --shape: a tokenizer folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.shape is not None:
            from roofline import SHAPES
            from throughput import random_checkpoint
            from transformers import AutoTokenizer

            model, _ = random_checkpoint(dict(SHAPES[args.shape], _shape=args.shape),
                                         AutoTokenizer.from_pretrained(args.tokenizer))
        elif model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import make_tiny_model

            from lightllm_nb.loading import load_checkpoint

            make_tiny_model("llama", tmp, load_checkpoint("demo").tokenizer)
            model = tmp
        engine = Engine(model, device=args.device, kv_tokens=args.kv_tokens, max_running=args.batch,
                        max_batch_tokens=max(2048, args.batch), progress=False)
        loop = engine.driver()
        settings = {
            "0 subscribers": lambda: ([], []),
            "1 subscriber": lambda: (start_readers(engine, 1, False), []),
            "8 subscribers": lambda: (start_readers(engine, 8, False), []),
            "1 with KV pages": lambda: (start_readers(engine, 1, True), []),
            "JSONL trace": lambda: ([], [engine.subscribe(TraceRecorder(Path(tmp) / "trace.jsonl"))]),
        }
        results = {name: float("inf") for name in settings}
        dropped = {name: 0 for name in settings}
        for _ in range(args.rounds):  # interleaved rounds, best of each: the noise is larger than the effect
            for name, start in settings.items():
                subscriptions, undo = start()
                step = loop.call(lambda: decode_latency(engine, args.batch, args.context, steps=40)).result()
                results[name] = min(results[name], step)
                time.sleep(0.05)
                for sub in subscriptions:
                    dropped[name] += sub.dropped
                    sub.close()
                for u in undo:
                    u()
        engine.close()
    base = results["0 subscribers"]
    print(f"\n{args.device}, batch {args.batch}, context {args.context}, {args.kv_tokens} KV tokens: median step "
          "on the driver-loop thread, best of rounds")
    for name, t in results.items():
        print(f"  {name:<16} step {t * 1e3:8.3f} ms ({100 * (t - base) / base:+5.1f}%)   events dropped {dropped[name]}")


if __name__ == "__main__":
    main()
