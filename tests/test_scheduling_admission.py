"""What the real scheduler says when it admits or defers a request, and who may pass a request that
cannot start yet; model-free. The reason a decision carries is what panels and `explain()` show."""

import time
from types import SimpleNamespace

import pytest

from lightllm_nb.kv.cache_scope import CacheScopes
from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.scheduling.admission import ConservativePolicy, Verdict
from lightllm_nb.scheduling.past_future import PastFuturePolicy
from lightllm_nb.scheduling.request import Request
from lightllm_nb.scheduling.timeline import TimelineRecorder
from model_free import HANG_SECONDS, make_scheduler, request, run, step

pytestmark = pytest.mark.timeout(HANG_SECONDS)


class AdmitEverything:
    """A policy that lets every request in, so the pool alone can turn one down."""

    name = "admit_everything"

    def check(self, candidate, running, pool):
        return Verdict(True, "this policy admits everything", {"free": pool.free})

    def record_finished(self, request):
        pass


def test_an_admission_and_a_policy_refusal_carry_the_policys_own_reason():
    # Conservative, 64 slots: "a" reserves 40, "b" would need 40 more.
    scheduler = make_scheduler(capacity=64, policy=ConservativePolicy(), timelines=TimelineRecorder())
    scheduler.add(request("a", prompt_len=20, max_tokens=20))
    scheduler.add(b := request("b", prompt_len=20, max_tokens=20))
    admit, defer = [d for d in step(scheduler) if d.kind in ("admit", "defer")]
    assert (admit.kind, admit.request_id, admit.code) == ("admit", "a", "policy")
    assert admit.reason == "reserved 0 + worst case 40 <= capacity 64"
    assert admit.numbers == {"reserved": 0, "need": 40, "capacity": 64}
    assert (defer.kind, defer.request_id, defer.code) == ("defer", "b", "policy")
    assert defer.reason == "reserved 40 + worst case 40 > capacity 64"
    assert [(e["event"], e.get("code")) for e in b.timeline] == [("queued", None), ("deferred", "policy")]


def test_a_request_the_policy_admits_but_the_pool_cannot_hold_is_deferred_for_room():
    scheduler = make_scheduler(capacity=16, policy=AdmitEverything())
    scheduler.add(request("a", prompt_len=12, max_tokens=4))
    step(scheduler)
    scheduler.add(request("b", prompt_len=8, max_tokens=4))
    [defer] = [d for d in step(scheduler) if d.kind == "defer"]
    assert (defer.request_id, defer.code, defer.numbers) == ("b", "no_room", {"need": 8, "free": 3})
    assert defer.reason == "8 tokens do not fit in 3 free slots"


def test_a_request_whose_grammar_is_still_compiling_waits_without_holding_up_others():
    scheduler = make_scheduler()
    compiling = request("compiling", "alice")
    compiling.grammar = SimpleNamespace(ready=False)  # RequestGrammar.ready is False until xgrammar is done
    scheduler.add(compiling)
    scheduler.add(request("plain", "bob"))  # another user: the same user's next request queues behind
    decisions = step(scheduler)
    assert [d.request_id for d in decisions if d.kind == "admit"] == ["plain"], \
        "the compiling request waits in the queue; the one behind it starts now"
    assert len(scheduler.waiting) == 1 and compiling.status.name == "WAITING"
    compiling.grammar.ready = True
    run(scheduler)
    assert compiling.finish_reason == "length" and compiling.num_output == compiling.sampling.max_tokens


def test_admission_stops_when_the_pool_has_no_row_left():
    """The engine gives the pool one req_to_token row per max_running, but a Scheduler may be handed
    a pool with fewer: the request that finds no row waits, and nothing is scheduled for it."""
    scheduler = make_scheduler(max_running=2, rows=1, prefix_cache=True)
    first, second = request("first", "alice"), request("second", "bob")
    scheduler.add(first)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert [req.request_id for req, _ in batch.items] == ["first"] and second.row is None
    run(scheduler)
    assert first.finish_reason == second.finish_reason == "length"


def test_every_finished_request_teaches_past_future_its_output_length():
    policy = PastFuturePolicy(min_history=1)
    scheduler = make_scheduler(policy=policy)
    for rid, max_tokens in (("a", 2), ("b", 5), ("c", 3)):
        scheduler.add(request(rid, max_tokens=max_tokens))
    run(scheduler)
    assert sorted(policy.history) == [2, 3, 5]


