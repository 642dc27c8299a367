"""Per-request timelines on a real engine (tiny random Llama, CPU) under a tight KV budget: a
preemption by a higher-priority request, a deferral for memory, a prefix reused; the timeline's steps
match the StepEvents, its phases match the independently kept metrics, and explain() names the
real reason for each."""

import pytest

from lightllm_nb.engine.engine import Engine
from lightllm_nb.sampling_params import SamplingParams
from lightllm_nb.telemetry.explain import phase_totals


def run(eng, events):
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.completion is not None:
                done[out.request_id] = out.completion
    return done


def decision_steps(events, kind, request_id):
    return [e.step for e in events for d in e.decisions if d.kind == kind and d.request_id == request_id]


@pytest.fixture(scope="module")
def tight_run(tiny_model):
    """Round 1: low (priority 0) and high (priority 1) fill a 40-token pool, so high preempts low;
    big waits for memory. Round 2: a request whose prompt starts with big's prompt (the newest in the prefix cache)."""
    folder, _ = tiny_model("llama")
    events = []
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=40, max_running=4, max_batch_tokens=64,
                scheduler="aggressive", prefix_cache=True) as eng:
        eng.subscribe(events.append)
        greedy = dict(max_tokens=14, ignore_eos=True)
        low = eng.add_request(prompt_token_ids=list(range(300, 312)), sampling=SamplingParams(**greedy))
        high = eng.add_request(prompt_token_ids=list(range(400, 412)), sampling=SamplingParams(**greedy),
                               priority=1)
        big = eng.add_request(prompt_token_ids=list(range(500, 524)), sampling=SamplingParams(max_tokens=2,
                                                                                             ignore_eos=True))
        done = run(eng, events)
        reuse = eng.add_request(prompt_token_ids=list(range(500, 524)) + [7, 8, 9],
                                sampling=SamplingParams(max_tokens=2, ignore_eos=True))
        done.update(run(eng, events))
    return done, events, {"low": low, "high": high, "big": big, "reuse": reuse}


def test_a_preempted_request_shows_preempted_then_resumed_at_the_steps_of_those_decisions(tight_run):
    done, events, ids = tight_run
    low = done[ids["low"]]
    kinds = [e["event"] for e in low.timeline]
    assert kinds[:3] == ["queued", "admitted", "prefill"] and kinds[-1] == "finished", kinds
    preempted = [e for e in low.timeline if e["event"] == "preempted"]
    resumed = [e for e in low.timeline if e["event"] == "resumed"]
    assert preempted, kinds
    assert [e["step"] for e in preempted] == decision_steps(events, "preempt", ids["low"])
    assert [e["step"] for e in resumed] == decision_steps(events, "resume", ids["low"])
    assert low.metrics["preemptions"] == len(preempted) == len(resumed)
    for p, r in zip(preempted, resumed):
        assert p["step"] < r["step"] and kinds.index("preempted") < kinds.index("resumed")
        assert p["code"] == "preempted_for" and p["by"] == ids["high"] and p["by_priority"] == 1 > p["priority"]
        assert 0 <= p["kept"] <= p["computed"] and r["recomputed"] == p["computed"] - r["cached_tokens"]
    assert low.metrics["recomputed_tokens"] == sum(r["recomputed"] for r in resumed)
    # Nothing per token: a 14-token answer has a handful of entries, not one per token.
    assert len(low.timeline) < 8 + 4 * len(preempted)
    first = next(e for e in low.timeline if e["event"] == "first_token")
    assert first["step"] == next(e.step for e in events if any(d.kind == "admit" and d.request_id == ids["low"]
                                                               for d in e.decisions))


def test_a_request_waiting_for_memory_is_deferred_once_per_reason_with_first_last_and_count(tight_run):
    done, events, ids = tight_run
    big = done[ids["big"]]
    deferred = [e for e in big.timeline if e["event"] == "deferred"]
    defer_steps = decision_steps(events, "defer", ids["big"])
    assert deferred and sum(e["count"] for e in deferred) == len(defer_steps)
    assert deferred[0]["step"] == defer_steps[0] and deferred[-1]["last_step"] == defer_steps[-1]
    assert all(e["code"] == "policy" and e["need"] > e["free"] for e in deferred)
    assert big.metrics["queue_time"] >= deferred[-1]["last_t"] - deferred[0]["t"]


