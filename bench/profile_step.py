"""Where a decode step's time goes: scheduling, input preparation, the GPU forward, sampling; and
how many kernels a step launches, beside its time (a small model's step is mostly fixed per-kernel
cost, so the count is what fusions bring down).

    python bench/profile_step.py --tokenizer DIR [--shape llama-1b]

CUDA only: the kernel count comes from torch.profiler's CUDA activity, which a CPU run has none of.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import SHAPES  # noqa: E402
from engine_timing import check_full_batch, random_checkpoint  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402


def timed(fn, sync=True):
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def profile(engine: Engine, batch: int, context: int, steps: int = 20) -> dict:
    rng = np.random.default_rng(batch)
    rids = [engine.add_request(prompt_token_ids=rng.integers(0, 30000, context).tolist(),
                               sampling=SamplingParams(max_tokens=outlast_prefill(engine, batch, context) + steps * 3 + 20,
                                                       temperature=0, ignore_eos=True))
            for _ in range(batch)]
    while engine.scheduler.waiting or any(r.num_computed < r.num_prompt for r in engine.scheduler.running):
        engine.step()
    check_full_batch(engine, batch)
    parts = {"schedule": [], "prepare + forward": [], "sample": [], "step": [], "overlapped": []}
    engine.overlap = False  # the breakdown below is of a plain step
    runner = engine.runner
    for _ in range(steps):
        # Instrumented copy of Engine.step's work, each piece synchronized.
        sched, t = timed(engine.scheduler.schedule)
        parts["schedule"].append(t)
        (logits, reqs, _), t = timed(lambda: runner.run(sched.items))
        parts["prepare + forward"].append(t)
        sampled, t = timed(lambda: engine.sampler.sample(logits, [r.sampler for r in reqs]))
        parts["sample"].append(t)
        for req, n in sched.items:
            req.num_computed += n
        for i, req in enumerate(reqs):
            req.token_ids.append(sampled.token_ids[i])
        _, t = timed(engine.step)
        parts["step"].append(t)
    sched = engine.scheduler.schedule()  # the requests have moved on: their next step's rows
    forward_kernels, _, _ = count_kernels(lambda: runner.run(sched.items))
    step_kernels, _, _ = count_kernels(engine.step)
    engine.overlap = True  # steady-state time of an overlapped step: wall time between steps
    engine.step()
    for _ in range(steps):
        _, t = timed(engine.step, sync=False)
        parts["overlapped"].append(t)
    for rid in rids:
        engine.abort(rid)
    engine.step()
    return {**{k: statistics.median(v) * 1e3 for k, v in parts.items()},
            "kernels/step": step_kernels, "kernels/fwd": forward_kernels}


def count_kernels(run, repeats: int = 3):
    """Device operations (kernels, and the copies and memsets a graph also replays) per call of
    `run`, their GPU microseconds per call, and the profile they were read from."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    device_events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return (sum(e.count for e in device_events) / repeats,
            sum(e.self_device_time_total for e in device_events) / repeats, prof)


def outlast_prefill(engine: Engine, batch: int, context: int) -> int:
    """Steps until the last of `batch` prompts is prefilled: the first ones decode meanwhile, and
    must not finish before the batch is whole (that timed a half batch at 128 x 2048 once)."""
    return -(-batch * context // engine.scheduler.max_batch_tokens) + batch


def shape_arguments(description: str | None = None) -> argparse.ArgumentParser:
    """--tokenizer and --shape, which every profiling script here takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="llama-1b")
    return parser


def random_engine(args: argparse.Namespace, tool: str) -> Engine:
    """A bf16 engine over random weights of `args.shape` on the GPU; a clear exit without one."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{tool} needs a CUDA GPU: it times GPU work and counts kernels from "
                         "torch.profiler's CUDA activity, which a CPU run cannot give")
    from transformers import AutoTokenizer

    ckpt, _ = random_checkpoint(dict(SHAPES[args.shape], _shape=args.shape), AutoTokenizer.from_pretrained(args.tokenizer))
    return Engine(ckpt, dtype="bfloat16", progress=False)


def main() -> None:
    engine = random_engine(shape_arguments().parse_args(), "profile_step.py")
    columns = ("schedule", "prepare + forward", "sample", "step", "overlapped", "kernels/step", "kernels/fwd")
    print("milliseconds per decode step, and device operations per step and per forward "
          f"({engine.config.num_layers} layers)")
    print(f"{'batch':>5} {'ctx':>5} " + " ".join(f"{k:>12}" for k in columns))
    for context in (512, 2048):
        for batch in (1, 32, 128):
            r = profile(engine, batch, context)
            print(f"{batch:>5} {context:>5} " + " ".join(f"{r[k]:12.3f}" if "kernels" not in k else f"{r[k]:12.0f}"
                                                       for k in columns), flush=True)
    kernel_table(engine, 1, 512)
    kernel_table(engine, 128, 2048)


def kernel_table(engine: Engine, batch: int, context: int) -> None:
    """GPU time per kernel of decode forwards as the engine runs them (a CUDA-graph replay when the
    batch fits a bucket): which kernel to work on next, and how much of the step is gaps."""
    rng = np.random.default_rng(0)
    rids = [engine.add_request(prompt_token_ids=rng.integers(0, 30000, context).tolist(),
                               sampling=SamplingParams(max_tokens=outlast_prefill(engine, batch, context) + 64,
                                                       temperature=0, ignore_eos=True))
            for _ in range(batch)]
    while engine.scheduler.waiting or any(r.num_computed < r.num_prompt for r in engine.scheduler.running):
        engine.step()
    check_full_batch(engine, batch)
    sched = engine.scheduler.schedule()
    graphs = engine.runner.graphs
    in_graph = graphs is not None and graphs.fits(sched.items)
    run = lambda: engine.runner.run(sched.items)  # noqa: E731  (inputs written and copied, then the forward)
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        run()
    end.record()
    torch.cuda.synchronize()
    launches, kernels_us, prof = count_kernels(run)
    print(f"decode forward, batch {batch}, context {context}: {start.elapsed_time(end) / 10 * 1e3:.0f} us per "
          f"forward ({'graph' if in_graph else 'eager'}), of which kernels "
          f"{kernels_us:.0f} us in {launches:.0f} kernels ({launches / engine.config.num_layers:.1f} per layer); "
          "per kernel over 3 forwards:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
    for rid in rids:
        engine.abort(rid)
    engine.step()


if __name__ == "__main__":
    main()