def test_another_users_prefill_of_the_same_tokens_past_a_declared_prefix_holds_nobody_up():
    """Past the end of a declared (public) prefix each user's tokens are cached under their own
    scope, so bob does not wait for alice's identical prefill: that wait would tell bob what alice
    is computing, and he could never reuse her pages anyway."""
    system = list(range(50, 58))
    scheduler = make_scheduler(cache_scopes=CacheScopes(mode="user", shared_prefixes=(system,)), prefix_cache=True)
    scheduler.add(Request("warm", system + [99], SamplingParams(max_tokens=1), user="carol"))
    run(scheduler)  # the declared prefix is cached now
    for rid, user in (("a", "alice"), ("b", "bob")):
        scheduler.add(Request(rid, system + list(range(60, 68)), SamplingParams(max_tokens=2), user=user))
    decisions = step(scheduler)
    assert [d.request_id for d in decisions if d.kind == "admit"] == ["a", "b"], \
        [d.reason for d in decisions if d.kind == "defer"]
    assert [d.request_id for d in decisions if d.kind == "prefix_hit"] == ["a", "b"]


def test_a_request_aborted_while_waiting_leaves_the_queue():
    scheduler = make_scheduler(max_running=1)
    running, queued = request("running"), request("queued")
    scheduler.add(running)
    scheduler.add(queued)
    step(scheduler)
    assert scheduler.finish(queued, "abort").kind == "finish"
    assert len(scheduler.waiting) == 0 and queued.finish_reason == "abort"
    run(scheduler)
    assert queued.num_output == 0 and running.finish_reason == "length"


def test_a_prefill_shared_with_a_running_one_defers_with_the_probe_length_at_page_size_4():
    """The second of two identical prompts waits a step for the first's pages; the probe (how many
    next tokens must agree) is 32 tokens at every page size, and the timeline records this defer,
    the step's third decision (not merely its last but one)."""
    scheduler = make_scheduler(page_size=4, prefix_cache=True, timelines=TimelineRecorder())
    first, second = request("first", prompt_len=40), request("second", prompt_len=40)
    scheduler.add(Request("earlier", list(range(500, 504)), SamplingParams(max_tokens=3), priority=1))
    scheduler.add(first)
    scheduler.add(second)
    scheduler.add(request("other", "bob", priority=-1))  # admitted after second's defer: one defer still
    decisions = step(scheduler)
    assert [(d.kind, d.request_id) for d in decisions[:3]] == [("admit", "earlier"), ("admit", "first"),
                                                                ("defer", "second")]
    [defer] = [d for d in decisions if d.kind == "defer"]
    assert (defer.request_id, defer.code, defer.numbers["shared"]) == ("second", "shared_prefill", 32)
    [deferred] = [e for e in second.timeline if e["event"] == "deferred"]
    assert (deferred["code"], deferred["shared"]) == ("shared_prefill", 32)


def test_the_batch_lists_decodes_before_prefill_chunks():
    scheduler = make_scheduler()
    scheduler.add(request("decoding"))
    step(scheduler)
    scheduler.add(request("two", prompt_len=2))
    assert [(req.request_id, n) for req, n in scheduler.schedule().items] == [("decoding", 1), ("two", 2)]


def test_an_admitted_one_token_prompt_is_listed_before_a_running_prefill_chunk():
    scheduler = make_scheduler(max_batch_tokens=6)
    scheduler.add(request("long", prompt_len=10))
    step(scheduler)
    scheduler.add(request("one", prompt_len=1))
    assert [(req.request_id, n) for req, n in scheduler.schedule().items] == [("one", 1), ("long", 4)]


def test_a_decode_goes_before_a_prefill_with_two_tokens_left():
    scheduler = make_scheduler(max_running=2, max_batch_tokens=2)
    scheduler.add(request("decoding", prompt_len=1))
    scheduler.add(request("two_left", prompt_len=3))
    step(scheduler)  # decoding computes its prompt, two_left one token of three
    assert [(req.request_id, n) for req, n in scheduler.schedule().items] == [("decoding", 1), ("two_left", 1)]


