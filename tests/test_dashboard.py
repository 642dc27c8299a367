"""The Grafana dashboard in deploy/ reads only metrics a real `lightllm-nb serve` exposes; the same
process's responses carry the per-request metrics and timeline (OpenAI extension field, native API)."""

import json
import re
from pathlib import Path

import pytest

from prometheus_client.parser import text_string_to_metric_families

from serve_process import module_host

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"
host = module_host("dashboard")


def queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {name for e in exprs for name in re.findall(r"\blightllm_[a-z_]+\b", e)}


def exposed_samples(host) -> set[str]:
    status, body = host.get("/metrics")
    assert status == 200
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_openai_and_native_responses_carry_metrics_and_timeline(host):
    status, body = host.post("/v1/completions", {"model": "demo", "prompt": "Hello there", "max_tokens": 3,
                                                 "ignore_eos": True})
    assert status == 200, body
    ext = json.loads(body)["lightllm"]
    m = ext["metrics"]
    assert m["queue_time"] + m["prefill_time"] + m["decode_time"] == pytest.approx(m["e2e_latency"], abs=1e-6)
    assert {"cached_tokens", "preemptions", "recomputed_tokens"} <= set(m)
    events = [e["event"] for e in ext["timeline"]]
    assert events[0] == "queued" and "admitted" in events and "first_token" in events and events[-1] == "finished"
    status, body = host.post("/api/generate", {"prompt": "Hello there", "stream": False,
                                               "sampling": {"max_tokens": 2, "ignore_eos": True}})
    assert status == 200, body
    completion = json.loads(body)
    # The same prompt again: its prompt tokens (all but the last) come from the prefix cache.
    admitted = next(e for e in completion["timeline"] if e["event"] == "admitted")
    assert admitted["cached_tokens"] == completion["metrics"]["cached_tokens"] == completion["prompt_tokens"] - 1


def test_every_metric_the_dashboard_queries_is_exposed(host):
    dashboard = json.loads(DASHBOARD.read_text())
    queried = queried_metrics(dashboard)
    # TTFT, TPOT, the phases, queue, KV use, hit rate and preemptions are all on it.
    assert {"lightllm_time_to_first_token_seconds_bucket", "lightllm_time_per_output_token_seconds_bucket",
            "lightllm_request_queue_time_seconds_bucket", "lightllm_request_prefill_time_seconds_bucket",
            "lightllm_request_decode_time_seconds_bucket", "lightllm_num_requests_waiting",
            "lightllm_kv_cache_usage_ratio", "lightllm_prefix_cache_hit_tokens_total", "lightllm_prompt_tokens_total",
            "lightllm_preemptions_total"} <= queried
    status, _ = host.post("/api/generate", {"prompt": "Hi", "stream": False, "sampling": {"max_tokens": 1}})
    assert status == 200
    missing = queried - exposed_samples(host)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {sorted(missing)}"


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert 'model_name=~"$model_name"' in t["expr"], t["expr"]
