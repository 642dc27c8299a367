"""The Jupyter Server extension, end to end: a real `jupyter server`, its supervised engine host
(the demo model on CPU), real kernels, the OpenAI client, browsers' cookies and origins, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_harness import UNAUTHENTICATED_WARNING, JupyterServer, ServerKernel, pid_alive, wait_for

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = JupyterServer(tmp_path_factory.mktemp("jupyter"), "--LightLLM.device=cpu", "--LightLLM.model=demo")
    try:
        s.engine_pid = s.wait_engine_ready()["pid"]
        yield s
    finally:
        engine_pid = s.status()["pid"] if s.process.poll() is None and s.status() else None
        s.stop(signal.SIGTERM)
        # Stopping the Jupyter server stops its engine host: nothing is left holding the model.
        if engine_pid is not None:
            wait_for(lambda: not pid_alive(engine_pid), 15, "the engine host to exit with the server")


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def host_proxy_token(server: JupyterServer) -> tuple[str, str]:
    """The engine host's URL and the extension's proxy token (this user may read its 0600 file)."""
    status = server.status()
    tokens_file = next(server.runtime_dir.glob("lightllm-tokens-*.json"))
    return status["engine_url"], next(iter(json.loads(tokens_file.read_text())))


def open_events(server: JupyterServer, headers: dict[str, str]):
    """Opens the extension's event websocket (a coroutine, for asyncio.run)."""
    url = f"ws://127.0.0.1:{server.port}/lightllm/api/events"
    return websocket_connect(HTTPRequest(url, headers=headers))


async def _refused_websocket(server, headers) -> int:
    try:
        (await open_events(server, headers)).close()
    except HTTPClientError as err:
        return err.code
    return 101


def running_requests(server: JupyterServer) -> int:
    stats = server.http.get("/lightllm/api/stats").json()
    user = stats.get("user", stats)
    return int(user.get("running", 0)) + int(user.get("waiting", 0))


def test_extension_is_enabled_and_valid_after_install():
    out = subprocess.run([sys.executable, "-m", "jupyter_server", "extension", "list"], capture_output=True,
                         text=True, timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(r"lightllm_nb\.server_ext\s+enabled", text), text
    assert re.search(r"lightllm_nb\.server_ext\s+OK", text), text


def test_no_endpoint_is_left_unauthenticated(server):
    # The server runs with allow_unauthenticated_access=False: an undecorated handler would be
    # reported (and refused) at start; the log must not have a single such warning.
    assert "lightllm_nb.server_ext | extension was successfully loaded" in server.log_text()
    assert not UNAUTHENTICATED_WARNING.search(server.log_text()), server.log_text()


def test_discovery_file_is_private_and_points_here(server):
    [path] = server.runtime_dir.glob("lightllm-server-*.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    record = json.loads(path.read_text())
    assert record["url"] == f"http://127.0.0.1:{server.port}/lightllm"
    assert record["token"] == server.token
    assert record["pid"] == server.process.pid


def test_openai_client_through_the_extension(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/lightllm/v1", api_key=server.token)
    assert [m.id for m in client.models.list().data] == ["demo"]
    completion = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 8
    arrivals = []
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=24, temperature=0, stream=True)
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text += chunk.choices[0].delta.content
    assert text.strip()
    # Streamed as produced: the deltas arrive spread over the generation, not in one burst at the end.
    assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] > 0.02


def test_streamed_and_whole_answers_pass_through_as_the_engine_host_sent_them(server):
    """The same greedy answer through the extension as from the engine host directly, also for a
    client (curl) that sends `Expect: 100-continue`, which must not reach the engine host."""
    engine_url, proxy_token = host_proxy_token(server)
    user = server.http.get("/lightllm/api/stats").json()["user"]["name"]
    direct = {"Authorization": f"Bearer {proxy_token}", "X-LightLLM-User": user}
    body = {"prompt": "The sea is", "sampling": {"max_tokens": 12, "ignore_eos": True, "temperature": 0},
            "stream": True}

    def tokens_and_text(events):  # how the tokens are grouped into events depends on timing
        events = list(events)
        return [t for e in events for t in e["token_ids"]], "".join(e["text"] for e in events), events[-1]["finished"]

    with httpx.stream("POST", f"{engine_url}/api/generate", json=body, headers=direct, timeout=60) as response:
        expected = tokens_and_text(sse_events(response))
    assert len(expected[0]) == 12 and expected[2]
    for extra in ({}, {"Expect": "100-continue"}):
        with server.http.stream("POST", "/lightllm/api/generate", json=body, headers=extra) as response:
            assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
            assert tokens_and_text(sse_events(response)) == expected
        whole = server.http.post("/lightllm/api/generate", json={**body, "stream": False}, headers=extra)
        assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content)
        assert whole.json()["token_ids"] == expected[0]


