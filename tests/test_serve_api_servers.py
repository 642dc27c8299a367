"""`lightllm-nb serve --api-server-count 2`: HTTP front ends in processes of their own. One that is
killed outright (SIGKILL: no goodbye) has its requests aborted and their KV freed at once; the other
front end serves on."""

import os
import signal

from serve_process import start_serve
from test_serve import ALICE, BOB, LONG, open_stream, sse_records, wait_idle


def test_a_killed_api_server_frees_its_requests_kv_and_the_other_serves_on(tmp_path):
    host = start_serve(tmp_path, "--api-server-count", "2")
    try:
        before = wait_idle(host)
        assert len(before["api_servers"]) == 2, before
        conn, response = open_stream(host, {"prompt": "Tell me a long story.", "sampling": LONG}, ALICE)
        records = sse_records(response)
        next(records), next(records)
        holding = [pid for pid, running in host.stats()["api_servers"].items() if running == 1]
        assert len(holding) == 1, host.stats()
        os.kill(int(holding[0]), signal.SIGKILL)
        conn.close()
        after = wait_idle(host, timeout=20)
        assert after["kv_used_tokens"] - after["kv_cached_tokens"] == \
            before["kv_used_tokens"] - before["kv_cached_tokens"]
        assert after["steps"] - before["steps"] < LONG["max_tokens"] // 2, "the request ran on after its front end died"
        assert list(after["api_servers"]) == [pid for pid in before["api_servers"] if pid != holding[0]]
        # The survivor serves new requests.
        conn, response = open_stream(host, {"prompt": "Hi", "sampling": {"max_tokens": 3, "temperature": 0}}, BOB)
        assert list(sse_records(response))[-1]["finish_reason"] in ("length", "stop")
        conn.close()
        assert any(f"API server process {holding[0]} died" in line for line in host.log)
    finally:
        assert host.stop() == 0, "".join(host.log)
