"""Prefix-cache scopes through a real `lightllm-nb serve` (demo model, CPU) with two API keys mapped
to two users: the user comes from the key, so bob reuses nothing of alice's prompt, whatever he
sends; the operator's declared system prompt is reused by both. (The second user's first-token time
on the first user's prompt is measured by bench/prefix_isolation.py --serve, not asserted here.)"""

import json
import random

from prometheus_client.parser import text_string_to_metric_families
import pytest

from serve_process import start_serve

ALICE, BOB = "alice-token-123", "bob-token-4567"   # users "alice" and "bob" in serve_process.TOKENS
PROXY = "proxy-token-890"                            # the Jupyter extension's role: acts for a named user
SYSTEM = {"role": "system", "content": "You are the teaching assistant of CS101, an introductory programming "
                                       "course. Answer in two sentences and use Python for every example."}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-scope")
    declared = tmp / "shared_prefixes.json"
    declared.write_text(json.dumps([{"messages": [SYSTEM]}]))
    served = start_serve(tmp, "--shared-prefixes", str(declared))  # --prefix-cache-scope left at its default
    yield served
    assert served.stop() == 0, "".join(served.log)


def generate(host, token, headers=None, **prompt) -> dict:
    status, body = host.post("/api/generate", {**prompt, "stream": False,
                                               "sampling": {"max_tokens": 2, "temperature": 0}}, token, headers)
    assert status == 200, body
    return json.loads(body)


def test_the_second_user_reuses_nothing_of_the_first_users_prompt(host):
    secret = random.Random(7).sample(range(1000, 40000), 200)
    first = generate(host, ALICE, prompt_token_ids=secret)
    assert first["metrics"]["cached_tokens"] == 0
    assert generate(host, ALICE, prompt_token_ids=secret)["metrics"]["cached_tokens"] == len(secret) - 1
    probe = generate(host, BOB, prompt_token_ids=secret)
    assert probe["metrics"]["cached_tokens"] == 0, "bob's request reused alice's cached prompt"
    assert probe["token_ids"] == first["token_ids"]


def test_a_request_field_cannot_pick_another_users_scope(host):
    """OpenAI's "user" field is accepted and changes nothing: the scope is the key's user. The
    server's count of reused prompt tokens does not move."""
    secret = random.Random(8).sample(range(1000, 40000), 120)
    generate(host, ALICE, prompt_token_ids=secret)
    hits = cache_hit_tokens(host)
    status, body = host.post("/v1/completions", {"model": "demo", "prompt": secret, "user": "alice",
                                                 "max_tokens": 1, "temperature": 0}, BOB)
    assert status == 200, body
    assert cache_hit_tokens(host) == hits
    assert generate(host, ALICE, prompt_token_ids=secret)["metrics"]["cached_tokens"] == len(secret) - 1
    assert cache_hit_tokens(host) == hits + len(secret) - 1


def cache_hit_tokens(host) -> float:
    status, body = host.get("/metrics")
    assert status == 200
    [family] = [f for f in text_string_to_metric_families(body.decode()) if f.name == "lightllm_prefix_cache_hit_tokens"]
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def test_the_declared_system_prompt_is_shared_the_questions_are_not(host):
    stats = host.stats()
    assert stats["prefix_cache_scope"] == "user"
    [declared] = stats["shared_prefix_tokens"]
    chat = [SYSTEM, {"role": "user", "content": "How do I reverse a list?"}]
    assert generate(host, ALICE, messages=chat)["metrics"]["cached_tokens"] == 0
    bob = generate(host, BOB, messages=chat)  # alice's very question: only the system prompt is reused
    assert bob["metrics"]["cached_tokens"] == declared
    again = generate(host, BOB, messages=chat)  # his own copy now
    assert again["metrics"]["cached_tokens"] == again["prompt_tokens"] - 1
    # carol (through the proxy key, as the Jupyter extension sends her) asks something new.
    carol = generate(host, PROXY, {"X-LightLLM-User": "carol"},
                     messages=[SYSTEM, {"role": "user", "content": "What is a tuple?"}])
    assert carol["metrics"]["cached_tokens"] == declared
