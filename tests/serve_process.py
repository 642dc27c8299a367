"""A real `lightllm-nb serve` process on loopback for the HTTP tests: start, wait, stop."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

OPERATOR_KEY = "operator-key-for-tests"
TOKENS = {"alice-token-123": {"user": "alice"}, "bob-token-4567": {"user": "bob"},
          "proxy-token-890": {"user": "jupyter-proxy", "role": "proxy"}}


@dataclass
class ServeProcess:
    process: subprocess.Popen
    url: str
    log: list = field(default_factory=list)

    def get(self, path: str, token: str | None = OPERATOR_KEY) -> tuple[int, bytes]:
        return request(self.url + path, token=token)

    def post(self, path: str, body, token: str | None = OPERATOR_KEY, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request(self.url + path, data, token=token, headers=headers)

    def stats(self, token: str = OPERATOR_KEY) -> dict:
        status, body = self.get("/api/stats", token)
        assert status == 200, body
        return json.loads(body)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _unix_request(url: str, data, headers: dict, timeout: float) -> tuple[int, bytes]:
    """`request` for a url "unix:/path/to/socket/route" (a serve started with --uds)."""
    path, route = url[len("unix:"):].split(".sock", 1)
    conn = _UnixConnection(path + ".sock", timeout)
    conn.request("POST" if data is not None else "GET", route, body=data, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def request(url: str, data: bytes | None = None, *, token: str | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, bytes]:
    if url.startswith("unix:"):
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return _unix_request(url, data, {**auth, **(headers or {})}, timeout)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_serve(tmp: Path, *extra: str, timeout: float = 120, keys: bool = True, env: dict | None = None
                ) -> ServeProcess:
    """`keys=False` starts it without any key or tokens file (it then generates a key)."""
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    auth = ["--api-key", OPERATOR_KEY, "--tokens-file", str(tokens)] if keys else []
    cmd = [sys.executable, "-m", "lightllm_nb.cli", "serve", "--model", "demo", "--device", "cpu",
           "--port", "0", "--kv-tokens", "8192", "--seed", "0", *auth, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    found = threading.Event()
    url = []

    def pump():  # keep reading, so a chatty server never blocks on a full pipe
        for line in process.stdout:
            log.append(line)
            m = re.search(r"listening on ((?:http://|unix:)\S+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("lightllm-nb serve did not start:\n" + "".join(log))
    served = ServeProcess(process, url[0], log)
    while served.get("/health", None)[0] != 200:
        time.sleep(0.1)
    return served


def module_host(name: str, api_server_counts: tuple[int, ...] = (0,)):
    """A module-scoped fixture: one serve process for a test module, stopped (exit 0) at its end;
    one per `--api-server-count` given (0: the HTTP front end runs in the engine's process)."""
    @pytest.fixture(scope="module", params=api_server_counts, ids=lambda n: f"api-servers-{n}")
    def host(request, tmp_path_factory):
        # Always given: the default (auto) depends on the host's cores.
        served = start_serve(tmp_path_factory.mktemp(name), "--api-server-count", str(request.param))
        yield served
        assert served.stop() == 0, "".join(served.log)
    return host
