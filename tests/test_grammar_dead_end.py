"""A constraint that passes validation (its first step allows tokens) but reaches a dead end later:
that request alone finishes with reason "error", saying why; its batch goes on unharmed."""

import pytest

from lightllm_nb import Engine, SamplingParams

DEAD_ENDS = {  # after "a" (or `{"a":"`) nothing can follow, and nothing may end there
    "regex": dict(regex=r"a[^\s\S]"),
    "schema pattern": dict(json_schema={"type": "object", "properties": {"a": {"type": "string",
                                                                              "pattern": r"[^\s\S]"}},
                                        "required": ["a"]}),
    "grammar": dict(grammar='root ::= "a" b\nb ::= [^\\x00-\\U0010FFFF]'),
}


@pytest.fixture(scope="module")
def engine():
    with Engine("demo", device="cpu", progress=False, seed=0) as engine:
        yield engine


@pytest.mark.parametrize("constraint", DEAD_ENDS.values(), ids=DEAD_ENDS.keys())
def test_a_dead_end_fails_its_own_request_and_no_other(engine, constraint):
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = engine.generate(["The capital of France is"], plain)[0]
    before = engine.stats()["kv_used_tokens"] - engine.stats()["kv_cached_tokens"]
    dead = SamplingParams(temperature=0, max_tokens=20, **constraint)
    mixed = engine.generate(["The capital of France is", "Answer:"], [plain, dead])
    assert mixed[0].finish_reason == "length" and mixed[0].token_ids == alone.token_ids
    assert mixed[1].finish_reason == "error"
    assert "allows no next token" in mixed[1].error and "fix the constraint" in mixed[1].error, mixed[1].error
    stats = engine.stats()
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["kv_used_tokens"] - stats["kv_cached_tokens"] == before  # nothing held by the failed request
