"""Where an overlapped decode step's host time goes, and how long the GPU waits for the host.

    python bench/step_phases.py --device cuda --shape llama-1b --tokenizer DIR [--batches 1 32 128] [--json] [--kernels]
    python bench/step_phases.py --batches 1 4 --context 32 --json      # CPU smoke run, tiny random Llama

An overlapped step hides the host's work behind the GPU's only while the host is quicker. This
times each part of Engine.step on the host (schedule, prepare + launch, waiting for the previous
step's tokens, handling them, the grammar mask, queuing the sampling, publishing) by wrapping the
engine's own methods, and, on CUDA, takes the GPU's kernel timeline (torch.profiler) over the same
steps: the time no kernel ran, per step, is what the host cost. With --json every request is under
a JSON schema (bench/structured.py's long string), as issue 13's step-time rows are.
Prints JSON lines, and a table last.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import add_model_options, bench_engine, check_full_batch  # noqa: E402
from structured import LONG_TEXT  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402
from lightllm_nb.engine import inflight  # noqa: E402

PHASES = ("schedule", "runner.run", "take_inflight", "tokens_wait", "grammar_mask", "sample_on_device", "publish")


class PhaseClock:
    """Host seconds spent in each wrapped callable, summed over the steps timed."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
        return timed


def instrument(engine: Engine, clock: PhaseClock) -> None:
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.runner.run = clock.wrap("runner.run", engine.runner.run)
    engine._take_inflight = clock.wrap("take_inflight", engine._take_inflight)
    engine.grammars.mask = clock.wrap("grammar_mask", engine.grammars.mask)
    engine.sampler.sample_on_device = clock.wrap("sample_on_device", engine.sampler.sample_on_device)
    engine._publish = clock.wrap("publish", engine._publish)
    # The wait for the GPU inside take_inflight: every step makes a new InflightTokens.
    inflight.InflightTokens.tokens = clock.wrap("tokens_wait", inflight.InflightTokens.tokens)


def gpu_idle_ms(prof, steps: int) -> tuple[float, float]:
    """(busy, idle) GPU milliseconds per step between the first and the last kernel profiled."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return float("nan"), float("nan")
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = spans[-1][1] - spans[0][0]
    return busy / 1e3 / steps, (window - busy) / 1e3 / steps


def measure(engine: Engine, clock: PhaseClock, batch: int, context: int, sampling: SamplingParams,
            steps: int, profile_host: bool = False, kernels: bool = False) -> dict:
    rng = np.random.default_rng(batch)
    prefill_steps = -(-batch * context // engine.scheduler.max_batch_tokens) + batch
    sampling = dataclasses.replace(sampling, max_tokens=prefill_steps + 3 * steps + 60)
    rids = [engine.add_request(prompt_token_ids=rng.integers(0, 30000, context).tolist(), sampling=sampling)
            for _ in range(batch)]
    while engine.scheduler.waiting or any(r.num_computed < r.num_prompt for r in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    check_full_batch(engine, batch)
    cuda = engine.device.type == "cuda"
    # Plain timing first (no profiler running), then the same number of steps under the profiler.
    times = []
    clock.seconds.clear()
    clock.on = True
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    clock.on = False
    row = {"batch": batch, "step_ms": statistics.median(times) * 1e3,
           **{f"{name}_ms": clock.seconds.get(name, 0.0) / steps * 1e3 for name in PHASES}}
    if cuda:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        row["gpu_busy_ms"], row["gpu_idle_ms"] = gpu_idle_ms(prof, steps)
        if kernels:
            print(f"\n=== batch {batch}, {sampling.constraint[0] if sampling.constraint else 'none'}: "
                  f"GPU time by kernel, {steps} steps ===")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
        if profile_host:
            print(f"\n=== batch {batch}: torch ops by self CPU time, {steps} steps ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    if profile_host:
        host = cProfile.Profile()
        host.runcall(lambda: [engine.step() for _ in range(steps)])
        print(f"\n=== batch {batch}: the step's Python by own time (cProfile), {steps} steps ===")
        pstats.Stats(host).sort_stats("tottime").print_stats(30)
    check_full_batch(engine, batch)
    for rid in rids:
        engine.abort(rid)
    engine.step()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="also time every request under a JSON schema")
    parser.add_argument("--profile-host", action="store_true",
                        help="also print each row's torch ops by CPU time and its Python profile (cProfile)")
    parser.add_argument("--kernels", action="store_true", help="CUDA: also print each row's kernels by GPU time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp)
    clock = PhaseClock()
    instrument(engine, clock)
    card = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print(json.dumps({"card": card, "model": engine.model_name, "context": args.context,
                      "date": time.strftime("%Y-%m-%d")}), flush=True)
    modes = [("none", SamplingParams(temperature=0.8, ignore_eos=True))]
    if args.json:
        modes.append(("json", SamplingParams(temperature=0.8, json_schema=LONG_TEXT)))
    rows = []
    for batch in args.batches:
        for mode, sampling in modes:
            row = {"mode": mode, **measure(engine, clock, batch, args.context, sampling, args.steps, args.profile_host,
                                           args.kernels)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    engine.close()
    print("\nper step, ms (host phases are summed host time; gpu idle: no kernel running)")
    columns = ["step"] + list(PHASES) + (["gpu_busy", "gpu_idle"] if card != "cpu" else [])
    print(f"{'mode':>5} {'batch':>5} " + " ".join(f"{c[:12]:>12}" for c in columns))
    for r in rows:
        print(f"{r['mode']:>5} {r['batch']:5d} " + " ".join(f"{r[c + '_ms']:12.3f}" for c in columns))


if __name__ == "__main__":
    main()
