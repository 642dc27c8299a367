"""Structured output (issue 13) on the demo model on CPU: every output fits its constraint.

Sampled at temperature 0.8 on purpose: a 135M model left alone writes invalid JSON most of the
time, so only the grammar's mask makes these pass.
"""

import json
import re

import jsonschema
import pytest

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.sampling_params import InvalidRequestError

from structured_schemas import PERSON, REVIEW, SCHEMAS

DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["red", "green", "blue", "light blue"]
SEEDS = range(20)


@pytest.fixture(scope="module")
def engine():
    with Engine("demo", device="cpu", progress=False, seed=0) as engine:
        yield engine


def test_every_output_fits_its_constraint(engine):
    """3 schemas x 20 seeds, a date and a phone regex, and a choice list, in one batch."""
    jobs = [(f"Write a {name} record as JSON:", SamplingParams(json_schema=schema, temperature=0.8, seed=seed,
                                                               max_tokens=160), ("json", schema))
            for name, schema in SCHEMAS.items() for seed in SEEDS]
    jobs += [(f"Today's date is", SamplingParams(regex=DATE, temperature=0.8, seed=s, max_tokens=16), ("re", DATE))
             for s in range(6)]
    jobs += [(f"Call me at", SamplingParams(regex=PHONE, temperature=0.8, seed=s, max_tokens=24), ("re", PHONE))
             for s in range(6)]
    jobs += [("My favourite colour is", SamplingParams(choice=CHOICES, temperature=0.8, seed=s, max_tokens=8),
              ("choice", CHOICES)) for s in range(6)]
    events = []
    unsubscribe = engine.subscribe(events.append)
    done = engine.generate([prompt for prompt, _, _ in jobs], [params for _, params, _ in jobs])
    unsubscribe()
    for completion, (_, _, (kind, rule)) in zip(done, jobs):
        assert completion.finish_reason == "stop", completion
        if kind == "json":
            jsonschema.validate(json.loads(completion.text), rule)
        elif kind == "re":
            assert re.fullmatch(rule, completion.text), completion.text
        else:
            assert completion.text in rule
    # The JSON outputs differ between seeds: the mask narrows the choice, the draw still chooses.
    assert len({c.text for c in done[:20]}) > 5
    # Each constrained row of a StepEvent says how many tokens its mask allowed; a choice among four
    # words allows only a few first tokens, free JSON strings allow thousands.
    allowed = [row.allowed_tokens for event in events for row in event.rows]
    assert allowed and all(n is not None and 1 <= n <= engine.config.vocab_size for n in allowed)
    assert min(allowed) <= 4 and max(allowed) > 1000


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(engine):
    plain = [("The capital of France is", SamplingParams(temperature=0, max_tokens=12)),
             ("Once upon a time", SamplingParams(temperature=0.8, seed=7, max_tokens=12))]
    constrained = [("Write a review as JSON:", SamplingParams(json_schema=REVIEW, temperature=0.8, seed=1)),
                   ("Pick a colour:", SamplingParams(choice=CHOICES, temperature=0))]
    alone = engine.generate([p for p, _ in plain], [s for _, s in plain])
    mixed = engine.generate([p for p, _ in plain + constrained], [s for _, s in plain + constrained])
    assert [c.token_ids for c in mixed[:2]] == [c.token_ids for c in alone]
    jsonschema.validate(json.loads(mixed[2].text), REVIEW)
    assert mixed[3].text in CHOICES


def test_overlapped_steps_give_the_same_tokens(engine):
    """With overlap on, a constrained batch reads the previous tokens back after launching its
    forward and fills the mask then: the same tokens as plain steps, unconstrained rows included."""
    prompts = ["Write a person record as JSON:", "The capital of France is", "Pick a colour:"]
    params = [SamplingParams(json_schema=PERSON, temperature=0.8, seed=4, max_tokens=160),
              SamplingParams(temperature=0.8, seed=9, max_tokens=20),
              SamplingParams(choice=CHOICES, temperature=0.8, seed=2)]
    plain = engine.generate(prompts, params)
    engine.overlap = True
    try:
        overlapped = engine.generate(prompts, params)
    finally:
        engine.overlap = False
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in plain]
    jsonschema.validate(json.loads(overlapped[0].text), PERSON)
    assert overlapped[2].text in CHOICES


def test_overlapped_steps_with_requests_joining_and_leaving_give_the_same_tokens():
    """Overlapped, a constrained batch reads each step's tokens back a step late while requests
    arrive and finish (rows move, a finished row's late token is dropped): the tokens of plain steps.
    Stepped by hand, so on an engine of its own (the module's belongs to its driver loop)."""
    with Engine("demo", device="cpu", progress=False, seed=0) as engine:
        plain, overlapped = _steps_with_arrivals(engine, False), _steps_with_arrivals(engine, True)
    assert len(plain) == 5 and overlapped == plain


