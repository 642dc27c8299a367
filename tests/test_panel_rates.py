"""The Dashboard's sparklines from a panel that draws 10 times a second and so sees a few of the
engine's steps (issue 10): tokens per second and every request's time to first token are the
engine's own, not those of the steps the panel happened to see."""

import threading

import numpy as np
import pytest

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.notebook.panels.history import EngineTrends


def test_a_capped_panel_draws_the_engine_s_real_token_rate_and_every_time_to_first_token(tiny_model):
    folder, _ = tiny_model("llama")
    trends, seen, every = EngineTrends(), [], []
    drawn = threading.Event()

    def draw(event) -> None:
        seen.append(event)
        trends.add(event)
        if event.running == 0 and not event.waiting:
            drawn.set()

    ttfts = []
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=2048, max_running=4, seed=0) as engine:
        engine.subscribe(draw, max_rate=4)  # a CPU step is slow: fewer draws, still few steps
        engine.subscribe(every.append)  # the truth: every step
        sampling = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        for i in range(12):  # arrivals spread over the steps: first tokens in steps the panel skips
            engine.add_request(prompt_token_ids=[5 + i] * (7 + 3 * i), sampling=sampling)
            for _ in range(4):
                ttfts += [o.completion.metrics["time_to_first_token"] for o in engine.step() if o.completion]
        while engine.has_unfinished():
            ttfts += [o.completion.metrics["time_to_first_token"] for o in engine.step() if o.completion]
        assert drawn.wait(10)
    last = seen[-1]
    assert last.step == every[-1].step and len(seen) <= len(every) / 2  # the panel saw few steps

    def end(event) -> float:
        return event.time + event.duration

    # The panel's rate is over its last second of events (from the start of its first, if sooner):
    # every step's tokens since then, over that time.
    anchor = next((e for e in reversed(seen) if end(e) <= end(last) - 1.0), None)
    since, first_step = (seen[0].time, seen[0].step) if anchor is None else (end(anchor), anchor.step + 1)
    tokens = sum(e.prefill_tokens + e.decode_tokens for e in every if first_step <= e.step <= last.step)
    assert trends.throughput[-1] == pytest.approx(tokens / (end(last) - since), rel=1e-9)
    assert sorted(trends.ttft) == sorted(ttfts) and len(ttfts) == 12


def test_the_kv_grid_keeps_the_last_map_through_events_without_one():
    """A reader of every step gets a map at most PAGE_MAPS_PER_SECOND: the events between must not
    blank the grid (they once drew "this event has no page owners")."""
    from lightllm_nb.notebook.panels.parts import KVPart
    from test_subscriber_rate import step_event

    part = KVPart()
    mapped = step_event(1)
    mapped.page_owner = np.zeros(64, dtype=np.int32)
    part.consume(mapped)
    part.consume(step_event(2))
    assert part.latest is mapped
