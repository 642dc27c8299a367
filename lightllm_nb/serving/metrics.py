"""Prometheus metrics of the engine host, in a registry of its own (never the process-global one,
so two apps in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from .metric_names import register


class ServingMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._model_name = model_name
        # Names, kinds and help live in metric_names.py: they are a documented, tested contract.
        self._m = register(self.registry, model_name)

    def request_rejected(self) -> None:
        self._m["lightllm_requests_rejected"].inc()

    def request_finished(self, completion) -> None:
        m, c, model = completion.metrics, self._m, self._model_name
        c["lightllm_requests_finished"].labels(model_name=model, finish_reason=completion.finish_reason).inc()
        c["lightllm_prompt_tokens"].inc(completion.prompt_tokens)
        c["lightllm_generation_tokens"].inc(completion.completion_tokens)
        c["lightllm_prefix_cache_hit_tokens"].inc(m.get("cached_tokens") or 0)
        c["lightllm_recomputed_tokens"].inc(m.get("recomputed_tokens") or 0)
        for entry in completion.timeline or ():
            if entry["event"] == "preempted":
                c["lightllm_preemptions"].labels(model_name=model, reason=entry["code"]).inc()
        for name, key in (("lightllm_time_to_first_token_seconds", "time_to_first_token"),
                          ("lightllm_time_per_output_token_seconds", "time_per_output_token"),
                          ("lightllm_e2e_request_latency_seconds", "e2e_latency"),
                          ("lightllm_request_queue_time_seconds", "queue_time"),
                          ("lightllm_request_prefill_time_seconds", "prefill_time"),
                          ("lightllm_request_decode_time_seconds", "decode_time")):
            if m.get(key) is not None:
                c[name].observe(m[key])

    def render(self, stats: dict) -> bytes:
        """The text exposition, with the gauges read from a fresh `stats()` of the engine."""
        c = self._m
        c["lightllm_num_requests_running"].set(stats.get("running", 0))
        c["lightllm_num_requests_waiting"].set(stats.get("waiting", 0))
        capacity = stats.get("kv_capacity_tokens") or 1
        c["lightllm_kv_cache_usage_ratio"].set(stats.get("kv_used_tokens", 0) / capacity)
        c["lightllm_kv_cached_tokens"].set(stats.get("kv_cached_tokens", 0))
        return generate_latest(self.registry)
