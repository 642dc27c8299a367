"""A scheduler that stops making progress fails at once, saying why, instead of hanging."""

import pytest

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.scheduling.admission import Verdict
from lightllm_nb.scheduling.progress_guard import STALL_SLACK_STEPS, LivelockError
from lightllm_nb.scheduling.scheduler import ScheduledBatch
from model_free import make_scheduler, request, step


class NeverAdmit:
    """An admission policy with a bug: it turns everything down, even when the pool is empty."""

    name = "never"

    def check(self, candidate, running, pool):
        return Verdict(False, "this policy never admits", {})

    def record_finished(self, request):
        pass


def test_a_policy_that_never_admits_raises_with_the_state():
    scheduler = make_scheduler(policy=NeverAdmit(), capacity=64, max_batch_tokens=8)
    scheduler.add(request("stuck", prompt_len=6, max_tokens=4))
    limit = scheduler.progress.stall_limit
    assert limit == 64 // 8 + STALL_SLACK_STEPS
    for _ in range(limit - 1):
        step(scheduler)
    with pytest.raises(LivelockError, match=f"no request has computed a new token for {limit} steps") as err:
        step(scheduler)
    message = str(err.value)
    assert "waiting (next candidates first) 1: [stuck(" in message
    assert "pool free 64 of 64 tokens" in message and "policy never" in message
    assert "this policy never admits" in message or "defer stuck" in message


def two_running():
    """A scheduler running requests a and b (one step in), and the two."""
    scheduler = make_scheduler(capacity=64, max_batch_tokens=8)
    a, b = request("a", prompt_len=6), request("b", prompt_len=6)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["a", "b"]
    return scheduler, a, b


def test_a_running_request_left_out_with_budget_to_spare_raises():
    scheduler, a, b = two_running()
    only_a = ScheduledBatch(items=[(a, 1)])  # a buggy schedule that forgets b
    scheduler.progress.observe(scheduler, only_a)
    scheduler.progress.observe(scheduler, only_a)
    with pytest.raises(LivelockError, match="running request b was left out of 3 steps in a row although 7 tokens"):
        scheduler.progress.observe(scheduler, only_a)


def test_left_out_steps_count_only_in_a_row():
    scheduler, a, b = two_running()
    only_a, both = ScheduledBatch(items=[(a, 1)]), ScheduledBatch(items=[(a, 1), (b, 1)])
    only_b = ScheduledBatch(items=[(b, 1)])
    # b runs in the steps between (with a, or alone): its count starts again after each.
    for batch in (only_a, only_a, both, only_a, only_a, only_b, only_a, only_a):
        scheduler.progress.observe(scheduler, batch)
    with pytest.raises(LivelockError, match="running request b was left out of 3 steps in a row"):
        scheduler.progress.observe(scheduler, only_a)


def test_recomputing_after_preemption_is_not_mistaken_for_a_livelock():
    # Tiny budget and pool: requests are preempted over and over and recompute their context in
    # 4-token chunks, many steps without a new token; every one of them still finishes.
    scheduler = make_scheduler(capacity=34, max_batch_tokens=4, max_running=2)
    reqs = [request(f"r{i}", prompt_len=14, max_tokens=10) for i in range(4)]
    for req in reqs:
        scheduler.add(req)
    steps = 0
    while scheduler.has_work():
        step(scheduler)
        steps += 1
        assert steps < 2000
    assert all(r.finish_reason == "length" for r in reqs)
    assert sum(r.num_preemptions for r in reqs) > 0, "the tight pool was meant to force preemption"


def test_an_engine_whose_policy_never_admits_fails_fast(tiny_model, caplog):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=128, scheduler=NeverAdmit()) as engine:
        rid = engine.add_request(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=2))
        # The engine may raise the error or log it and carry on (its step-failure policy): either
        # way the livelock is named within the guard's limit, with the stuck request in the message.
        raised = []
        for _ in range(engine.scheduler.progress.stall_limit):
            try:
                engine.step()
            except LivelockError as err:
                raised.append(str(err))
                break
        logged = [r.getMessage() + str(r.exc_info[1] if r.exc_info else "") for r in caplog.records]
        assert any("no request has computed a new token" in m and rid in m for m in raised + logged)
