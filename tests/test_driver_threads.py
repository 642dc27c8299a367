"""Many threads on one engine through its driver loop: every request ends exactly once, with the
output a single thread gets, and no KV slot is lost, whatever the policy, page size and aborts."""

import random
import threading
from collections import Counter

import pytest

from lightllm_nb import Engine, SamplingParams

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


def tiny_engine(folder, **kwargs):
    # float64: batch composition cannot flip a greedy choice, so any interleaving gives the same tokens.
    return Engine(str(folder), device="cpu", dtype="float64", progress=False, **kwargs)


def prompts_for(seed, count):
    rng = random.Random(seed)
    shared = [rng.randrange(3, 49152) for _ in range(12)]  # some prompts share a prefix: cache hits too
    return [(shared if i % 3 == 0 else []) + [rng.randrange(3, 49152) for _ in range(rng.randint(2, 10))]
            for i in range(count)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Single-thread greedy completions of the prompts every test below uses."""
    folder, _ = tiny_model("llama")
    prompts = prompts_for(seed=3, count=16)
    with tiny_engine(folder, kv_tokens=2048, prefix_cache=False) as engine:
        done = engine.generate(prompt_token_ids=prompts, sampling=GREEDY)
    return folder, prompts, [(c.text, c.token_ids) for c in done]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["past_future", "conservative", "aggressive"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_eight_threads_with_random_aborts(reference, policy, page_size):
    folder, prompts, expected = reference
    # A small pool (four prompts' worth) and two users with a cap: preemption, deferrals and cache reuse.
    with tiny_engine(folder, kv_tokens=96, page_size=page_size, scheduler=policy, max_running=6,
                     max_batch_tokens=32, max_running_per_user=4) as engine:
        finished = Counter()
        events = engine.driver().subscribe(maxsize=100_000)
        results, stream_ids, errors = {}, [], []
        rng = random.Random(page_size * 7 + len(policy))

        def worker(t):
            client = engine.client(user=f"user{t % 2}")
            try:
                mine = list(range(t * 2, t * 2 + 2))
                if t % 2 == 0:  # generate: both prompts in one call
                    for i, c in zip(mine, client.generate(prompt_token_ids=[prompts[i] for i in mine],
                                                          sampling=GREEDY)):
                        results[i] = (c.finish_reason, c.text, c.token_ids)
                else:           # stream: one prompt after the other, text deltas as they come
                    for i in mine:
                        stream = client.stream(prompt_token_ids=prompts[i], sampling=GREEDY)
                        stream_ids.append((client, stream.request_id))
                        text = "".join(stream)
                        c = stream.completion
                        assert text == c.text
                        results[i] = (c.finish_reason, c.text, c.token_ids)
            except Exception as err:  # surfaced below: a thread's assert must fail the test
                errors.append(err)

        def aborter():
            for _ in range(6):
                threading.Event().wait(rng.uniform(0.0, 0.05))
                if stream_ids:
                    client, rid = rng.choice(stream_ids)
                    client.abort(rid)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)] + [threading.Thread(target=aborter)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(100)
        assert not errors, errors
        assert sorted(results) == list(range(16))
        for i, (reason, text, tokens) in results.items():
            if reason == "abort":  # whatever it produced before the abort is what the reference starts with
                assert tokens == expected[i][1][:len(tokens)]
            else:
                assert reason == "length" and (text, tokens) == expected[i], i
        assert engine.stats()["running"] == 0 and not engine.has_unfinished()
        engine.clear_prefix_cache()
        assert engine.pool.is_whole(), "a KV slot leaked"
        events.close()
        for event in events:
            finished.update(d.request_id for d in event.decisions if d.kind == "finish")
        assert events.dropped == 0
        assert len(finished) == 16 and set(finished.values()) == {1}, "every request ends exactly once"
