"""asyncio callers on one event loop: concurrent streams, cancellation that aborts, async twins."""

import asyncio

import pytest

from lightllm_nb import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", dtype="float64", progress=False, kv_tokens=4096, max_running=32) as eng:
        yield eng


def test_many_concurrent_astreams_match_generate(engine):
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(12)]
    expected = [c.text for c in engine.generate(prompt_token_ids=prompts, sampling=GREEDY)]
    client = engine.client(user="async")

    async def one(ids):
        stream = await client.astream(prompt_token_ids=ids, sampling=GREEDY)
        text = "".join([delta async for delta in stream])
        assert text == stream.completion.text
        return text

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected


def test_cancelling_a_task_aborts_its_request_and_frees_its_kv(engine):
    client = engine.client(user="async")
    streams = []

    async def reader():
        stream = await client.astream(prompt_token_ids=[9, 10, 11], sampling=LONG)
        streams.append(stream)
        async for _ in stream:
            pass

    async def main():
        tasks = [asyncio.create_task(reader()) for _ in range(4)]
        while len(streams) < 4 or not all(s._handle.started for s in streams):
            await asyncio.sleep(0.01)
        for task in tasks[:3]:
            task.cancel()
        survivor = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        done = await client.agenerate(prompt_token_ids=[[3, 4]], sampling=survivor)
        assert done[0].finish_reason == "length"
        assert await client.aabort(streams[3].request_id) is True
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results[:3])
        stats = await client.astats()
        assert stats["user"] == {"name": "async", "running": 0, "waiting": 0}

    asyncio.run(main())
    assert [s.completion.finish_reason for s in streams] == ["abort"] * 4
    assert all(len(s.completion.token_ids) < 400 for s in streams)
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()


def test_async_chat_and_subscription(engine):
    client = engine.client(user="async")

    async def main():
        events = await client.asubscribe()
        reply = await client.achat([{"role": "user", "content": "hi"}], {"max_tokens": 3, "temperature": 0})
        first = await asyncio.wait_for(events.__anext__(), 5)
        events.close()
        return reply, first

    reply, first = asyncio.run(main())
    assert reply.completion_tokens <= 3 and reply.finish_reason in ("length", "stop")
    assert first.rows and all(r.user == "async" for r in first.rows)
