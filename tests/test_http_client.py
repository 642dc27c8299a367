"""HTTPClient and LocalClient pass the same conformance checks (one test body, both clients), and
give the same greedy text for the same prompt."""

import asyncio
import time

import pytest

from lightllm_nb import Engine, InvalidRequestError, SamplingParams
from lightllm_nb.serving.client import Client, LocalClient
from lightllm_nb.serving.http_client import HTTPClient
from serve_process import module_host

GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


host = module_host("serve-client", api_server_counts=(0, 2))


@pytest.fixture(scope="module")
def local_engine():
    engine = Engine("demo", device="cpu", kv_tokens=8192, seed=0, progress=False)
    yield engine
    engine.close()


@pytest.fixture(params=["local", "http"])
def client(request, host, local_engine):
    if request.param == "local":
        made = LocalClient(local_engine.driver(), user="alice")
    else:
        made = HTTPClient(host.url, "alice-token-123")
    yield made
    made.close()


def wait_until_idle(client, timeout=30):
    deadline = time.monotonic() + timeout
    while (stats := client.stats())["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats


def test_sync_conformance(client):
    assert isinstance(client, Client) and client.user == "alice" and client.model_name
    done = client.generate(["The capital of France is", "Two plus two is"], GREEDY)
    assert [d.finish_reason in ("stop", "length") for d in done] == [True, True]
    stream = client.stream("The capital of France is", GREEDY)
    assert "".join(stream) == stream.completion.text == done[0].text
    assert stream.request_id == stream.completion.request_id
    reply = client.chat([{"role": "user", "content": "Say hi"}], GREEDY)
    assert reply.text and reply.prompt_tokens > 3
    # Leaving a stream early aborts its request, which frees its slots.
    stream = client.stream("Count to a thousand:", LONG)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert wait_until_idle(client)["running"] == 0
    assert client.abort("no-such-request") is False
    with pytest.raises(InvalidRequestError):
        client.generate("hi", SamplingParams(max_tokens=10**9))
    with pytest.raises(InvalidRequestError):
        client.stream(prompt_token_ids=[10**9])


def test_subscribe_conformance(client):
    subscription = client.subscribe()
    stream = client.stream("Hello there", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    rid = stream.request_id
    text = "".join(stream)
    seen = []
    while not any(row.request_id == rid for e in seen for row in e.rows):
        seen.append(next(iter(subscription)))
    subscription.close()
    assert text and all(e.kv_capacity > 0 for e in seen)


def test_async_conformance(client):
    async def main():
        done = await client.agenerate(["The capital of France is"], GREEDY)
        stream = await client.astream("The capital of France is", GREEDY)
        text = "".join([d async for d in stream])
        reply = await client.achat([{"role": "user", "content": "Say hi"}], GREEDY)
        long = await client.astream("Count to a thousand:", LONG)
        reader = asyncio.ensure_future(_read_all(long))
        await asyncio.sleep(0.5)
        reader.cancel()  # cancelling the reading task aborts the request
        with pytest.raises(asyncio.CancelledError):
            await reader
        stats = await client.astats()
        return done, text, stream, reply, stats, await client.aabort("no-such-request")

    done, text, stream, reply, stats, aborted = asyncio.run(main())
    assert text == done[0].text == stream.completion.text and reply.text
    assert aborted is False and "kv_capacity_tokens" in stats
    assert wait_until_idle(client)["running"] == 0


async def _read_all(stream):
    return [d async for d in stream]


def test_both_clients_give_the_same_greedy_text(host, local_engine):
    local = LocalClient(local_engine.driver(), user="bob")
    remote = HTTPClient(host.url, "bob-token-4567")
    prompts = ["Once upon a time", "The best way to learn Python is"]
    assert [c.text for c in local.generate(prompts, GREEDY)] == [c.text for c in remote.generate(prompts, GREEDY)]
    remote.close()
