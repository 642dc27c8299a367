"""Overlapped steps (the next step launched before this one's tokens reach the host) give the same
results as plain steps: stops seen a step late drop their extra token, nothing leaks."""

import random

import pytest

from lightllm_nb import Engine, SamplingParams


def run(folder, overlap, prompts, sampling, **kwargs):
    with Engine(str(folder), device="cpu", dtype="float64", progress=False, overlap=overlap, **kwargs) as engine:
        done = engine.generate(prompt_token_ids=prompts, sampling=sampling)
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
    return [(c.token_ids, c.finish_reason) for c in done]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_stops_and_lengths_match_plain_steps(tiny_model, kind):
    folder, _ = tiny_model(kind)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(4, 30))] for _ in range(8)]
    free = run(folder, False, prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    # Stop each request on a token from the middle of its free-running output, so stops land
    # on different steps for different requests while the others keep decoding.
    sampling = [SamplingParams(max_tokens=rng.randint(4, 16), temperature=0, ignore_eos=True,
                               stop_token_ids=(ids[rng.randint(1, 10)],)) for ids, _ in free]
    plain = run(folder, False, prompts, sampling, kv_tokens=160, scheduler="aggressive", max_running=6)
    overlapped = run(folder, True, prompts, sampling, kv_tokens=160, scheduler="aggressive", max_running=6)
    assert overlapped == plain
    assert {reason for _, reason in plain} == {"stop", "length"}


def test_seeded_sampling_and_penalties_match_plain_steps(tiny_model):
    folder, _ = tiny_model("qwen2")
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 49152) for _ in range(12)] for _ in range(6)]
    # Penalised rows force the synchronous path; seeded temperature rows can stay overlapped.
    sampling = [SamplingParams(max_tokens=10, temperature=0.9, seed=i,
                               repetition_penalty=1.3 if i % 3 == 0 else 1.0) for i in range(6)]
    assert run(folder, True, prompts, sampling) == run(folder, False, prompts, sampling)


def test_abort_with_a_token_in_flight(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, overlap=True) as engine:
        rid = engine.add_request(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=50, temperature=0))
        for _ in range(4):
            engine.step()
        assert engine._inflight is not None  # a token of this request is still "on the device"
        assert engine.abort(rid)
        outs = [o for o in engine.step() if o.request_id == rid]
        assert outs and outs[0].completion.finish_reason == "abort"
        assert -1 not in outs[0].completion.token_ids and len(outs[0].completion.token_ids) == 3
        assert not engine.has_unfinished()
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
