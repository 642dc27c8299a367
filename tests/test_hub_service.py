"""`lightllm-nb serve --hub` as a managed JupyterHub service: a real `jupyterhub` (pip) with
configurable-http-proxy (npm) and the SharedPasswordAuthenticator. Spawning single-user
servers would cost a minute of CI per user, so each user's "kernel" is a real ipykernel started with
jupyter_client and that user's Hub API token (what a single-user server's kernel holds as
JUPYTERHUB_API_TOKEN), calling `lightllm_nb.connect()`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_harness import free_port, kernel_output, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("configurable-http-proxy") is None,
                                 reason="configurable-http-proxy (npm) is not installed: .ci/run installs it")]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    ports = {name: free_port() for name in ("public", "hub", "proxy_api", "service")}
    admin_token = secrets.token_hex(16)
    service_url = f"http://127.0.0.1:{ports['service']}"
    serve = [sys.executable, "-m", "lightllm_nb.cli", "serve", "--hub", "--model", "demo", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(ports["service"])]
    (work / "jupyterhub_config.py").write_text(textwrap.dedent(f"""
        c.JupyterHub.ip = "127.0.0.1"
        c.JupyterHub.port = {ports['public']}
        c.JupyterHub.hub_ip = "127.0.0.1"
        c.JupyterHub.hub_port = {ports['hub']}
        c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports['proxy_api']}"
        c.JupyterHub.db_url = "sqlite:///{work}/hub.sqlite"
        c.JupyterHub.cookie_secret_file = "{work}/cookie_secret"
        c.JupyterHub.authenticator_class = "shared-password"
        c.SharedPasswordAuthenticator.user_password = "{secrets.token_hex(8)}"
        c.Authenticator.allowed_users = {{"alice", "bob", "carol"}}
        c.JupyterHub.services = [
            {{"name": "lightllm", "url": "{service_url}", "command": {serve!r}}},
            {{"name": "test-admin", "api_token": "{admin_token}"}},
        ]
        c.JupyterHub.load_roles = [
            # alice and bob may use the engine; carol is a Hub user without that right.
            {{"name": "lightllm-users", "scopes": ["access:services!service=lightllm"], "users": ["alice", "bob"]}},
            {{"name": "test-admin", "scopes": ["admin:users", "tokens"], "services": ["test-admin"]}},
        ]
    """))
    log = open(work / "hub.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(work / "jupyterhub_config.py")],
                               cwd=work, stdout=log, stderr=subprocess.STDOUT)
    # The Hub's own API port: the public proxy routes to it only once every managed service is up.
    api = httpx.Client(base_url=f"http://127.0.0.1:{ports['hub']}/hub/api",
                       headers={"Authorization": f"token {admin_token}"}, timeout=30)

    def up(url):
        if process.poll() is not None:
            raise AssertionError(f"jupyterhub exited:\n{(work / 'hub.log').read_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: up(f"http://127.0.0.1:{ports['hub']}/hub/api/"), 90, "the Hub")
        wait_for(lambda: up(f"{service_url}/health"), 180, "the lightllm service")
        tokens = {user: api.post(f"/users/{user}/tokens", json={"note": "test", "expires_in": 3600}).json()["token"]
                  for user in ("alice", "bob", "carol")}
        yield {"service_url": service_url, "public_url": f"http://127.0.0.1:{ports['public']}", "tokens": tokens,
               "log": work / "hub.log"}
    finally:
        api.close()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def generate(hub, token, **extra):
    body = {"prompt": "Hello", "sampling": {"max_tokens": 3, "temperature": 0}, "stream": False}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{hub['service_url']}/api/generate", json=body, headers={**headers, **extra}, timeout=60)


def test_unauthenticated_and_unauthorized_requests_are_refused(hub):
    assert generate(hub, None).status_code == 401
    assert generate(hub, "not-a-hub-token").status_code == 401
    assert generate(hub, hub["tokens"]["carol"]).status_code == 401  # a Hub user without access:services
    # A Hub user cannot pose as another by naming them: the Hub says who the token belongs to.
    posing = generate(hub, hub["tokens"]["bob"], **{"X-LightLLM-User": "alice"})
    assert posing.status_code == 200
    stats = httpx.get(f"{hub['service_url']}/api/stats", headers={"Authorization": f"Bearer {hub['tokens']['bob']}",
                                                                   "X-LightLLM-User": "alice"}).json()
    assert stats["user"]["name"] == "bob"


def test_two_hub_users_kernels_share_one_engine_and_see_only_their_own(hub):
    from jupyter_client import KernelManager

    views = {"alice": [], "bob": []}
    stop = threading.Event()

    async def watch(user):
        request = HTTPRequest(f"{hub['service_url'].replace('http', 'ws', 1)}/api/events",
                              headers={"Authorization": f"Bearer {hub['tokens'][user]}"})
        ws = await websocket_connect(request)
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.read_message(), 0.2)
            except asyncio.TimeoutError:
                continue
            if message is None:
                break
            views[user].append(json.loads(message))
        ws.close()

    watchers = [threading.Thread(target=lambda u=u: asyncio.run(watch(u))) for u in views]
    kernels = []
    for user in views:
        km = KernelManager(kernel_name="python3")
        km.start_kernel(env={**os.environ, "LIGHTLLM_URL": hub["service_url"],
                             "LIGHTLLM_API_KEY": hub["tokens"][user], "JUPYTERHUB_API_TOKEN": hub["tokens"][user]})
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        kernels.append((km, client))
    for w in watchers:
        w.start()
    code = ("import lightllm_nb\nfrom lightllm_nb import SamplingParams\nc = lightllm_nb.connect()\n"
            "[r] = c.generate(['Write a poem about the sea.'], SamplingParams(max_tokens=32, ignore_eos=True, "
            "temperature=0))\nprint(c.user, r.request_id, r.completion_tokens)")
    try:
        time.sleep(0.5)
        msg_ids = [client.execute(code) for _, client in kernels]
        outputs = [kernel_output(client, msg_id) for (_, client), msg_id in zip(kernels, msg_ids)]
    finally:
        stop.set()
        for w in watchers:
            w.join(10)
        for km, client in kernels:
            client.stop_channels()
            km.shutdown_kernel(now=True)
    (alice_user, alice_id, alice_n), (bob_user, bob_id, bob_n) = (o.split() for o in outputs)
    assert (alice_user, bob_user, alice_n, bob_n) == ("alice", "bob", "32", "32")
    for me, mine, theirs in (("alice", alice_id, bob_id), ("bob", bob_id, alice_id)):
        rows = [row for event in views[me] for row in event["rows"]]
        assert {row["user"] for row in rows} <= {me, "other"}
        assert mine in {row["request_id"] for row in rows if row["user"] == me}
        assert theirs not in json.dumps(views[me])  # the other's request id never reaches me
        # One engine: some step ran both users' requests together.
        assert any({row["user"] for row in event["rows"]} == {me, "other"} for event in views[me])


def _status(url):
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def test_the_service_answers_at_the_hubs_public_url(hub):
    """The proxy forwards `/services/lightllm/...` with the prefix: the service answers there too."""
    from openai import AuthenticationError, OpenAI

    base = f"{hub['public_url']}/services/lightllm"
    # The Hub adds the service's proxy route once it is up; /health needs no token.
    wait_for(lambda: _status(f"{base}/health") == 200, 60, f"{base}/health to answer 200")
    alice = OpenAI(base_url=f"{base}/v1", api_key=hub["tokens"]["alice"], max_retries=0)
    chat = alice.chat.completions.create(model=alice.models.list().data[0].id, max_tokens=3, temperature=0,
                                         messages=[{"role": "user", "content": "Hello"}])
    assert chat.usage.completion_tokens == 3
    stream = alice.completions.create(model=chat.model, prompt="Once upon a time", max_tokens=4, temperature=0,
                                      stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    stats = httpx.get(f"{base}/api/stats", headers={"Authorization": f"Bearer {hub['tokens']['alice']}"}).json()
    assert stats["user"]["name"] == "alice"
    # Through the proxy as directly: no token, or a Hub user without the service's scope, is refused.
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{base}/v1", api_key=hub["tokens"]["carol"], max_retries=0).models.list()


def test_a_hub_that_cannot_be_reached_is_a_503_not_a_refusal():
    from lightllm_nb.serving.api_errors import ApiError
    from lightllm_nb.serving.hub_auth import HubTokens

    tokens = HubTokens(api_url=f"http://127.0.0.1:{free_port()}/hub/api", service_name="lightllm")
    with pytest.raises(ApiError) as err:
        tokens.identify("Bearer some-hub-token", None)
    assert err.value.status == 503 and "JUPYTERHUB_API_URL" in err.value.message


def test_the_service_prefix_comes_from_the_hub_or_the_service_name(monkeypatch):
    from lightllm_nb.serving.hub_auth import service_prefix

    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    assert service_prefix("lightllm") == "/services/lightllm"  # an external service at the default base_url
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/jhub/services/llm/")  # a managed one: the Hub says
    assert service_prefix("llm") == "/jhub/services/llm"