def test_a_step_budget_may_equal_max_running_and_a_scheduler_keeps_no_timelines_unless_given_a_recorder():
    with pytest.raises(ValueError, match="must be >= max_running=4"):
        make_scheduler(max_running=4, max_batch_tokens=3)
    scheduler = make_scheduler(max_running=4, max_batch_tokens=4)
    req = request("r")
    scheduler.add(req)
    run(scheduler)
    assert req.timeline == [], "the simulator's requests carry no timeline"


def test_queue_time_is_the_wait_before_admission():
    scheduler = make_scheduler()
    before = time.perf_counter()
    req = request("r")
    scheduler.add(req)
    step(scheduler)
    assert 0 <= req.queue_time <= time.perf_counter() - before


def test_a_step_never_schedules_more_tokens_than_its_budget():
    scheduler = make_scheduler(max_batch_tokens=8)
    for rid in "abc":
        scheduler.add(request(rid, prompt_len=4))
    assert [(req.request_id, n) for req, n in scheduler.schedule().items] == [("a", 4), ("b", 4)]


def test_a_user_at_the_cap_gets_one_defer_per_step_while_others_are_admitted():
    scheduler = make_scheduler(max_running_per_user=1, timelines=TimelineRecorder())
    scheduler.add(request("a1", "alice"))
    step(scheduler)
    scheduler.add(a2 := request("a2", "alice", priority=1))  # looked at first by every admission this step
    for rid, user in (("b1", "bob"), ("b2", "bob2")):
        scheduler.add(request(rid, user))
    decisions = step(scheduler)
    assert [(d.request_id, d.code) for d in decisions if d.kind == "defer"] == [("a2", "user_cap")]
    assert [d.request_id for d in decisions if d.kind == "admit"] == ["b1", "b2"]
    assert [(e["event"], e.get("code"), e.get("cap")) for e in a2.timeline] == [("queued", None, None),
                                                                               ("deferred", "user_cap", 1)]


def test_the_per_user_cap_still_holds_after_one_of_the_users_requests_finishes():
    scheduler = make_scheduler(max_running_per_user=2)
    for rid, max_tokens in (("a1", 1), ("a2", 6), ("a3", 6), ("a4", 6)):
        scheduler.add(request(rid, "alice", max_tokens=max_tokens))
    while scheduler.has_work():
        step(scheduler)
        assert len(scheduler.running) <= 2, [r.request_id for r in scheduler.running]


def test_a_waiting_prompt_starts_with_the_last_token_of_budget_a_decode_leaves():
    scheduler = make_scheduler(max_running=2, max_batch_tokens=2)
    scheduler.add(request("decoding", prompt_len=1))
    step(scheduler)
    scheduler.add(request("next", prompt_len=4))
    assert [(req.request_id, n) for req, n in scheduler.schedule().items] == [("decoding", 1), ("next", 1)]


def test_a_prompt_that_continues_a_decoding_one_is_not_deferred_for_it():
    """Only a running prefill's tokens are worth waiting for (its prompt pages reach the cache as
    they are computed). A request at its first decode has computed exactly its prompt: a prompt
    that continues it with that very token is admitted at once, not deferred as a shared prefill."""
    scheduler = make_scheduler(prefix_cache=True)
    first = request("first", prompt_len=8, max_tokens=4)
    scheduler.add(first)
    step(scheduler)  # first computes its 8 prompt tokens and samples one more
    scheduler.add(Request("continues", list(first.token_ids), SamplingParams(max_tokens=2)))
    decisions = step(scheduler)
    assert [(d.kind, d.request_id) for d in decisions if d.kind in ("admit", "defer")] == [("admit", "continues")]
    assert [d.numbers["matched"] for d in decisions if d.kind == "prefix_hit"] == [8]


def test_prompts_that_differ_are_admitted_together_with_the_prefix_cache_on():
    """Only requests that would compute the same next tokens wait for each other: two short prompts
    with different tokens (both under the 32-token probe) start in the same step."""
    scheduler = make_scheduler(prefix_cache=True)
    for rid, first_token in (("a", 100), ("b", 200)):
        scheduler.add(Request(rid, list(range(first_token, first_token + 6)), SamplingParams(max_tokens=2)))
    decisions = step(scheduler)
    assert [(d.kind, d.request_id) for d in decisions] == [("admit", "a"), ("admit", "b")]
