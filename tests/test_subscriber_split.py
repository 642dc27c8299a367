"""Event readers over the engine host's websocket, in one process and behind a front-end process
(`--api-server-count 1`): there the engine keeps one raw subscription for the front end whatever the
number of readers, and each reader is still redacted for its own user and capped at its own rate."""

import json
import time

import pytest

from lightllm_nb.serving.http_client import HTTPClient
from serve_process import OPERATOR_KEY, module_host
from test_serve import ALICE, BOB, open_stream, sse_records, wait_idle

host = module_host("subscriber-split", api_server_counts=(0, 1))


def wait_for_subscriptions(host, count, timeout=30):
    deadline = time.monotonic() + timeout
    while (stats := host.stats())["event_subscriptions"] != count:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def finishes(events) -> int:
    return sum(d.kind == "finish" for e in events for d in e.decisions)


def test_each_user_sees_only_their_own_ids_and_a_capped_reader_every_decision(host, request):
    split = "api-servers-1" in request.node.name
    readers = {"alice": HTTPClient(host.url, ALICE).subscribe(maxsize=10_000),
               "alice-capped": HTTPClient(host.url, ALICE).subscribe(maxsize=10_000, max_rate=1),
               "bob": HTTPClient(host.url, BOB).subscribe(maxsize=10_000, pages=True)}
    # Behind a front end: one raw subscription in the engine for all three readers.
    wait_for_subscriptions(host, 1 if split else 3)
    sampling = {"max_tokens": 24, "ignore_eos": True, "temperature": 0}
    streams = {user: open_stream(host, {"prompt": f"A story for {user}", "sampling": sampling}, token)
               for user, token in (("alice", ALICE), ("bob", BOB))}
    ids = {user: response.getheader("X-Request-Id") for user, (_, response) in streams.items()}
    for conn, response in streams.values():
        list(sse_records(response))
        conn.close()
    wait_idle(host)
    deadline = time.monotonic() + 30
    seen = {name: [] for name in readers}
    while min(finishes(events) for events in seen.values()) < 2:  # every reader has both requests' ends
        assert time.monotonic() < deadline, {name: finishes(events) for name, events in seen.items()}
        for name, reader in readers.items():
            seen[name].extend(reader._mailbox.get_all(timeout=0.05))
    for reader in readers.values():
        reader.close()
    wait_for_subscriptions(host, 0)

    for name, events in seen.items():
        user, other = ("bob", "alice") if name == "bob" else ("alice", "bob")
        text = json.dumps([e.to_dict() for e in events])
        assert ids[other] not in text and f'"{other}"' not in text, name
        mine = {r.request_id for e in events for r in e.rows if r.user == user}
        assert mine == {ids[user]}, name
        assert any(r.user == "other" for e in events for r in e.rows), name  # the other's usage, anonymized
    # Bob's maps come at most PAGE_MAPS_PER_SECOND (steps arriving together at a front end share one).
    maps = [e.page_owner for e in seen["bob"] if e.page_owner is not None]
    assert len(maps) >= len(seen["bob"]) // 2 and all(len(m) == seen["bob"][0].kv_capacity for m in maps)
    assert seen["alice"][0].page_owner is None
    # Latest-wins at 1 a second (a demo step takes ~0.1-0.4 s here): fewer events, the same decisions
    # on alice's own request.
    own = {name: [(d.kind, d.code) for e in seen[name] for d in e.decisions if d.request_id == ids["alice"]]
           for name in ("alice", "alice-capped")}
    assert own["alice-capped"] == own["alice"] and len(seen["alice-capped"]) < len(seen["alice"])


@pytest.mark.parametrize("rate", ["abc", "0", "-2", "nan", "inf"])
def test_a_bad_rate_is_refused_with_a_clear_400(host, rate):
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    url = host.url.replace("http://", "ws://") + f"/api/events?rate={rate}"
    with pytest.raises(HTTPClientError) as err:
        IOLoop.current().run_sync(lambda: websocket_connect(
            HTTPRequest(url, headers={"Authorization": f"Bearer {OPERATOR_KEY}"})), timeout=30)
    assert err.value.code == 400
    body = json.loads(err.value.response.body)["error"]
    assert body["param"] == "rate" and f"rate={rate!r}" in body["message"] and "positive" in body["message"]


def test_a_client_rejects_a_bad_max_rate_before_connecting(host):
    with pytest.raises(ValueError, match="max_rate"):
        HTTPClient(host.url, ALICE).subscribe(max_rate=0)
