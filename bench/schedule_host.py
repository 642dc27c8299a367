"""Host time of one scheduling step in steady decode, without a model: `Scheduler.schedule` alone
and a whole model-free step (schedule, then each row's token "computed" and "sampled").

    python bench/schedule_host.py [--rows 128] [--prompt 512] [--steps 200] [--rounds 7]

The scheduler is the engine's (past-future policy, prefix cache on, timelines recording) over a
CPU pool, with `--rows` requests of distinct `--prompt`-token prompts that never finish; timing
starts once every one decodes. Each page size runs twice: "plain" steps as tests/model_free.py
takes them, and "overlap" steps as the engine's overlapped decode has them (schedule() sees each
request's newest token as a placeholder still on the GPU). schedule() is timed inside the steps
(called alone again and again it would see no progress, and its livelock guard would stop it).
Prints the best round's mean per step; before/after a change: run it once per tree.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_free import SAMPLED, make_scheduler, step  # noqa: E402

from lightllm_nb.sampling_params import SamplingParams  # noqa: E402
from lightllm_nb.scheduling.past_future import PastFuturePolicy  # noqa: E402
from lightllm_nb.scheduling.request import PENDING_TOKEN, Request  # noqa: E402
from lightllm_nb.scheduling.scheduler import Scheduler  # noqa: E402
from lightllm_nb.scheduling.timeline import TimelineRecorder  # noqa: E402

CAPACITY = 400000  # KV pool tokens


def decoding_scheduler(rows: int, prompt: int, max_tokens: int, page_size: int) -> Scheduler:
    """A scheduler whose `rows` requests have all finished their prefill."""
    steps = itertools.count()
    scheduler = make_scheduler(capacity=CAPACITY, max_running=rows, max_batch_tokens=8192, page_size=page_size,
                               policy=PastFuturePolicy(), prefix_cache=True,
                               timelines=TimelineRecorder(lambda: next(steps)))
    for i in range(rows):  # distinct prompts: no shared prefixes
        prompt_ids = list(range(i * prompt, (i + 1) * prompt))
        scheduler.add(Request(f"r{i}", prompt_ids, SamplingParams(max_tokens=max_tokens)))
    while not all(r.num_computed >= r.num_prompt for r in scheduler.running) or len(scheduler.running) < rows:
        step(scheduler)
    for _ in range(3):  # a few decode steps: the prompts are in the prefix cache
        step(scheduler)
    return scheduler


def overlapped_step(scheduler: Scheduler) -> None:
    """tests/model_free.py's step as an overlapped engine step sees it: the newest token of each
    request is a placeholder while the next step is scheduled, filled in after."""
    batch = scheduler.schedule()
    for req, n in batch.items:
        req.num_computed += n
        req.token_ids[-1] = SAMPLED
        req.token_ids.append(PENDING_TOKEN)


def time_per_step(whole, scheduler: Scheduler, steps: int, rounds: int) -> tuple[float, float]:
    """Seconds per step of schedule() alone and of the `whole` step, each the best round's mean."""
    scheduled = 0.0
    schedule = scheduler.schedule

    def timed_schedule():
        nonlocal scheduled
        start = time.perf_counter()
        batch = schedule()
        scheduled += time.perf_counter() - start
        return batch

    scheduler.schedule = timed_schedule
    best_alone = best_whole = float("inf")
    for _ in range(rounds):
        scheduled = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            whole(scheduler)
        best_whole = min(best_whole, (time.perf_counter() - start) / steps)
        best_alone = min(best_alone, scheduled / steps)
    return best_alone, best_whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    max_tokens = args.steps * args.rounds + 16  # none finishes while timed
    # The admission policy starts cold, assuming each request runs to max_tokens: all must fit at once.
    if args.rows * (args.prompt + max_tokens) > 0.9 * CAPACITY:
        parser.error(f"the requests would outgrow the pool of {CAPACITY} tokens: fewer --steps or --rounds")
    print(f"{args.rows} decode rows, {args.prompt}-token prompts, best of {args.rounds} rounds of {args.steps} "
          "steps, ms per step")
    print(f"{'page size':>9}  {'steps':>7}  {'schedule()':>10}  {'whole step':>10}")
    for page_size in (1, 16):
        for name, whole in (("plain", step), ("overlap", overlapped_step)):
            scheduler = decoding_scheduler(args.rows, args.prompt, max_tokens, page_size)
            if whole is overlapped_step:
                for req in scheduler.running:
                    req.token_ids[-1] = PENDING_TOKEN  # the token sampled last is still "on the GPU"
            computed = [r.num_computed for r in scheduler.running]
            alone, whole_step = time_per_step(whole, scheduler, args.steps, args.rounds)
            # Every row decoded one token in every step: nothing preempted, admitted or finished.
            assert [r.num_computed for r in scheduler.running] == [n + args.steps * args.rounds for n in computed]
            print(f"{page_size:>9}  {name:>7}  {alone * 1e3:>10.3f}  {whole_step * 1e3:>10.3f}")


if __name__ == "__main__":
    main()
