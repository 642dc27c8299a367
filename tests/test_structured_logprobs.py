"""Logprobs of a constrained request describe the tokens its grammar allowed: a forbidden token
(logprob -inf) is never listed as an alternative, so a row may list fewer than asked for, and no
-inf ever reaches a JSON answer."""

import math

import pytest

from lightllm_nb import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    with Engine("demo", device="cpu", progress=False, seed=0) as engine:
        yield engine


def test_top_logprobs_list_only_tokens_the_grammar_allowed(engine):
    choices = ["yes", "no"]
    done = engine.generate(["Yes or no?"], SamplingParams(choice=choices, logprobs=10, temperature=0))[0]
    assert done.text in choices
    tokenizer = engine.tokenizer
    for step, entry in enumerate(done.logprobs):
        top = entry["top"]
        assert top and top[0][0] == entry["token_id"]
        assert all(math.isfinite(value) for _, value in top), top
        before = tokenizer.decode(done.token_ids[:step])
        for token, _ in top:  # each alternative keeps the text on the way to a choice (or ends it)
            if token in engine.eos_token_ids:
                assert before in choices
            else:
                assert any(c.startswith(before + tokenizer.decode([token])) for c in choices), (before, token)
    assert len(done.logprobs[-1]["top"]) < 10  # the last step's grammar allowed few tokens
