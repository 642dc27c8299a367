"""Overlapped constrained steps (engine.py, engine/inflight.py): a step's mask is filled on the mask
threads while the step thread handles the previous tokens and builds the next step, whose inputs
queue the deferred sampling first. Same tokens as plain steps, with or without a listener; an abort
or a failing mask while a sampling waits finishes its requests and leaves the engine usable."""

import json

import jsonschema
import pytest

from lightllm_nb import Engine, SamplingParams

from structured_schemas import PERSON

PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["red", "green", "blue", "light blue"]


@pytest.fixture(scope="module")
def engine():
    with Engine("demo", device="cpu", progress=False, seed=0, overlap=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def stepped():
    """An engine driven step by step by the test (no driver loop)."""
    with Engine("demo", device="cpu", progress=False, seed=0, overlap=True) as engine:
        yield engine


def run_alone(engine, prompt, params):
    """A request's Completion, through the low-level API."""
    rid = engine.add_request(prompt, params)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.completion


def jobs():
    prompts = ["Write a person record as JSON:", "The capital of France is", "Pick a colour:", "Call me at"]
    params = [SamplingParams(json_schema=PERSON, temperature=0.8, seed=4, max_tokens=120),
              SamplingParams(temperature=0.8, seed=9, max_tokens=20),
              SamplingParams(choice=CHOICES, temperature=0.8, seed=2),
              SamplingParams(regex=PHONE, temperature=0, max_tokens=24)]
    return prompts, params


def test_a_listener_sees_each_masks_allowed_tokens_and_the_tokens_stay_the_same(engine):
    prompts, params = jobs()
    engine.overlap = False
    try:
        plain = engine.generate(prompts, params)
    finally:
        engine.overlap = True
    quiet = engine.generate(prompts, params)  # the sampling deferred to the next step's inputs
    events = []
    unsubscribe = engine.subscribe(events.append)
    watched = engine.generate(prompts, params)  # sampled within its step, for the event's counts
    unsubscribe()
    assert [c.token_ids for c in quiet] == [c.token_ids for c in plain] == [c.token_ids for c in watched]
    jsonschema.validate(json.loads(watched[0].text), PERSON)
    assert watched[2].text in CHOICES
    constrained = {c.request_id for c in watched[:1] + watched[2:]}
    counts = [(row.request_id, row.allowed_tokens) for e in events for row in e.rows if row.request_id in constrained]
    assert all(1 <= n <= engine.config.vocab_size for _, n in counts if n is not None)
    # None only in the one step run past a stop seen late (no mask for a grammar that has ended).
    unmasked = [rid for rid, n in counts if n is None]
    assert len(counts) > 20 and len(unmasked) == len(set(unmasked)) <= len(constrained)
    assert all(row.allowed_tokens is None for e in events for row in e.rows if row.request_id == watched[1].request_id)


def test_abort_while_a_sampling_waits_for_its_mask(stepped):
    engine = stepped
    params = SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60)
    engine.grammars.compile(params.constraint).result()  # not queued behind the compile
    rid = engine.add_request("A person as JSON:", params)
    for _ in range(3):
        engine.step()
    assert engine._deferred is not None  # this step's token is not even sampled yet
    assert engine.abort(rid)
    outs = [o for o in engine.step() if o.request_id == rid]
    assert outs and outs[0].completion.finish_reason == "abort" and -1 not in outs[0].completion.token_ids
    assert not engine.has_unfinished() and engine._deferred is None
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()
    # The mask threads and the shared bitmask serve the next requests as before.
    done = run_alone(engine, "A person as JSON:", SamplingParams(json_schema=PERSON, temperature=0.8, seed=1))
    jsonschema.validate(json.loads(done.text), PERSON)


def test_a_token_the_grammar_refuses_fails_its_step_and_nothing_else(stepped):
    engine = stepped
    tokenizer = engine.tokenizer
    params = SamplingParams(regex=PHONE, temperature=0, max_tokens=20)
    engine.grammars.compile(params.constraint).result()
    rid = engine.add_request("Call me at", params)
    engine.step()  # the prefill: its sampling waits for the first mask
    assert engine._deferred is not None
    # A bug's effect: a token no phone number has, noted as if sampled. The next mask's threads
    # refuse it; the step that queues that mask's sampling fails.
    engine._requests[rid].grammar.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    outs = []
    for _ in range(4):
        outs += [o for o in engine.step() if o.request_id == rid and o.finished]
    assert len(outs) == 1 and outs[0].completion.finish_reason == "error"
    assert "the grammar refused it: this is a bug" in outs[0].completion.error
    assert not engine.has_unfinished() and engine._deferred is None
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()
    done = run_alone(engine, "Call me at", SamplingParams(regex=PHONE, temperature=0, max_tokens=24))
    assert done.finish_reason == "stop" and done.text.startswith("(")
