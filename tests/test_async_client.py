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


def test_each_event_loop_is_woken_once_per_step_not_once_per_output(engine):
    """12 streams read on one event loop: the driver wakes the loop once per step for all of them."""
    client = engine.client(user="async")
    prompts = [[5 + i, 6, 7] for i in range(12)]

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kw: wakeups.append(args[0]) or threadsafe(*args, **kw)
        events = await client.asubscribe(maxsize=1024)
        streams = [await client.astream(prompt_token_ids=p, sampling=GREEDY) for p in prompts]

        async def read(stream):
            return [out async for out in stream._handle]
        outputs = await asyncio.gather(*(read(s) for s in streams))  # all 12 asleep together
        loop.call_soon_threadsafe = threadsafe
        steps = 0
        while True:
            try:
                events.get(timeout=0)
            except TimeoutError:
                break
            steps += 1
        events.close()
        return wakeups, steps, outputs

    wakeups, steps, outputs = asyncio.run(main())
    delivered = sum(len(o) for o in outputs)
    assert delivered >= 12 * GREEDY.max_tokens
    assert 1 <= len(wakeups) <= steps, f"{len(wakeups)} wake-ups of the event loop for {steps} steps"


def test_a_reader_that_fell_behind_takes_everything_produced_in_one_output(engine):
    expected = engine.generate(prompt_token_ids=[[8, 9, 10]], sampling=GREEDY)[0]
    handle = engine.driver().submit([8, 9, 10], GREEDY, user="async")
    handle.result(timeout=60)  # every output is queued, none read

    async def read():
        return [out async for out in handle.coalesced()]

    (merged,) = asyncio.run(read())
    assert merged.new_token_ids == expected.token_ids
    assert merged.text_delta == expected.text
    assert merged.finished and merged.finish_reason == "length" and merged.completion.text == expected.text
