"""Request fields at the generating routes of a real `lightllm-nb serve`: which OpenAI fields are
accepted (and ignored), which are refused and why, and that every 400 names the field it is about.
Also the error bodies around a request: an empty body, a wrong token, a server that is draining."""

import json
import signal
import threading
import time

import openai
import pytest

from serve_process import OPERATOR_KEY, module_host, start_serve
from test_serve import open_stream

host = module_host("serve-fields")
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(host):
    return openai.OpenAI(base_url=host.url + "/v1", api_key=OPERATOR_KEY, max_retries=0)


def error_of(host, route: str, body, status: int = 400) -> dict:
    got, answer = host.post(route, body)
    assert got == status, (route, body, got, answer)
    return json.loads(answer)["error"]


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("temperature", -1), ("top_p", 0), ("seed", -5),
                                         ("frequency_penalty", 3), ("presence_penalty", -3), ("stop", [""]),
                                         ("top_k", -1), ("repetition_penalty", 0)])
def test_sampling_value_errors_name_their_field(host, field, value):
    for route, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        err = error_of(host, route, {**body, field: value})
        assert err["param"] == field, (route, err)
    err = error_of(host, "/api/generate", {"prompt": "hi", "sampling": {field: value}})
    assert err["param"] == f"sampling.{field}", err


def test_chat_max_completion_tokens_errors_name_it(host):
    err = error_of(host, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0})
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens" in err["message"]


def test_a_prompt_too_long_names_the_prompt_not_max_tokens(host):
    limit = json.loads(host.get("/v1/models")[1])["data"][0]["max_model_len"]
    err = error_of(host, "/v1/completions", {"prompt": [5] * limit, "max_tokens": 1})
    assert err["param"] == "prompt" and "prompt" in err["message"] and "shorten" in err["message"]
    err = error_of(host, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * limit}]})
    assert err["param"] == "messages" and "messages" in err["message"]
    err = error_of(host, "/api/generate", {"prompt_token_ids": [5] * limit})
    assert err["param"] == "prompt_token_ids"
    # Where max_tokens is what pushes it over, it is named, and the message says so.
    err = error_of(host, "/v1/completions", {"prompt": [5] * 10, "max_tokens": limit})
    assert err["param"] == "max_tokens" and f"at most {limit - 10}" in err["message"]
    err = error_of(host, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": limit})
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens" in err["message"]


def test_native_generate_takes_exactly_one_prompt(host):
    err = error_of(host, "/api/generate", {"prompt": "hi", "prompt_token_ids": [1, 2], "stream": False})
    assert "exactly one" in err["message"] and err["param"] == "prompt_token_ids"
    err = error_of(host, "/api/generate", {"stream": False})
    assert "exactly one" in err["message"] and err["param"] == "prompt"


def test_openai_fields_that_change_nothing_are_accepted(client):
    reply = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=3, store=True, metadata={"team": "nlp"}, service_tier="auto",
        reasoning_effort="low", modalities=["text"], user="u1", parallel_tool_calls=False, safety_identifier="s1",
        prompt_cache_key="k", prediction={"type": "content", "content": "Hello"}, tools=[], tool_choice="none",
        stream_options=None, extra_body={"functions": None, "function_call": None, "audio": None})
    assert reply.choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model="demo", prompt="Hi", max_tokens=2, user="u1", echo=False, best_of=1,
                                     stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert list(done)


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tool_choice", "required"),
    ("functions", [{"name": "f"}]), ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}),
    ("web_search_options", {}), ("n", 2), ("logit_bias", {"5": 10}), ("verbosity", "high"), ("store", "yes"),
    ("metadata", "tag"), ("service_tier", 3)])
def test_openai_fields_asking_for_what_this_server_does_not_do_are_refused(host, field, value):
    err = error_of(host, "/v1/chat/completions", {"messages": CHAT, field: value})
    assert err["param"] == field and field in err["message"], err
    assert "unknown field" not in err["message"]


def test_fields_that_are_not_openai_s_stay_unknown(host):
    for route, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        err = error_of(host, route, {**body, "temprature": 0.5})
        assert err["param"] == "temprature" and "unknown field" in err["message"]
    err = error_of(host, "/v1/completions", {"prompt": "hi", "store": True})  # a chat field, not a completions one
    assert err["param"] == "store"


def test_an_empty_body_says_it_is_empty(host):
    for route in ("/v1/completions", "/api/generate"):
        err = error_of(host, route, b"")
        assert "empty" in err["message"] and "NoneType" not in err["message"], err


def test_a_401_names_where_the_keys_of_this_server_come_from(host, tmp_path):
    status, answer = host.get("/v1/models", token="wrong-token-123")
    message = json.loads(answer)["error"]["message"]
    assert status == 401 and "--api-key" in message and "--tokens-file" in message and "printed" not in message
    generated = start_serve(tmp_path, "--api-server-count", "0", keys=False,
                            env={"XDG_RUNTIME_DIR": str(tmp_path)})
    try:
        status, answer = generated.get("/v1/models", token=None)
        message = json.loads(answer)["error"]["message"]
        assert status == 401 and "printed at start" in message and "--api-key" not in message
    finally:
        assert generated.stop() == 0


def event_socket_refusal(host) -> int | None:
    """The HTTP status a new /api/events socket is refused with (None: it opened)."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    async def connect():
        url = host.url.replace("http://", "ws://") + "/api/events"
        try:
            ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}))
        except HTTPClientError as err:
            return err.code
        ws.close()
        return None

    return IOLoop.current().run_sync(connect, timeout=10)


def test_new_requests_get_a_503_while_the_server_drains(tmp_path):
    draining = start_serve(tmp_path, "--api-server-count", "0", "--shutdown-timeout", "6")
    ends = []

    def read():
        conn, response = open_stream(draining, {"prompt": "Story:", "sampling": {
            "max_tokens": 4000, "ignore_eos": True, "temperature": 0}}, OPERATOR_KEY)
        ends.append(response.read())
        conn.close()

    assert event_socket_refusal(draining) is None  # before the drain, a socket opens
    reader = threading.Thread(target=read)
    reader.start()
    while draining.stats()["running"] < 1:
        time.sleep(0.05)
    draining.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while draining.get("/health", None)[0] == 200:  # a refused connection raises here: the bug
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, answer = draining.get("/health", None)
    assert status == 503
    err = error_of(draining, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, status=503)
    assert "shutting down" in err["message"]
    assert event_socket_refusal(draining) == 503  # no new event socket either
    assert draining.process.wait(30) == 0, "".join(draining.log)
    reader.join(10)
    assert ends and b'"abort"' in ends[0]
