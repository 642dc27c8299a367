"""Fair admission between users: no user starves behind another's burst, per-user caps hold,
higher priorities go first, and a request deferred for memory is not overtaken."""

from collections import Counter

import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.scheduling.admission import ConservativePolicy
from model_free import make_scheduler, request, run, step


def admitted(history):
    return [d.request_id for decisions in history for d in decisions if d.kind in ("admit", "resume")]


def test_a_flood_does_not_starve_another_user(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=256, max_running=2) as engine:
        events = []
        engine.subscribe(events.append)
        sampling = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        flood = [engine.add_request(prompt_token_ids=[5, 6, 7, i + 8], sampling=sampling, user="alice")
                 for i in range(20)]
        engine.step()
        bob = engine.add_request(prompt_token_ids=[9, 9, 9], sampling=sampling, user="bob")
        while not any(d.kind == "admit" and d.request_id == bob for d in events[-1].decisions):
            engine.step()
            assert events[-1].step < 100, "bob was never admitted"  # fail, not hang, if steps keep failing
        decisions = [(e.step, d) for e in events for d in e.decisions]
        first_finish = min(step for step, d in decisions if d.kind == "finish")
        assert events[-1].step == first_finish + 1, "bob is admitted as soon as a slot frees"
        admits = [d.request_id for _, d in decisions if d.kind == "admit"]
        assert admits[:3] == flood[:2] + [bob], "bob goes before alice's next request"
        assert events[-1].waiting >= 16, "long before alice's flood drains"
        for rid in flood:
            engine.abort(rid)
        engine.abort(bob)
        engine.step()
        assert not engine.has_unfinished()
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()


def test_users_take_turns():
    scheduler = make_scheduler(max_running=3)
    for user in "abc":
        for i in range(4):
            scheduler.add(request(f"{user}{i}", user, max_tokens=2 + i % 2))
    order = admitted(run(scheduler))
    # Whenever a slot frees, the user with the fewest running requests goes next (ties: least
    # recently admitted), so each user's k-th request is admitted before anyone's (k+2)-th.
    for k in range(4):
        for user in "abc":
            later = [f"{other}{j}" for other in "abc" for j in range(k + 2, 4)]
            assert all(order.index(f"{user}{k}") < order.index(r) for r in later)
    assert order[:3] == ["a0", "b0", "c0"]


def test_per_user_cap_is_honoured_and_others_still_run():
    scheduler = make_scheduler(max_running=4, max_running_per_user=2)
    for i in range(6):
        scheduler.add(request(f"a{i}", "alice", max_tokens=4))
    history = [step(scheduler)]
    assert Counter(r.user for r in scheduler.running) == {"alice": 2}, "capped even with free slots"
    assert any(d.kind == "defer" and "max_running_per_user=2" in d.reason for d in history[0])
    for i in range(3):
        scheduler.add(request(f"b{i}", "bob", max_tokens=4))
    while scheduler.has_work():
        history.append(step(scheduler))
        assert max(Counter(r.user for r in scheduler.running).values(), default=0) <= 2
    assert admitted(history[1:2]) == ["b0", "b1"], "bob uses the slots alice may not"


def test_higher_priority_goes_first():
    scheduler = make_scheduler(max_running=1)
    for i in range(3):
        scheduler.add(request(f"low{i}", "alice"))
    scheduler.add(request("high", "bob", priority=5))
    scheduler.add(request("mid", "carol", priority=1))
    assert admitted(run(scheduler)) == ["high", "mid", "low0", "low1", "low2"]


def test_the_lowest_priority_is_preempted_not_the_newest():
    scheduler = make_scheduler(capacity=24, max_running=2)
    scheduler.add(request("low", "alice", prompt_len=10, max_tokens=10))
    step(scheduler)
    scheduler.add(request("high", "bob", prompt_len=10, max_tokens=10, priority=1))
    history = run(scheduler)
    preempted = [d.request_id for decisions in history for d in decisions if d.kind == "preempt"]
    assert preempted and set(preempted) == {"low"}


def test_a_request_deferred_for_memory_is_not_overtaken():
    # Conservative: each request reserves prompt + max_tokens; capacity 64.
    scheduler = make_scheduler(capacity=64, policy=ConservativePolicy())
    scheduler.add(request("running", "alice", prompt_len=20, max_tokens=20))  # reserves 40
    step(scheduler)
    scheduler.add(request("big", "bob", prompt_len=20, max_tokens=20))        # 40 more: must wait
    scheduler.add(request("small", "carol", prompt_len=4, max_tokens=4))      # 8 would fit now
    history = run(scheduler)
    assert any(d.kind == "defer" and d.request_id == "big" for d in history[0])
    assert admitted(history) == ["big", "small"], "small waits behind big instead of overtaking it"


@pytest.mark.parametrize("cap", [0, -1])
def test_bad_cap_is_rejected(cap):
    with pytest.raises(ValueError, match=f"max_running_per_user={cap}"):
        make_scheduler(max_running_per_user=cap)
