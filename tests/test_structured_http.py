"""Structured output through a real `lightllm-nb serve` (demo model, CPU): OpenAI's
`response_format` and the serving core's HTTPClient with SamplingParams constraints."""

import json
import re

import jsonschema
import openai
import pytest

from lightllm_nb import SamplingParams
from lightllm_nb.serving.http_client import HTTPClient
from serve_process import OPERATOR_KEY, module_host

CITY = {"type": "object",
        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16},
                       "country": {"enum": ["France", "Germany", "Italy"]},
                       "population": {"type": "integer", "minimum": 0, "maximum": 40000000}},
        "required": ["city", "country", "population"]}
MESSAGES = [{"role": "user", "content": "Describe the capital of France as JSON."}]

host = module_host("serve-structured")


@pytest.fixture(scope="module")
def client(host):
    return openai.OpenAI(base_url=host.url + "/v1", api_key=OPERATOR_KEY, max_retries=0)


def test_response_format_json_schema(client):
    reply = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=64, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)


def test_response_format_json_object_streams(client):
    chunks = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=48, temperature=0.8,
                                            seed=2, response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("{")  # a valid prefix at least; a whole object when it stopped by itself


def test_bad_response_format_is_a_400_that_says_why(client):
    with pytest.raises(openai.BadRequestError, match="does not compile"):
        client.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8,
                                       response_format={"type": "yaml"})


def test_http_client_carries_constraints(host):
    remote = HTTPClient(host.url, "alice-token-123")
    try:
        done = remote.generate(["Today's date:", "Answer yes or no:"],
                               [SamplingParams(regex=r"20\d\d-[01]\d-[0-3]\d", temperature=0.8, seed=3),
                                {"choice": ["yes", "no"], "temperature": 0.8, "seed": 4}])
        assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", done[0].text) and done[1].text in ("yes", "no")
        stream = remote.stream("Pick a colour:", {"choice": ["red", "green", "blue"], "temperature": 0})
        assert "".join(stream) in ("red", "green", "blue")
        assert stream.completion.finish_reason == "stop"
    finally:
        remote.close()
