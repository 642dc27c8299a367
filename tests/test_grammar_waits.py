"""Requests that wait for their grammar to compile: in the queue, not in a batch row, without
holding up their user's other requests, and without looking like a livelock to the progress guard."""

import concurrent.futures

import torch

from lightllm_nb import SamplingParams
from lightllm_nb.engine.grammar import RequestGrammar
from lightllm_nb.kv.kv_pool import KVPool
from lightllm_nb.scheduling.admission import AggressivePolicy
from lightllm_nb.scheduling.request import Request
from lightllm_nb.scheduling.scheduler import Scheduler


def small_scheduler(max_context=64):
    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=64, page_size=1, max_requests=4,
                  max_context=max_context, dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(pool, AggressivePolicy(), max_batch_tokens=16, max_running=4)


def compiling(request_id, user="a"):
    """A request whose grammar is still compiling (its future not done), and that future."""
    compiled = concurrent.futures.Future()
    req = Request(request_id, [5, 6, 7], SamplingParams(json_schema={}), user=user)
    req.grammar = RequestGrammar(compiled)
    return req, compiled


def test_a_compiling_grammar_does_not_hold_up_the_same_user_s_later_requests():
    scheduler = small_scheduler()
    constrained, compiled = compiling("json", user="a")
    plain = Request("plain", [5, 6, 8], SamplingParams(), user="a")  # the same user, queued behind it
    scheduler.add(constrained)
    scheduler.add(plain)
    assert [r.request_id for r, _ in scheduler.schedule().items] == ["plain"]
    compiled.set_result(None)
    assert [r.request_id for r, _ in scheduler.schedule().items] == ["plain", "json"]


def test_steps_spent_waiting_for_a_grammar_are_not_a_livelock():
    scheduler = small_scheduler()
    constrained, compiled = compiling("json")
    scheduler.add(constrained)
    for _ in range(10 * scheduler.progress.stall_limit):  # a slow compile: nothing can run meanwhile
        assert not scheduler.schedule().items
    compiled.set_result(None)
    assert [r.request_id for r, _ in scheduler.schedule().items] == ["json"]