def test_refuses_missing_and_wrong_tokens(server):
    body = {"prompt": "hi", "sampling": {"max_tokens": 2}, "stream": False}
    for headers in ({}, {"Authorization": "token wrong-token-123"}, {"Authorization": "Bearer wrong-token-123"}):
        with httpx.Client(base_url=server.url, headers=headers) as anonymous:
            assert anonymous.get("/lightllm/api/stats").status_code == 403
            assert anonymous.post("/lightllm/api/generate", json=body).status_code == 403
            assert anonymous.get("/lightllm/status").status_code == 403
    assert asyncio.run(_refused_websocket(server, {})) == 403
    assert asyncio.run(_refused_websocket(server, {"Authorization": "token wrong-token-123"})) == 403


def browser_login(server: JupyterServer) -> httpx.Client:
    """A browser-like client, logged in through the login form: authenticated by cookie, not token."""
    browser = httpx.Client(base_url=server.url, follow_redirects=True)
    browser.get("/login?next=%2Flightllm%2Fstatus")
    assert browser.cookies.get("_xsrf"), "the login page sets the _xsrf cookie"
    landing = browser.post("/login", data={"password": server.token, "_xsrf": browser.cookies["_xsrf"],
                                           "next": "/lightllm/status"})
    assert "engine_url" in landing.json(), landing.text  # the cookie now opens /lightllm/
    return browser


def test_browser_post_needs_xsrf(server):
    browser = browser_login(server)
    body = {"prompt": "hi", "sampling": {"max_tokens": 2, "temperature": 0}, "stream": False}
    assert browser.post("/lightllm/api/generate", json=body).status_code == 403
    ok = browser.post("/lightllm/api/generate", json=body, headers={"X-XSRFToken": browser.cookies["_xsrf"]})
    browser.close()
    assert ok.status_code == 200, ok.text
    assert ok.json()["finish_reason"] == "length"


def test_cross_origin_websocket_is_refused(server):
    """A page on another site must not open the event stream with the user's cookie."""
    browser = browser_login(server)
    cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    browser.close()
    evil = {"Cookie": cookie, "Origin": "http://evil.example"}
    assert asyncio.run(_refused_websocket(server, evil)) == 403
    same_origin = {"Cookie": cookie, "Origin": f"http://127.0.0.1:{server.port}"}
    assert asyncio.run(_refused_websocket(server, same_origin)) == 101


def test_another_users_request_cannot_be_aborted(server):
    """alice's request (on the engine host directly) is invisible to the Jupyter user."""
    engine_url, proxy_token = host_proxy_token(server)
    alice = {"Authorization": f"Bearer {proxy_token}", "X-LightLLM-User": "alice"}
    body = {"prompt": "Tell me a story.", "sampling": {"max_tokens": 40, "temperature": 0, "ignore_eos": True},
            "stream": True}
    with httpx.stream("POST", f"{engine_url}/api/generate", json=body, headers=alice, timeout=60) as response:
        events = sse_events(response)
        request_id = next(events)["request_id"]
        refused = server.http.post(f"/lightllm/api/abort/{request_id}")
        assert refused.status_code == 404
        last = list(events)[-1]
    assert last["completion"]["finish_reason"] == "length"


