"""Real Jupyter servers (with the lightllm extension) and kernels for the server-extension tests."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Extensions that ship with the environment and register websockets without auth decorators; they
# are switched off so that any warning about an unauthenticated endpoint can only be ours.
OTHER_EXTENSIONS_OFF = {"jupyter_lsp": False, "jupyter_server_terminals": False}
UNAUTHENTICATED_WARNING = re.compile(r"JupyterServerAuthWarning|without @allow_unauthenticated")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class JupyterServer:
    """`jupyter server` with the extension, its own runtime and config dirs, token auth only."""

    def __init__(self, workdir: Path, *lightllm_args: str):
        self.workdir = workdir
        self.runtime_dir = workdir / "runtime"
        self.config_dir = workdir / "config"
        for d in (self.runtime_dir, self.config_dir, workdir / "notebooks"):
            d.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": OTHER_EXTENSIONS_OFF}}))
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "jupyter.log"
        self.env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
                    "JUPYTER_CONFIG_DIR": str(self.config_dir), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser",
                   f"--port={self.port}", "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
                   "--ServerApp.allow_unauthenticated_access=False", "--ServerApp.terminals_enabled=False",
                   f"--ServerApp.root_dir={workdir / 'notebooks'}", *lightllm_args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, headers=self.auth, timeout=60)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def log_text(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict | None:
        try:
            response = self.http.get("/lightllm/status")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def wait_engine_ready(self, timeout: float = 120.0, restarts: int = 0) -> dict:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"jupyter server exited:\n{self.log_text()[-3000:]}")
            s = self.status()
            return s if s and s["state"] == "ready" and s["restarts"] >= restarts else None
        try:
            return wait_for(ready, timeout, "the engine host to be ready", interval=0.25)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.log_text()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            if sig == signal.SIGINT:  # Jupyter asks for a confirmation on the first Ctrl-C
                time.sleep(0.2)
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        self._log.close()


class ServerKernel:
    """A kernel started by the Jupyter server (so it is the server's child), driven with jupyter_client."""

    def __init__(self, server: JupyterServer):
        from jupyter_client import BlockingKernelClient

        self.server = server
        self.id = server.http.post("/api/kernels", json={"name": "python3"}).json()["id"]
        connection_file = server.runtime_dir / f"kernel-{self.id}.json"
        wait_for(connection_file.exists, 30, "the kernel's connection file")
        self.client = BlockingKernelClient()
        self.client.load_connection_file(str(connection_file))
        self.client.start_channels(hb=False)  # no manager here: the heartbeat would read as dead
        self.client.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 120.0) -> str:
        """Runs `code`, returns its stdout; raises with the traceback if it failed."""
        msg_id = self.client.execute(code)
        return self.collect(msg_id, timeout)

    def collect(self, msg_id: str, timeout: float = 120.0) -> str:
        return kernel_output(self.client, msg_id, timeout)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.server.http.delete(f"/api/kernels/{self.id}")


def kernel_output(client, msg_id: str, timeout: float = 120.0) -> str:
    """The stdout of one execute request; raises with the traceback if it failed."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            raise AssertionError("kernel error:\n" + "\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(out)
