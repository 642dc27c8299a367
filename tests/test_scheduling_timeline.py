"""Per-request timelines from the real scheduler, model-free: every admission is recorded, and a
resumed request's recomputed tokens are what it had computed less what the cache gave back."""

import pytest

from lightllm_nb.scheduling.timeline import TimelineRecorder
from model_free import HANG_SECONDS, make_scheduler, request, run, step

pytestmark = pytest.mark.timeout(HANG_SECONDS)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_admissions_and_recomputation_after_a_preemption_are_recorded(prefix_cache):
    # as in test_the_newest_request_is_preempted_first: "new" is preempted once the pool runs dry
    scheduler = make_scheduler(capacity=30, max_running=3, prefix_cache=prefix_cache, timelines=TimelineRecorder())
    reqs = [request(rid, prompt_len=8, max_tokens=10) for rid in ("old", "mid", "new")]
    for req in reqs:
        scheduler.add(req)
        step(scheduler)
    run(scheduler)
    for req in reqs:
        events = [e["event"] for e in req.timeline]
        assert events[0] == "queued" and events[1] == "admitted", events
        assert req.timeline[1]["cached_tokens"] == req.num_cached == (7 if prefix_cache and req is not reqs[0] else 0)
        last = req.timeline[-1]
        assert (last["event"], last.get("reason"), last.get("output_tokens")) == ("finished", "length", 10)
    new = reqs[2]
    preempted = [e for e in new.timeline if e["event"] == "preempted"]
    resumed = [e for e in new.timeline if e["event"] == "resumed"]
    assert preempted and len(resumed) == len(preempted) == new.num_preemptions
    for before, after in zip(preempted, resumed):
        assert before["kept"] == (before["computed"] if prefix_cache else 0), "whole pages of 1: all it computed"
        assert after["recomputed"] == before["computed"] - after["cached_tokens"]
        assert after["recomputed"] > 0 if not prefix_cache else after["cached_tokens"] > 0  # the cache kept them
    assert new.num_recomputed == sum(e["recomputed"] for e in resumed)


def test_every_prefill_chunk_is_recorded_even_a_one_token_one():
    # 9 prompt tokens at 4 per step: chunks 4, 4 and 1 (the last one looks like a decode by size)
    scheduler = make_scheduler(capacity=64, max_running=1, max_batch_tokens=4, timelines=TimelineRecorder())
    req = request("r", prompt_len=9, max_tokens=2)
    scheduler.add(req)
    run(scheduler)
    assert [e["tokens"] for e in req.timeline if e["event"] == "prefill"] == [4, 4, 1]


def test_a_request_preempted_in_the_middle_of_a_page_keeps_its_whole_computed_pages():
    # Pages of 4, 28 slots: "old" (8 + 12 tokens) outgrows the pool while "new" (6 + 12) has computed
    # 13 tokens on 4 pages; "new" is preempted for it and the cache keeps 3 whole pages, not the 4th.
    scheduler = make_scheduler(capacity=28, page_size=4, max_running=2, prefix_cache=True,
                               timelines=TimelineRecorder())
    old, new = request("old", prompt_len=8, max_tokens=12), request("new", prompt_len=6, max_tokens=12)
    scheduler.add(old)
    step(scheduler)
    scheduler.add(new)
    history = run(scheduler)
    [preempted] = [e for e in new.timeline if e["event"] == "preempted"]
    [resumed] = [e for e in new.timeline if e["event"] == "resumed"]
    assert (preempted["code"], preempted["computed"]) == ("preempted_for", 13), "the scenario: mid-page"
    assert preempted["kept"] == 12, "whole computed pages only: 13 // 4 * 4"
    assert (resumed["cached_tokens"], resumed["recomputed"]) == (12, 1), "the resume finds what was kept"
    [decision] = [d for decisions in history for d in decisions if d.kind == "preempt"]
    assert decision.numbers["freed"] == 16, "the decision counts the 4 pages it released, in slots"
