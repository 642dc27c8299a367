"""What a constrained request hands back: logprobs that describe the tokens its grammar allowed (a
forbidden token, logprob -inf, is never listed as an alternative, so a row may list fewer than
asked for, and no -inf reaches a JSON answer), and a text cut by max_tokens that is a valid prefix
even inside a multi-byte character."""

import json
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


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_an_answer_cut_inside_a_character_leaves_it_out_as_its_stream_does(engine, max_tokens):
    sampling = SamplingParams(choice=["🙂"], max_tokens=max_tokens, temperature=0)
    done = engine.generate(["Smile:"], sampling)[0]
    streamed = "".join(engine.stream("Smile:", sampling))
    assert done.finish_reason == "length" and len(done.token_ids) == max_tokens
    assert done.text == streamed == ""  # a valid prefix of the one choice, not "\ufffd"


def test_latin1_characters_of_a_schema_come_out_as_written(engine):
    """xgrammar's own compile cache misread characters below U+0100 ("café1" came out "cafຑ")."""
    words = ["Ñandú", "café1"]
    schema = {"type": "object", "properties": {"w": {"enum": words}}, "required": ["w"]}
    done = engine.generate(["Pick a word:"] * 4, [SamplingParams(json_schema=schema, seed=s) for s in range(4)])
    assert all(json.loads(c.text)["w"] in words for c in done), [c.text for c in done]
