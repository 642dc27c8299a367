"""A real `lightllm-nb serve` (demo model, CPU) on loopback: native API, SSE, auth, per-user
isolation, client disconnects, /metrics and the event websocket."""

import http.client
import json
import time
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_process import OPERATOR_KEY, module_host

ALICE, BOB, PROXY = "alice-token-123", "bob-token-4567", "proxy-token-890"
LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}


host = module_host("serve", api_server_counts=(0, 1))


def open_stream(host, body, token, headers=None):
    """POST a streaming /api/generate; returns the connection and response, headers read."""
    parts = urllib.parse.urlsplit(host.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn, response


def sse_records(response):
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def wait_idle(host, timeout=30):
    """Stats once nothing runs or waits; what a finished or aborted request held is free again."""
    deadline = time.monotonic() + timeout
    while True:
        stats = host.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_health_needs_no_token_but_everything_else_does(host):
    status, body = host.get("/health", token=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    for path in ("/v1/models", "/api/stats", "/metrics"):
        for token in (None, "wrong-token-000"):
            status, body = host.get(path, token=token)
            assert status == 401, (path, token, body)
            error = json.loads(body)["error"]
            assert "token" in error["message"] and error["type"] == "authentication_error"
    status, _ = host.post("/api/generate", {"prompt": "hi", "stream": False}, token="wrong-token-000")
    assert status == 401
    assert host.get("/v1/models", token=ALICE)[0] == 200


def test_raw_sse_lines_carry_deltas_and_the_completion_last(host):
    conn, response = open_stream(host, {"prompt": "The capital of France is", "sampling": {"max_tokens": 12,
                                                                                           "temperature": 0}}, ALICE)
    assert response.getheader("Content-Type").startswith("text/event-stream")
    records = list(sse_records(response))
    conn.close()
    assert len(records) >= 2 and all(not r["finished"] for r in records[:-1])
    last = records[-1]
    assert last["finished"] and last["finish_reason"] in ("stop", "length")
    completion = last["completion"]
    assert "".join(r["text"] for r in records) == completion["text"]
    assert [t for r in records for t in r["token_ids"]] == completion["token_ids"]
    assert completion["request_id"] == response.getheader("X-Request-Id") == last["request_id"]
    # The same request not streamed gives the same greedy answer.
    status, body = host.post("/api/generate", {"prompt": "The capital of France is", "stream": False,
                                               "sampling": {"max_tokens": 12, "temperature": 0}}, ALICE)
    assert status == 200 and json.loads(body)["text"] == completion["text"]
    # One INFO line per request, naming it and its user.
    deadline = time.monotonic() + 10
    while not [line for line in host.log if completion["request_id"] in line and "user=alice" in line]:
        assert time.monotonic() < deadline, "".join(host.log[-20:])
        time.sleep(0.05)


def test_a_user_cannot_abort_or_see_another_users_request(host):
    conn, response = open_stream(host, {"prompt": "Count slowly:", "sampling": LONG}, ALICE)
    rid = response.getheader("X-Request-Id")
    next(sse_records(response))  # it is running
    for token, headers in ((BOB, None), (PROXY, {"X-LightLLM-User": "bob"})):
        status, body = host.post(f"/api/abort/{rid}", b"", token=token, headers=headers)
        assert status == 404, body
        assert json.loads(body)["error"]["message"]  # the same answer as for an unknown id
    assert host.post("/api/abort/req-does-not-exist", b"", token=BOB)[0] == 404
    bob_stats = host.stats(BOB)
    assert rid not in json.dumps(bob_stats) and "alice" not in json.dumps(bob_stats)
    # A header naming a user is ignored for a plain user token: alice's token stays alice.
    status, body = host.post(f"/api/abort/{rid}", b"", token=BOB, headers={"X-LightLLM-User": "alice"})
    assert status == 404
    # The proxy acting for alice, however, may.
    status, body = host.post(f"/api/abort/{rid}", b"", token=PROXY, headers={"X-LightLLM-User": "alice"})
    assert status == 200 and json.loads(body) == {"aborted": True}
    records = list(sse_records(response))
    conn.close()
    assert records[-1]["finish_reason"] == "abort"
    wait_idle(host)


def test_a_client_that_disconnects_mid_stream_frees_its_kv(host):
    before = wait_idle(host)
    aborted_before = metric_values(host).get("lightllm_requests_finished_total,finish_reason=abort", 0)
    conn, response = open_stream(host, {"prompt": "Tell me a long story.", "sampling": LONG}, ALICE)
    records = sse_records(response)
    next(records), next(records)
    assert host.stats()["running"] == 1
    conn.sock.close()  # the client goes away without a word
    conn.close()
    after = wait_idle(host, timeout=20)
    # Its pages are free or only held as a reusable cached prefix, like before it came.
    assert after["kv_used_tokens"] - after["kv_cached_tokens"] == before["kv_used_tokens"] - before["kv_cached_tokens"]
    assert after["steps"] - before["steps"] < LONG["max_tokens"] // 2, "the request ran on after its client left"
    # The same for a client that waits for a whole (not streamed) answer and leaves.
    parts = urllib.parse.urlsplit(host.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps({"prompt": "Another long story.", "sampling": LONG,
                                                      "stream": False}),
                 {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while host.stats()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn.sock.close()
    conn.close()
    before = after
    after = wait_idle(host, timeout=20)
    assert after["kv_used_tokens"] - after["kv_cached_tokens"] == before["kv_used_tokens"] - before["kv_cached_tokens"]
    assert after["steps"] - before["steps"] < LONG["max_tokens"] // 2, "the request ran on after its client left"
    # Both count as aborted requests in /metrics.
    aborted = metric_values(host).get("lightllm_requests_finished_total,finish_reason=abort", 0) - aborted_before
    assert aborted == 2


def metric_values(host) -> dict:
    status, body = host.get("/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[key] = sample.value
    return values


def test_metrics_parse_and_move(host):
    before = metric_values(host)
    status, _ = host.post("/api/generate", {"prompt": "Hello", "stream": False,
                                            "sampling": {"max_tokens": 5, "ignore_eos": True}}, BOB)
    assert status == 200
    after = metric_values(host)
    moved = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert moved("lightllm_requests_finished_total,finish_reason=length") == 1
    assert moved("lightllm_generation_tokens_total") == 5
    assert moved("lightllm_prompt_tokens_total") >= 1
    assert moved("lightllm_time_to_first_token_seconds_count") == 1
    assert moved("lightllm_e2e_request_latency_seconds_count") == 1
    for gauge in ("lightllm_num_requests_running", "lightllm_num_requests_waiting", "lightllm_kv_cache_usage_ratio",
                  "lightllm_kv_cached_tokens", "lightllm_preemptions_total,reason=pool_full"):
        assert gauge in after, sorted(after)


def test_event_stream_is_redacted_for_users_and_whole_for_the_operator(host):
    from tornado.httpclient import HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    ws_url = host.url.replace("http://", "ws://") + "/api/events?pages=1"

    async def watch(token, n):
        ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"Bearer {token}"}))
        frames = []
        while len([f for f in frames if isinstance(f, str)]) < n:
            frames.append(await ws.read_message())
        ws.close()
        return frames

    conn, response = open_stream(host, {"prompt": "Events please", "sampling": {**LONG, "max_tokens": 40}}, ALICE)
    rid = response.getheader("X-Request-Id")
    bob_frames = IOLoop.current().run_sync(lambda: watch(BOB, 3), timeout=60)
    operator_frames = IOLoop.current().run_sync(lambda: watch(OPERATOR_KEY, 3), timeout=60)
    list(sse_records(response))
    conn.close()
    bob_events = [json.loads(f) for f in bob_frames if isinstance(f, str)]
    assert all(r["request_id"] != rid and r["user"] != "alice" for e in bob_events for r in e["rows"])
    assert any(e["rows"] for e in bob_events)  # bob sees that something runs, not whose
    operator_events = [json.loads(f) for f in operator_frames if isinstance(f, str)]
    assert any(r["request_id"] == rid and r["user"] == "alice" for e in operator_events for r in e["rows"])
    pages = [f for f in operator_frames if isinstance(f, bytes)]
    assert pages and len(pages[0]) == 4 * operator_events[0]["kv_capacity"] // operator_events[0]["page_size"]
    # A socket without a token is refused before it opens.
    with pytest.raises(Exception) as err:
        IOLoop.current().run_sync(lambda: websocket_connect(ws_url), timeout=30)
    assert "401" in str(err.value)
