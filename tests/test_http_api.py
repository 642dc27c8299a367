"""The OpenAI-compatible routes through the `openai` client, and bad input at every generating
route (fuzzed with hypothesis): always a 4xx with a message, never a 500, never a dead engine."""

import json

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_process import OPERATOR_KEY, module_host

ROUTES = ("/v1/completions", "/v1/chat/completions", "/api/generate")


host = module_host("serve-api", api_server_counts=(0, 1))


@pytest.fixture(scope="module")
def client(host):
    return openai.OpenAI(base_url=host.url + "/v1", api_key=OPERATOR_KEY, max_retries=0)


def test_openai_client_streams_a_chat_completion(client):
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    whole = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == text and "Paris" in text
    assert whole.usage.completion_tokens == usage.completion_tokens
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")


def test_openai_client_streams_a_completion_with_stop_and_seed(client):
    stream = client.completions.create(model="demo", prompt="One, two, three, four,", max_tokens=20,
                                       temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text
    stopped = client.completions.create(model="demo", prompt="One, two, three, four,", max_tokens=20,
                                        temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop" and "," not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)
    sampled = [client.completions.create(model="demo", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_logprobs_come_in_openai_shapes(client):
    done = client.completions.create(model="demo", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    assert "".join(lp.tokens) == done.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 for c in content)


def test_openai_errors_have_openai_shape(client, host):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt="hi", n=2)
    assert "n=1" in err.value.body["message"] and err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=host.url + "/v1", api_key="nope-nope", max_retries=0).models.list()
    assert [m.id for m in client.models.list()] == ["demo"]


BAD_BODIES = [
    b"{not json", b"[1, 2]", b"", b'"a string"',
    {"prompt": 123}, {"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "max_tokens": 10**12},
    {"prompt": "hi", "max_tokens": "ten"}, {"prompt": "hi", "temperature": -3}, {"prompt": "hi", "unknown": 1},
    {"messages": []}, {"messages": [{"role": "robot", "content": "hi"}]}, {"messages": "hello"},
    {"prompt": [10**9]}, {"prompt": "hi", "stop": 5}, {"prompt": "hi", "stream": "yes"},
    {"prompt": "hi", "sampling": {"max_tokens": 0}}, {"prompt": "hi", "sampling": "greedy"},
    {"prompt": "hi", "sampling": {"nope": 1}}, {"prompt": "", "max_tokens": 3},
]


@pytest.mark.parametrize("route", ROUTES)
def test_bad_bodies_get_a_4xx_with_a_message(host, route):
    for body in BAD_BODIES:
        status, answer = host.post(route, body)
        assert 400 <= status < 500, (route, body, status, answer)
        assert json.loads(answer)["error"]["message"], (route, body)


def test_a_10_mb_body_is_refused_with_a_message(host):
    status, answer = host.post("/api/generate", json.dumps({"prompt": "x" * (10 << 20)}).encode())
    assert status == 400 and "limit" in json.loads(answer)["error"]["message"]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "logprobs", "n",
          "stream", "model", "sampling", "prompt_token_ids", "priority", "stream_options", "top_logprobs",
          "presence_penalty", "frequency_penalty", "ignore_eos", "stop_token_ids", "echo", "response_format",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "store", "metadata", "tools", "modalities",
          "max_completion_tokens", "service_tier"]
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUES, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), body=BODIES)
def test_fuzzed_bodies_never_500(host, route, body):
    # Whatever is asked, a small answer keeps the fuzz quick: cap generation where the body allows it.
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8
    if isinstance(body.get("sampling"), dict) and isinstance(body["sampling"].get("max_tokens"), int):
        body["sampling"]["max_tokens"] = min(body["sampling"]["max_tokens"], 8)
    if "max_tokens" not in body and "sampling" not in body:
        body["max_tokens"] = 4 if route != "/api/generate" else None
    status, answer = host.post(route, json.dumps(body).encode())
    assert status < 500, (route, body, status, answer)
    if status >= 400:
        assert json.loads(answer)["error"]["message"]


def test_the_engine_still_answers_after_the_fuzz(host):
    status, answer = host.post("/api/generate", {"prompt": "Hello", "stream": False, "sampling": {"max_tokens": 3}})
    assert status == 200 and json.loads(answer)["finish_reason"] in ("stop", "length")
    assert host.stats()["running"] == 0
