"""What aborts a stream is the same for the in-process and the HTTP client: leaving a loop over it
early, even while a variable still holds the stream; dropping it unread; the end of a `with` block;
and `async for` works straight over `client.astream(...)` (awaiting it first still works)."""

import asyncio
import time

import pytest

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.serving.client import LocalClient
from lightllm_nb.serving.http_client import HTTPClient
from serve_process import module_host

GREEDY = SamplingParams(max_tokens=8, temperature=0)
ENDLESS = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)  # minutes on the CPU if not aborted

host = module_host("stream-exits")


@pytest.fixture(scope="module")
def local_engine():
    with Engine("demo", device="cpu", kv_tokens=8192, progress=False) as engine:
        yield engine


@pytest.fixture(params=["local", "http"])
def client(request, host, local_engine):
    made = LocalClient(local_engine.driver(), user="alice") if request.param == "local" else \
        HTTPClient(host.url, "alice-token-123")
    yield made
    made.close()


def assert_idle_soon(client, timeout=15):
    deadline = time.monotonic() + timeout
    while (stats := client.stats())["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, f"still generating: {stats}"
        time.sleep(0.05)


def test_breaking_out_of_a_stream_held_in_a_variable_aborts_it(client):
    stream = client.stream("Count to a thousand:", ENDLESS)
    for _ in stream:
        break
    assert_idle_soon(client)
    assert stream.request_id  # still held: the loop's leaving was seen, not the stream's collection


def test_a_stream_dropped_unread_aborts_its_request(client):
    stream = client.stream("Count to a thousand:", ENDLESS)
    assert stream.request_id
    del stream
    assert_idle_soon(client)


def test_the_end_of_a_with_block_aborts_the_stream(client):
    with client.stream("Count to a thousand:", ENDLESS) as stream:
        assert stream.request_id
    assert_idle_soon(client)


def test_async_for_runs_straight_over_astream_and_leaving_it_aborts(client):
    async def main():
        direct = "".join([delta async for delta in client.astream("The capital of France is", GREEDY)])
        awaited = await client.astream("The capital of France is", GREEDY)
        text = "".join([delta async for delta in awaited])
        held = client.astream("Count to a thousand:", ENDLESS)
        async for _ in held:
            break
        await asyncio.sleep(0.1)  # asyncio closes the left loop's generator on a later turn
        return direct, text

    direct, text = asyncio.run(main())
    assert direct == text and direct
    assert_idle_soon(client)
