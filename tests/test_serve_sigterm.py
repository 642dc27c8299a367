"""SIGTERM with requests in flight: new requests are refused, in-flight ones finish or are aborted
after --shutdown-timeout, every stream ends, and the process exits 0."""

import json
import threading
import time

import pytest

from serve_process import start_serve
from test_serve import ALICE, BOB, open_stream, sse_records


@pytest.mark.parametrize("api_servers", ["0", "2"])
def test_sigterm_with_requests_in_flight_exits_cleanly(tmp_path, api_servers):
    host = start_serve(tmp_path, "--shutdown-timeout", "1.5", "--api-server-count", api_servers)
    ends = {}

    def read(name, token, max_tokens):
        conn, response = open_stream(host, {"prompt": f"Story {name}:", "sampling": {
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}, token)
        records = list(sse_records(response))
        conn.close()
        ends[name] = records[-1]

    readers = [threading.Thread(target=read, args=(f"long{i}", ALICE, 400)) for i in range(3)]
    readers.append(threading.Thread(target=read, args=("short", BOB, 3)))
    for t in readers:
        t.start()
    deadline = time.monotonic() + 60
    while host.stats()["running"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    host.process.terminate()
    assert host.process.wait(30) == 0, "".join(host.log)
    assert time.monotonic() - started < 15
    for t in readers:
        t.join(10)
        assert not t.is_alive(), "a stream hung after the server stopped"
    assert ends["short"]["finish_reason"] == "length"
    for i in range(3):
        assert ends[f"long{i}"]["finished"] and ends[f"long{i}"]["finish_reason"] == "abort"
        assert ends[f"long{i}"]["completion"]["token_ids"]  # they did run
    assert any("stopped" in line for line in host.log)
    assert json.dumps(ends)  # every stream ended with a parsable last record
