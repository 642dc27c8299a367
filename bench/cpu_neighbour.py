"""The demo model on the CPU beside another process that runs torch: what each torch thread count
gives when a neighbour (a second notebook kernel, a test run) competes for the same cores.

    python bench/cpu_neighbour.py [--streams 1 16] [--tokens 32] [--repeats 3]

For each torch thread count of the engine (1 up to the CPUs this process may use), the demo model
generates `--streams` greedy streams of `--tokens` tokens, alone and beside a neighbour process
that multiplies 256 x 256 float32 matrices in a loop on as many torch threads as there are usable
CPUs (what a second torch program does by default). Prints tok/s per run and a table last:
median tok/s and the slowest run against the median, per thread count and condition. Run it on an
otherwise idle machine: the "alone" rows are the baseline.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time

import torch

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.engine.engine_setup import usable_cpus

NEIGHBOUR = ("import torch, sys\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(256, 256)\n"
             "while True:\n    a @ a\n")


def tok_s(engine: Engine, streams: int, tokens: int, run: int) -> float:
    """Greedy tok/s of `streams` prompts that no earlier run sent (no prefix-cache hits past the
    template: every run prefills and decodes the same amount)."""
    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [f"Run {run}: write a short story about lighthouse number {i}." for i in range(streams)]
    t = time.perf_counter()
    engine.generate(prompts, sampling, progress=False)
    return streams * tokens / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpus = usable_cpus()
    run_ids = itertools.count()
    rows = []
    for threads in range(1, cpus + 1):
        # A running thread keeps the torch thread count it started with: a new engine (and driver
        # thread) per count.
        torch.set_num_threads(threads)
        engine = Engine("demo", device="cpu", kv_tokens=8192, progress=False)
        for neighbour in (False, True):
            proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(cpus)]) if neighbour else None
            try:
                if proc:
                    time.sleep(2)  # let it start multiplying
                tok_s(engine, 1, 4, run=-1)  # warm-up at this thread count
                for streams in args.streams:
                    runs = [tok_s(engine, streams, args.tokens, next(run_ids)) for _ in range(args.repeats)]
                    median = statistics.median(runs)
                    rows.append((threads, "beside a neighbour" if neighbour else "alone", streams, median,
                                 median / min(runs)))
                    print(f"threads {threads}, {rows[-1][1]}, {streams} streams: tok/s "
                          f"{[round(r, 1) for r in runs]}", flush=True)
            finally:
                if proc:
                    proc.kill()
                    proc.wait()
        engine.close()
    print(f"\nCPUs usable: {cpus}; neighbour: torch matmul loop on {cpus} threads")
    print("torch threads | condition | streams | tok/s (median) | slowest run / median")
    for threads, condition, streams, median, spread in rows:
        print(f"{threads:13d} | {condition:18s} | {streams:7d} | {median:14.1f} | {spread:.2f}")


if __name__ == "__main__":
    main()
