"""What per-request timelines cost an engine step: timelines on vs off at one batch size, in two
workloads: steady decode (the median step, as bench/throughput.py times it) and churn (requests
admitted, prefilled in chunks and finished all the time: where timelines record the most).

    python bench/timeline_overhead.py [--device cpu] [--batch 128]          # tiny random Llama
    python bench/timeline_overhead.py --device cuda --shape llama-1b --tokenizer DIR --batch 128

"Off" disables the recorder (`engine.scheduler.timelines.enabled = False`); the one check per
running request that tells a prefill chunk from a decode stays, so "off" is the engine with the
recording removed. Rounds alternate on and off; the best of each is reported (noise on a shared
machine is larger than the effect).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightllm_nb import Engine
from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.scheduling.decisions import Decision
from lightllm_nb.scheduling.request import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import add_model_options, bench_engine, decode_latency, model_label  # noqa: E402


def churn_step_time(engine: Engine, batch: int, requests: int, seed: int = 0) -> tuple[float, int, int]:
    """Mean step time over a run of `requests` short requests (random prompt and output lengths),
    `batch` at a time; with the number of steps and of timeline entries (the same schedule on and off)."""
    rng = np.random.default_rng(seed)
    for _ in range(requests):
        engine.add_request(prompt_token_ids=rng.integers(0, 30000, int(rng.integers(32, 256))).tolist(),
                           sampling=SamplingParams(temperature=0, ignore_eos=True,
                                                   max_tokens=int(rng.integers(4, 48))))
    entries = steps = 0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.completion is not None:
                entries += len(out.completion.timeline)
        steps += 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, steps, entries


def entry_cost(recorder, repeats: int = 20000) -> float:
    """Seconds per timeline entry (a deferral update, the commonest, and a new entry), measured alone:
    with the entries per step this bounds the recording's share of a step whatever the noise."""
    req = Request("probe", [1, 2, 3], SamplingParams())
    defer = Decision("defer", "probe", "no_room", {"need": 10, "free": 3})
    start = time.perf_counter()
    for _ in range(repeats):
        recorder.prefill(req, 8)
        recorder.deferred(req, defer)
    return (time.perf_counter() - start) / (2 * repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=256, help="steady decode: prompt length")
    parser.add_argument("--requests", type=int, default=0, help="churn: requests per run (default 4 x batch)")
    parser.add_argument("--kv-tokens", type=int, default=131072)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    requests = args.requests or 4 * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp, kv_tokens=args.kv_tokens, max_running=args.batch,
                              max_batch_tokens=max(2048, args.batch))
    recorder = engine.scheduler.timelines
    decode = {True: float("inf"), False: float("inf")}
    churn = {True: (float("inf"), 0, 0), False: (float("inf"), 0, 0)}
    churn_step_time(engine, args.batch, args.batch)  # warm-up: first-call costs go to neither side
    for round_ in range(args.rounds):
        for enabled in ((True, False) if round_ % 2 == 0 else (False, True)):
            recorder.enabled = enabled
            decode[enabled] = min(decode[enabled], decode_latency(engine, args.batch, args.context, steps=40))
            churn[enabled] = min(churn[enabled], churn_step_time(engine, args.batch, requests))
    recorder.enabled = True
    per_entry = entry_cost(recorder)
    engine.close()
    print(f"\n{args.device}, {model_label(args)}, batch {args.batch}: step time with "
          "per-request timelines on vs off, best of rounds")
    on, off = decode[True], decode[False]
    print(f"  steady decode (context {args.context})   on {on * 1e3:8.3f} ms  off {off * 1e3:8.3f} ms  "
          f"({100 * (on - off) / off:+.2f}%)")
    (on, steps, entries), (off, steps_off, _) = churn[True], churn[False]
    print(f"  churn ({requests} requests, {steps} steps, {entries} timeline entries)   on {on * 1e3:8.3f} ms  "
          f"off {off * 1e3:8.3f} ms  ({100 * (on - off) / off:+.2f}%)")
    print(f"  recording alone: {per_entry * 1e6:.2f} us per entry x {entries / steps:.1f} entries per churn step = "
          f"{per_entry * entries / steps * 1e6:.1f} us per step ({100 * per_entry * entries / steps / off:.3f}% of "
          f"the churn step); steady decode records nothing")
    if steps != steps_off:
        print(f"  note: {steps} steps on vs {steps_off} off: the schedules differed")


if __name__ == "__main__":
    main()
