"""The Prometheus names README documents stay: this list is the documented contract, copied here on
purpose, so renaming or dropping one in serving/metric_names.py fails this test."""

from prometheus_client.parser import text_string_to_metric_families

from lightllm_nb.scheduling.request import Completion
from lightllm_nb.serving.metric_names import METRICS, readme_table
from lightllm_nb.serving.metrics import ServingMetrics

DOCUMENTED = {
    "lightllm_requests_finished_total": {"model_name", "finish_reason"},
    "lightllm_requests_rejected_total": {"model_name"},
    "lightllm_prompt_tokens_total": {"model_name"},
    "lightllm_generation_tokens_total": {"model_name"},
    "lightllm_prefix_cache_hit_tokens_total": {"model_name"},
    "lightllm_preemptions_total": {"model_name", "reason"},
    "lightllm_recomputed_tokens_total": {"model_name"},
    "lightllm_time_to_first_token_seconds_bucket": {"model_name", "le"},
    "lightllm_time_per_output_token_seconds_bucket": {"model_name", "le"},
    "lightllm_e2e_request_latency_seconds_bucket": {"model_name", "le"},
    "lightllm_request_queue_time_seconds_bucket": {"model_name", "le"},
    "lightllm_request_prefill_time_seconds_bucket": {"model_name", "le"},
    "lightllm_request_decode_time_seconds_bucket": {"model_name", "le"},
    "lightllm_num_requests_running": {"model_name"},
    "lightllm_num_requests_waiting": {"model_name"},
    "lightllm_kv_cache_usage_ratio": {"model_name"},
    "lightllm_kv_cached_tokens": {"model_name"},
}


def exposition_after_one_request() -> dict[str, set[str]]:
    metrics = ServingMetrics("demo")
    timeline = [{"t": 0.0, "step": 1, "event": "queued"},
                {"t": 0.5, "step": 3, "event": "preempted", "code": "pool_full"}]
    metrics.request_finished(Completion("req-0", "hi", [5, 6], "length", 4, {
        "queue_time": 0.1, "prefill_time": 0.2, "decode_time": 0.3, "time_to_first_token": 0.3,
        "time_per_output_token": 0.3, "e2e_latency": 0.6, "cached_tokens": 2, "preemptions": 1,
        "recomputed_tokens": 3}, timeline=timeline))
    text = metrics.render({"running": 1, "waiting": 2, "kv_capacity_tokens": 100, "kv_used_tokens": 25,
                           "kv_cached_tokens": 5}).decode()
    labels: dict[str, set[str]] = {}
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return labels, values


def test_every_documented_metric_is_exposed_with_its_labels():
    labels, _ = exposition_after_one_request()
    for name, expected in DOCUMENTED.items():
        assert name in labels, f"{name} is documented in README but /metrics no longer has it"
        assert labels[name] == expected, (name, labels[name])


def test_the_table_of_names_keeps_every_documented_one_and_readme_table_lists_them():
    samples = {s for spec in METRICS for s in spec.samples}
    assert set(DOCUMENTED) <= samples
    table = readme_table()
    for name in DOCUMENTED:
        assert f"`{name}`" in table


def test_a_request_moves_the_counters_it_should():
    _, values = exposition_after_one_request()
    label = (("model_name", "demo"),)
    assert values[("lightllm_prefix_cache_hit_tokens_total", label)] == 2
    assert values[("lightllm_prompt_tokens_total", label)] == 4
    assert values[("lightllm_recomputed_tokens_total", label)] == 3
    assert values[("lightllm_preemptions_total", (("model_name", "demo"), ("reason", "pool_full")))] == 1
    assert values[("lightllm_preemptions_total", (("model_name", "demo"), ("reason", "preempted_for")))] == 0
    assert values[("lightllm_request_queue_time_seconds_count", label)] == 1
    assert values[("lightllm_kv_cache_usage_ratio", label)] == 0.25