def test_two_kernels_share_one_engine(server):
    """Two kernels call connect() with no configuration and generate at once: one engine batches both."""
    kernels = [ServerKernel(server), ServerKernel(server)]
    events = []
    stop = threading.Event()

    async def watch():
        ws = await open_events(server, server.auth)
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.read_message(), 0.2)
            except asyncio.TimeoutError:
                continue
            if message is None:
                break
            events.append(json.loads(message))
        ws.close()

    watcher = threading.Thread(target=lambda: asyncio.run(watch()))
    watcher.start()
    try:
        time.sleep(0.5)
        code = ("import lightllm_nb\nfrom lightllm_nb import SamplingParams\nc = lightllm_nb.connect()\n"
                "[r] = c.generate(['Write a long poem about the sea.'], SamplingParams(max_tokens=48, "
                "ignore_eos=True, temperature=0))\nprint(type(c).__name__, r.request_id, r.completion_tokens)")
        msg_ids = [k.client.execute(code) for k in kernels]
        outputs = [k.collect(m).split() for k, m in zip(kernels, msg_ids)]
    finally:
        stop.set()
        watcher.join(10)
        for k in kernels:
            k.shutdown()
    ids = {out[1] for out in outputs}
    assert [out[0] for out in outputs] == ["HTTPClient", "HTTPClient"]
    assert [out[2] for out in outputs] == ["48", "48"] and len(ids) == 2
    shared = [e for e in events if ids <= {row["request_id"] for row in e["rows"]}]
    assert shared, "no step ran both kernels' requests together"


@pytest.mark.parametrize("action", ["interrupt", "restart"])
def test_kernel_interrupt_or_restart_aborts_its_stream(server, action):
    kernel = ServerKernel(server)
    try:
        code = ("import lightllm_nb\nfrom lightllm_nb import SamplingParams\nc = lightllm_nb.connect()\n"
                f"for delta in c.stream('Tell me everything.', SamplingParams(**{LONG!r})):\n    pass")
        msg_id = kernel.client.execute(code)
        wait_for(lambda: running_requests(server) == 1, 60, "the kernel's request to run")
        server.http.post(f"/api/kernels/{kernel.id}/{action}").raise_for_status()
        started = time.monotonic()
        wait_for(lambda: running_requests(server) == 0, 10, f"a kernel {action} to abort its request")
        assert time.monotonic() - started < 5
        if action == "interrupt":
            with pytest.raises(AssertionError, match="KeyboardInterrupt"):
                kernel.collect(msg_id, timeout=30)
    finally:
        kernel.shutdown()


def test_sigkill_of_the_engine_host_mid_stream(server):
    status = server.status()
    body = {"prompt": "Tell me everything.", "sampling": LONG, "stream": True}
    with server.http.stream("POST", "/lightllm/api/generate", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
        next(events)
        os.kill(status["pid"], signal.SIGKILL)
        last = list(events)[-1]
    # A clear error at the end of the stream, not a hang or a silently short answer.
    assert "engine host stopped" in last["error"]["message"]
    assert server.process.poll() is None  # the Jupyter server lives on
    after = server.wait_engine_ready(restarts=status["restarts"] + 1)
    assert after["pid"] != status["pid"] and not pid_alive(status["pid"])
    answer = server.http.post("/lightllm/api/generate",
                              json={"prompt": "Hello", "sampling": {"max_tokens": 4}, "stream": False})
    assert answer.status_code == 200 and answer.json()["finish_reason"] == "length"


def test_activity_is_reported_while_generating(server):
    def last_activity():
        return server.http.get("/api/status", params={"no_track_activity": 1}).json()["last_activity"]

    before = last_activity()
    time.sleep(1.1)
    body = {"prompt": "Hi", "sampling": {"max_tokens": 4}, "stream": False}
    assert server.http.post("/lightllm/api/generate", json=body, params={"no_track_activity": 1}).status_code == 200
    assert last_activity() > before
