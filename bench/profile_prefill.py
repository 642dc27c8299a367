"""Where one prompt's prefill time goes: the whole request through the engine, the model's forward
alone, the GPU time of its kernels, and how long the host takes to launch them (a forward that
the host launches slower than the GPU runs it is launch-bound, and a fixed cost per prompt).

    python bench/profile_prefill.py --tokenizer DIR [--shape llama-1b] [--lengths 512 2048 8192] [--cprofile]

CUDA only (GPU time comes from CUDA events and torch.profiler's CUDA activity). Prints a table
last, then the kernels of the longest prompt's forward by GPU time. --cprofile adds the host's
Python profile (cProfile, by own time) of the longest prompt's forward and of its request through
`engine.generate` (the driver loop's path), which is where a launch-bound prefill's time goes.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import count_kernels, random_engine, shape_arguments  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402


def prefill_parts(engine: Engine, length: int, repeats: int = 5) -> tuple[dict, object]:
    """Milliseconds of one `length`-token prompt: the request end to end (stepped here, no driver loop), its forward (synchronized),
    the forward's kernels alone (CUDA events around a forward the host already queued), and the
    host's launch time (forward without a sync)."""
    rng = np.random.default_rng(length)
    one_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    request_ms = []
    for _ in range(repeats + 1):
        prompt = rng.integers(0, 30000, length).tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.add_request(prompt_token_ids=prompt, sampling=one_token)
        while engine.scheduler.waiting or engine.scheduler.running:
            engine.step()
        torch.cuda.synchronize()
        request_ms.append((time.perf_counter() - t) * 1e3)
    rid = engine.add_request(prompt_token_ids=rng.integers(0, 30000, length).tolist(),
                             sampling=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    sched = engine.scheduler.schedule()
    batch_t, _, _ = engine.runner.prepare(sched.items)
    forward = lambda: engine.model.forward(batch_t, engine.pool.buffers)  # noqa: E731
    forward()
    forward_ms, launch_ms, gpu_ms = [], [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        forward()
        launch_ms.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        forward_ms.append((time.perf_counter() - t) * 1e3)
        # The GPU's own time: queue a forward behind a long sleep so launches never starve it.
        torch.cuda._sleep(50_000_000)
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize()
        gpu_ms.append(start.elapsed_time(end))
    launches, kernels_us, prof = count_kernels(forward)
    engine.abort(rid)
    engine.step()
    med = statistics.median
    return {"request_ms": med(request_ms[1:]), "forward_ms": med(forward_ms), "gpu_ms": med(gpu_ms),
            "launch_ms": med(launch_ms), "kernels_ms": kernels_us / 1e3, "kernels": launches}, prof


def host_profile(engine: Engine, length: int, repeats: int = 5) -> None:
    """Print cProfile's top functions (own time) for the forward alone and for whole requests."""
    rng = np.random.default_rng(length + 1)
    rid = engine.add_request(prompt_token_ids=rng.integers(0, 30000, length).tolist(),
                             sampling=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    batch_t, _, _ = engine.runner.prepare(engine.scheduler.schedule().items)
    engine.model.forward(batch_t, engine.pool.buffers)
    torch.cuda.synchronize()
    forward = cProfile.Profile()
    for _ in range(repeats):
        forward.runcall(engine.model.forward, batch_t, engine.pool.buffers)
        torch.cuda.synchronize()
    engine.abort(rid)
    engine.step()
    one_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompts = [rng.integers(0, 30000, length).tolist() for _ in range(repeats + 1)]
    engine.generate(prompt_token_ids=prompts[:1], sampling=one_token, progress=False)
    # The driver loop's thread runs the engine: its profiler is switched on and off from inside it
    # (from Python 3.12 cProfile sees every thread, the caller's too; before, that thread only).
    driver, loop = cProfile.Profile(), engine.driver()
    loop.call(driver.enable).result()
    walls = []
    for prompt in prompts[1:]:
        t = time.perf_counter()
        engine.generate(prompt_token_ids=[prompt], sampling=one_token, progress=False)
        walls.append((time.perf_counter() - t) * 1e3)
    loop.call(driver.disable).result()
    print(f"\nengine.generate, one {length}-token prompt, max_tokens=1: " + " ".join(f"{w:.2f}" for w in walls) + " ms")
    for name, prof in ((f"model.forward, {length} tokens", forward),
                       (f"engine.generate, {length} tokens, the driver loop's thread", driver)):
        print(f"\n=== host profile: {name}, {repeats} runs (own time) ===")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = shape_arguments()
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--cprofile", action="store_true", help="also the host's Python profile of the longest prompt")
    args = parser.parse_args()
    engine = random_engine(args, "profile_prefill.py")
    rows, prof = [], None
    for length in args.lengths:
        parts, prof = prefill_parts(engine, length)
        rows.append((length, parts))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    print(f"{torch.cuda.get_device_name()} | {args.shape} | one prompt's prefill, milliseconds (median of 5)")
    print(f"{'tokens':>6} {'request':>8} {'forward':>8} {'GPU':>8} {'kernels':>8} {'launch':>8} {'#kern':>6} {'tok/s':>8}")
    for length, p in rows:
        print(f"{length:>6} {p['request_ms']:8.2f} {p['forward_ms']:8.2f} {p['gpu_ms']:8.2f} {p['kernels_ms']:8.2f} "
              f"{p['launch_ms']:8.2f} {p['kernels']:6.0f} {length / p['request_ms'] * 1e3:8.0f}")
    print("request: add_request(max_tokens=1) and steps until it finished; forward: model.forward synchronized; GPU: the same "
          "forward queued behind a sleep (device time only); kernels: sum of kernel times (profiler); launch: "
          "host time to queue the forward")
    if args.cprofile:
        host_profile(engine, max(args.lengths))


if __name__ == "__main__":
    main()