def _steps_with_arrivals(engine, overlap: bool) -> dict[str, list[int]]:
    """Each request's tokens when the requests below arrive at their steps."""
    arrivals = {0: [("Write a person record as JSON:", SamplingParams(json_schema=PERSON, temperature=0.8, seed=5,
                                                                     max_tokens=60)),
                    ("Pick a colour:", SamplingParams(choice=CHOICES, temperature=0.8, seed=6))],
                3: [("Call me at", SamplingParams(regex=PHONE, temperature=0.8, seed=7, max_tokens=24)),
                    ("Once upon a time", SamplingParams(temperature=0.8, seed=8, max_tokens=9))],
                11: [("Today's date is", SamplingParams(regex=DATE, temperature=0.8, seed=9, max_tokens=16))]}
    engine.overlap = overlap
    done, step = {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, (prompt, params) in enumerate(arrivals.get(step, [])):
            engine.add_request(prompt, params, request_id=f"s{step}-{i}")
        done.update({out.request_id: out.completion.token_ids for out in engine.step() if out.finished})
        step += 1
    return done


def test_max_tokens_ends_on_a_valid_prefix(engine):
    import xgrammar as xgr

    params = SamplingParams(json_schema=PERSON, temperature=0.8, seed=3, max_tokens=7)
    completion = engine.generate("A person as JSON:", params)[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 7
    matcher = xgr.GrammarMatcher(engine.grammars.compile(params.constraint).result().grammar)
    assert all(matcher.accept_token(t) for t in completion.token_ids)
    assert not matcher.is_terminated()
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)  # a prefix: the object is still open


def test_any_json_object(engine):
    import xgrammar as xgr

    params = [SamplingParams(json_schema=schema, temperature=0.8, seed=1, max_tokens=24) for schema in ({}, True)]
    assert params[0].constraint == params[1].constraint
    compiled = engine.grammars.compile(params[0].constraint).result().grammar
    for c in engine.generate(["JSON:", "A JSON object:"], params):
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # free JSON can outlast 24 tokens: then it is a valid prefix of an object
            matcher = xgr.GrammarMatcher(compiled)
            assert c.text.startswith("{") and all(matcher.accept_token(t) for t in c.token_ids)


def test_equal_constraints_compile_once(engine):
    a = SamplingParams(json_schema=dict(PERSON))
    b = SamplingParams(json_schema=json.dumps(PERSON))
    assert a.constraint == b.constraint
    assert engine.grammars.compile(a.constraint) is engine.grammars.compile(b.constraint)


@pytest.mark.parametrize("kwargs, says", [
    ({"json_schema": '{"type": "object", "properties": {'}, "json_schema is not valid JSON"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strng"}}}},
     r"json_schema\.properties\.a\.type is invalid: 'strng' is not a JSON type"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}, "does not compile"),
    ({"json_schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "'uniqueItems'"),
    ({"json_schema": {"type": "object", "properties": {"if": {"type": "object", "not": {}}}}},
     r"json_schema\.properties\.if uses the keyword 'not'"),
    ({"regex": r"\d+", "choice": ["a"]}, "regex and choice were given together"),
    ({"json_schema": {}, "grammar": 'root ::= "a"'}, "json_schema and grammar were given together"),
    ({"regex": r"[^\s\S]"}, "cannot match any text"),
    ({"regex": "(ab"}, "regex does not compile: .*parenthesis"),
    ({"grammar": "root ::= missing"}, 'Rule "missing" is not defined'),
    ({"choice": []}, "choice=.* is invalid"),
    ({"json_schema": [1, 2]}, "give a JSON schema as a dict"),
])
def test_bad_constraints_are_refused_before_anything_is_queued(engine, kwargs, says):
    with pytest.raises(InvalidRequestError, match=says):
        SamplingParams(**kwargs)
    # The same fields as a dict, as the HTTP APIs pass them: refused on the caller's side.
    before = engine.stats()
    with pytest.raises(InvalidRequestError, match=says):
        engine.generate(["fine", "x"], [{"max_tokens": 2}, kwargs])
    after = engine.stats()
    assert (after["running"], after["waiting"], after["kv_used_tokens"]) == (0, 0, before["kv_used_tokens"])


def test_a_request_waits_in_the_queue_until_its_grammar_is_compiled():
    import concurrent.futures

    import torch

    from lightllm_nb.engine.grammar import RequestGrammar
    from lightllm_nb.kv.kv_pool import KVPool
    from lightllm_nb.scheduling.admission import AggressivePolicy
    from lightllm_nb.scheduling.request import Request
    from lightllm_nb.scheduling.scheduler import Scheduler

    pool = KVPool(num_layers=1, num_kv_heads=1, head_dim=1, num_tokens=64, page_size=1, max_requests=4,
                  max_context=64, dtype=torch.float32, device=torch.device("cpu"))
    scheduler = Scheduler(pool, AggressivePolicy(), max_batch_tokens=64, max_running=4)
    compiled = concurrent.futures.Future()
    constrained = Request("json", [5, 6, 7], SamplingParams(json_schema={}), user="a")
    constrained.grammar = RequestGrammar(compiled)
    plain = Request("plain", [5, 6, 8], SamplingParams(), user="b")
    scheduler.add(constrained)
    scheduler.add(plain)
    assert [r.request_id for r, _ in scheduler.schedule().items] == ["plain"]  # not a batch row yet
    assert len(scheduler.waiting) == 1
    compiled.set_result(None)  # compiled now
    assert "json" in [r.request_id for r, _ in scheduler.schedule().items]