def test_a_reused_prefix_shows_its_cached_tokens(tight_run):
    done, events, ids = tight_run
    reuse = done[ids["reuse"]]
    admitted = next(e for e in reuse.timeline if e["event"] == "admitted")
    hit = [d for e in events for d in e.decisions if d.kind == "prefix_hit" and d.request_id == ids["reuse"]]
    assert admitted["cached_tokens"] == reuse.metrics["cached_tokens"] == hit[0].numbers["matched"] >= 24
    assert admitted["own"] == admitted["cached_tokens"]
    assert next(e for e in reuse.timeline if e["event"] == "prefill")["tokens"] == 27 - admitted["cached_tokens"]


def test_phases_add_up_to_the_end_to_end_time_within_one_step(tight_run):
    done, events, _ = tight_run
    longest_step = max(e.duration for e in events)
    for c in done.values():
        m = c.metrics
        assert m["queue_time"] + m["prefill_time"] + m["decode_time"] == pytest.approx(m["e2e_latency"], abs=1e-6)
        # The timeline, read on its own, tells the same story as the scheduler's own accounting.
        totals = phase_totals(c.timeline)
        assert totals["queued"] + totals["preempted"] == pytest.approx(m["queue_time"], abs=longest_step)
        assert totals["prefill"] == pytest.approx(m["prefill_time"], abs=longest_step)
        assert totals["decode"] == pytest.approx(m["decode_time"], abs=longest_step)
        assert sum(totals.values()) == pytest.approx(m["e2e_latency"], abs=longest_step)
        finished = c.timeline[-1]
        assert finished["event"] == "finished" and finished["reason"] == c.finish_reason == "length"


def test_explain_names_the_real_reason_for_each(tight_run):
    done, events, ids = tight_run
    low = done[ids["low"]]
    step = next(e["step"] for e in low.timeline if e["event"] == "preempted")
    text = str(low.explain())
    assert f"preempted at step {step} to make room for a higher-priority request ({ids['high']})" in text, text
    assert "tokens recomputed" in text
    big = done[ids["big"]]
    d = next(e for e in big.timeline if e["event"] == "deferred")
    assert f"did not fit in the " in str(big.explain()) and "waited" in str(big.explain()), str(big.explain())
    assert f"its {d['need']} prompt tokens" in str(big.explain())
    reuse = done[ids["reuse"]]
    cached = reuse.metrics["cached_tokens"]
    assert f"{cached} of 27 prompt tokens came from the prefix cache ({cached} own)" in str(reuse.explain())
    high = str(done[ids["high"]].explain())
    assert "preempted" not in high and "no prompt tokens came from the prefix cache" in high
    html = low.explain()._repr_html_()
    assert html.count("background:#e45756") >= 1 and "background:#54a24b" in html  # preempted and decode bars


def test_the_engine_hosts_counters_follow_the_real_completions(tight_run):
    from prometheus_client.parser import text_string_to_metric_families

    from lightllm_nb.serving.metrics import ServingMetrics

    done, _, ids = tight_run
    metrics = ServingMetrics("tiny")
    for c in done.values():
        metrics.request_finished(c)
    values = {(s.name, s.labels.get("reason")): s.value
              for f in text_string_to_metric_families(metrics.render({}).decode()) for s in f.samples}
    low = done[ids["low"]]
    assert values[("lightllm_preemptions_total", "preempted_for")] == low.metrics["preemptions"] >= 1
    assert values[("lightllm_recomputed_tokens_total", None)] == low.metrics["recomputed_tokens"] > 0
    assert values[("lightllm_prefix_cache_hit_tokens_total", None)] == sum(c.metrics["cached_tokens"]
                                                                           for c in done.values()) >= 24
    assert values[("lightllm_request_decode_time_seconds_count", None)] == len(done)
