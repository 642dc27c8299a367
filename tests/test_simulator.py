"""The trace-driven simulator runs the real Scheduler and KVPool; workloads feed it traces."""

import json
import math

import numpy as np
import pytest

from lightllm_nb.scheduling.admission import AggressivePolicy, ConservativePolicy
from lightllm_nb.scheduling.past_future import PastFuturePolicy
from lightllm_nb.sim.simulator import StepCost, simulate
from lightllm_nb.sim.workloads import (Lengths, first_exchange, parse_truncated_json_array, poisson_trace,
                                   synthetic_lengths)

POLICIES = {"conservative": ConservativePolicy, "aggressive": AggressivePolicy,
            "past_future": lambda: PastFuturePolicy(min_history=10)}


@pytest.fixture(scope="module")
def trace():
    lengths = synthetic_lengths(2000, max_prompt=200, seed=1)
    return poisson_trace(lengths, num_requests=150, rate=40.0, max_tokens=512, seed=2)


def run(trace, policy, kv_tokens=3000, **kwargs):
    return simulate(trace, policy, kv_tokens=kv_tokens, max_running=64, max_batch_tokens=512, **kwargs)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_request_finishes_with_its_length_and_the_pool_is_whole(trace, name):
    result = run(trace, POLICIES[name]())
    assert result.pool_whole
    assert len(result.records) == len(trace)
    by_id = {t.request_id: t for t in trace}
    for r in result.records:
        assert r.finished is not None and r.first_token is not None and r.admitted is not None
        assert r.arrival <= r.admitted <= r.first_token <= r.finished
        assert r.output_len == by_id[r.request_id].output_len
    assert result.duration >= max(r.finished for r in result.records) - trace[0].arrival - 1e-9
    assert 0 < result.mean_kv_used <= 1


def test_conservative_never_preempts(trace):
    assert sum(r.preemptions for r in run(trace, ConservativePolicy()).records) == 0


def test_aggressive_preempts_under_a_tight_budget(trace):
    result = run(trace, AggressivePolicy())
    assert sum(r.preemptions for r in result.records) > 0
    assert result.pool_whole


def test_same_seed_same_result(trace):
    def outcome():
        result = run(trace, PastFuturePolicy(min_history=10, seed=5), seed=3)
        return [(r.request_id, r.admitted, r.first_token, r.finished, r.preemptions) for r in result.records]
    assert outcome() == outcome()


def test_step_cost_model_sets_the_clock():
    lengths = Lengths(np.array([10]), np.array([5]), "one request")
    [req] = poisson_trace(lengths, num_requests=1, rate=1.0, max_tokens=5)
    cost = StepCost(fixed=1.0, per_prefill_token=0.1, per_decode_row=0.01, per_context_token=0.0)
    result = simulate([req], ConservativePolicy(), kv_tokens=64, cost=cost)
    [record] = result.records
    # One prefill step (1 + 10 * 0.1) samples the first token; four decode steps (1.01 each) the rest.
    assert record.ttft == pytest.approx(2.0)
    assert record.finished == pytest.approx(2.0 + 4 * 1.01)
    assert result.steps == 5 and record.tpot == pytest.approx(1.01)


def test_a_request_larger_than_the_pool_is_refused(trace):
    with pytest.raises(ValueError, match="kv_tokens"):
        simulate(trace, ConservativePolicy(), kv_tokens=300)


def test_truncated_json_array_keeps_the_complete_items():
    items = [{"id": i, "conversations": [{"from": "human", "value": "q" * i}]} for i in range(5)]
    text = json.dumps(items, indent=2)
    assert parse_truncated_json_array(text) == items
    cut = text[: text.index('"id": 3')]          # cut inside the fourth item
    assert parse_truncated_json_array(cut) == items[:3]
    assert parse_truncated_json_array(text[:-1]) == items  # only the closing bracket lost
    with pytest.raises(ValueError):
        parse_truncated_json_array("no array here")


def test_first_exchange_is_the_first_question_and_its_answer():
    turns = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q1"},
             {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    assert first_exchange({"conversations": turns}) == ("q1", "a1")
    assert first_exchange({"conversations": turns[:2]}) is None


def test_poisson_trace_caps_outputs_and_orders_arrivals():
    lengths = synthetic_lengths(500, seed=0)
    trace = poisson_trace(lengths, num_requests=300, rate=10.0, max_tokens=128, seed=0)
    arrivals = [t.arrival for t in trace]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert all(1 <= t.output_len <= t.max_tokens == 128 for t in trace)
    assert 300 / arrivals[-1] == pytest.approx(10.0, rel=0.25)
    assert all(t.arrival == 0 for t in poisson_trace(lengths, num_requests=5, rate=math.inf, max_tokens=8))


@pytest.mark.parametrize("clients", [1, 7])
def test_closed_loop_keeps_at_most_n_requests_outstanding(trace, clients):
    result = run(trace, PastFuturePolicy(min_history=10), clients=clients)
    assert result.pool_whole and all(r.finished is not None for r in result.records)
    by_id = {r.request_id: r for r in result.records}
    records = [by_id[t.request_id] for t in trace]      # clients send requests in trace order
    assert [r.arrival for r in records[:clients]] == [0.0] * clients
    finishes = sorted(r.finished for r in records)
    for i, r in enumerate(records[clients:]):
        # The (clients + i)-th request goes out when the (i + 1)-th request has come back.
        assert r.arrival == finishes[i]
    for r in records:
        in_flight = sum(1 for o in records if o.arrival <= r.arrival < o.finished)
        assert in_flight <= clients


def test_a_closed_loop_needs_a_client():
    with pytest.raises(ValueError, match="clients"):
        simulate(poisson_trace(synthetic_lengths(10), num_requests=2, rate=1.0, max_tokens=4),
                 ConservativePolicy(), kv_tokens=2000, clients=0)
