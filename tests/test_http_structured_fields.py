"""Structured output through the OpenAI routes of a real `lightllm-nb serve`: `response_format` on
both routes, vLLM's `guided_*` fields, their errors (each naming its field), and constraint checks
(xgrammar compiles) kept off the HTTP event loop."""

import json
import re
import socket
import threading
import time
import urllib.parse
import uuid

import jsonschema
import pytest

from serve_process import OPERATOR_KEY, module_host

host = module_host("serve-structured-fields")
CHAT = [{"role": "user", "content": "Describe Paris as JSON."}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
ROUTES = {"/v1/completions": {"prompt": "Paris:"}, "/v1/chat/completions": {"messages": CHAT}}


def post(host, route: str, body: dict) -> tuple[int, dict]:
    status, answer = host.post(route, body)
    return status, json.loads(answer)


def text_of(route: str, reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["text"] if route == "/v1/completions" else choice["message"]["content"]


@pytest.mark.parametrize("schema", [None, False, "{}", 3])
def test_a_json_schema_without_a_schema_object_is_a_400(host, schema):
    status, reply = post(host, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert status == 400 and reply["error"]["param"] == "response_format", reply
    assert "schema" in reply["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_response_format_works_on_both_routes(host, route):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    status, reply = post(host, route, {**ROUTES[route], "max_tokens": 40, "temperature": 0.8, "seed": 1,
                                       "response_format": fmt})
    assert status == 200, reply
    jsonschema.validate(json.loads(text_of(route, reply)), CITY)
    # A json_schema without a schema key is any JSON object, as before.
    status, reply = post(host, route, {**ROUTES[route], "max_tokens": 40, "temperature": 0.8, "seed": 2,
                                       "response_format": {"type": "json_schema", "json_schema": {"name": "o"}}})
    assert status == 200 and text_of(route, reply).startswith("{")


@pytest.mark.parametrize("route", ROUTES)
def test_guided_fields_constrain_both_routes(host, route):
    base = {**ROUTES[route], "max_tokens": 40, "temperature": 0.8}
    status, reply = post(host, route, {**base, "seed": 3, "guided_regex": r"20\d\d-[01]\d-[0-3]\d"})
    assert status == 200 and re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", text_of(route, reply)), reply
    status, reply = post(host, route, {**base, "seed": 4, "guided_choice": ["yes", "no"]})
    assert status == 200 and text_of(route, reply) in ("yes", "no"), reply
    status, reply = post(host, route, {**base, "seed": 5, "guided_grammar": 'root ::= "red" | "blue"'})
    assert status == 200 and text_of(route, reply) in ("red", "blue"), reply
    status, reply = post(host, route, {**base, "seed": 6, "guided_json": CITY})
    assert status == 200, reply
    jsonschema.validate(json.loads(text_of(route, reply)), CITY)


@pytest.mark.parametrize("route", ROUTES)
def test_constraint_errors_name_their_field(host, route):
    base = {**ROUTES[route], "max_tokens": 4}
    for field, value in (("guided_regex", "("), ("guided_choice", []), ("guided_grammar", "root ::= nope"),
                         ("guided_json", {"type": "nope"}), ("guided_choice", "yes"), ("guided_regex", 5),
                         ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})):
        status, reply = post(host, route, {**base, field: value})
        assert status == 400 and reply["error"]["param"] == field, (field, value, reply)


@pytest.mark.parametrize("route", ROUTES)
def test_at_most_one_constraint_counting_response_format(host, route):
    status, reply = post(host, route, {**ROUTES[route], "guided_regex": "a+", "guided_choice": ["a"]})
    message = reply["error"]["message"]
    assert status == 400 and "guided_regex" in message and "guided_choice" in message
    status, reply = post(host, route, {**ROUTES[route], "response_format": {"type": "json_object"},
                                       "guided_regex": "a+"})
    message = reply["error"]["message"]
    assert status == 400 and "response_format" in message and "guided_regex" in message
    assert reply["error"]["param"] in ("response_format", "guided_regex")
    status, reply = post(host, route, {**ROUTES[route], "max_tokens": 2, "response_format": {"type": "text"},
                                       "guided_choice": ["a", "b"]})
    assert status == 200 and text_of(route, reply) in ("a", "b")  # type text asks for no constraint


def slow_format() -> dict:
    """A response_format whose schema takes seconds to check and compile (an enum of 12000 strings:
    3000 took under a second on CI's box), fresh each time so no compiler cache has it."""
    names = [uuid.uuid4().hex for _ in range(12000)]
    schema = {"type": "object", "properties": {"id": {"enum": names}}, "required": ["id"]}
    return {"type": "json_schema", "json_schema": {"name": "slow", "schema": schema}}


def test_compiling_a_constraint_does_not_block_the_event_loop(host):
    answers = []
    deep = threading.Thread(target=lambda: answers.append(host.post("/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 1, "response_format": slow_format()})))
    started = time.monotonic()
    deep.start()
    time.sleep(0.2)
    latencies = []
    while deep.is_alive() and len(latencies) < 20:
        t = time.monotonic()
        assert host.get("/health", None)[0] == 200
        latencies.append(time.monotonic() - t)
        time.sleep(0.05)
    deep.join(120)
    assert answers[0][0] == 200, answers
    assert time.monotonic() - started > 1.0, "the schema compiled too fast to tell"
    assert max(latencies) < 1.0, latencies


def test_a_client_that_leaves_while_its_constraint_compiles_is_never_queued(host):
    def finished() -> int:
        text = host.get("/metrics")[1].decode()
        return sum(int(float(v)) for v in re.findall(r"^lightllm_requests_finished_total\{.*\} (\S+)$", text, re.M))

    before = finished()
    fmt = slow_format()
    body = json.dumps({"messages": CHAT, "max_tokens": 1, "response_format": fmt}).encode()
    parts = urllib.parse.urlsplit(host.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + OPERATOR_KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.3)  # it is being checked now
    # The same schema again, on a connection that stays: once it is answered, the first one's check
    # (which began earlier) has long ended, and it would have been queued by now.
    status, _ = host.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "response_format": fmt})
    assert status == 200
    time.sleep(1.0)
    assert finished() == before + 1
