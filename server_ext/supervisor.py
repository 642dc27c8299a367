"""Runs `lightllm-nb serve` as a child of the Jupyter server: health checks, restart with backoff, stop.

The child gets its own process group (so stopping it takes its TP workers too) and is told by the
kernel to die with its parent (PR_SET_PDEATHSIG), so a Jupyter server killed with SIGKILL leaves no
engine host holding the GPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import httpx

PR_SET_PDEATHSIG = 1
HEALTH_INTERVAL_S = 0.5
# A child that stayed healthy this long has earned a fresh backoff after its next crash.
STABLE_AFTER_S = 60.0


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child the moment the Jupyter server exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineSupervisor:
    """Owns one engine host process and keeps it answering `/health`.

    `serve_args` are the `lightllm-nb serve` options that choose the model (`--model demo ...`);
    the supervisor adds the address and a tokens file holding its own proxy token.
    """

    def __init__(self, serve_args: list[str], *, runtime_dir: str, log: logging.Logger | None = None,
                 startup_timeout_s: float = 300.0, max_backoff_s: float = 30.0):
        self.serve_args = list(serve_args)
        self.runtime_dir = runtime_dir
        self.log = log or logging.getLogger("lightllm_nb.server_ext")
        self.startup_timeout_s = startup_timeout_s
        self.max_backoff_s = max_backoff_s
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy_token = secrets.token_urlsafe(32)
        self.tokens_file = os.path.join(runtime_dir, f"lightllm-tokens-{os.getpid()}.json")
        self.process: subprocess.Popen | None = None
        self.state = "stopped"  # stopped -> starting -> ready -> (crashed -> starting ...) -> stopped
        self.restarts = 0
        self.last_error = ""
        self._ready = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the child and the watcher; returns at once (use `wait_ready`)."""
        if self._watch_task is not None:
            return
        self._stopping = False
        self._write_tokens_file()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def wait_ready(self, timeout: float | None = None) -> bool:
        if self._ready.is_set():  # every request asks: no task and timer for the usual answer
            return True
        self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout if timeout is not None else self.startup_timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
            self._watch_task = None
        await self._terminate(timeout)
        self.state = "stopped"
        self._ready.clear()
        try:
            os.unlink(self.tokens_file)
        except FileNotFoundError:
            pass

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # --- internals ------------------------------------------------------------------------------

    def _write_tokens_file(self) -> None:
        fd = os.open(self.tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({self.proxy_token: {"user": "jupyter-server-proxy", "role": "proxy"}}, f)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "lightllm_nb.cli", "serve", *self.serve_args,
                "--host", "127.0.0.1", "--port", str(self.port), "--tokens-file", self.tokens_file]

    def _spawn(self) -> None:
        command = self._command()
        self.log.info("lightllm: starting the engine host: %s", " ".join(command))
        self.state = "starting"
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)

    async def _healthy(self, client: httpx.AsyncClient) -> bool:
        try:
            response = await client.get(f"{self.url}/health", timeout=2.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch(self) -> None:
        """Starts the child, marks it ready once `/health` answers, restarts it when it exits."""
        backoff = 1.0
        async with httpx.AsyncClient() as client:
            while not self._stopping:
                self._spawn()
                started = time.monotonic()
                while self.process.poll() is None:
                    if self.state == "starting":
                        if await self._healthy(client):
                            self.state = "ready"
                            self._ready.set()
                            self.log.info("lightllm: engine host ready at %s (pid %d) after %.1f s",
                                          self.url, self.process.pid, time.monotonic() - started)
                        elif time.monotonic() - started > self.startup_timeout_s:
                            self.last_error = f"no answer on /health within {self.startup_timeout_s:.0f} s"
                            self.log.error("lightllm: engine host %s; killing it", self.last_error)
                            await self._terminate(5.0)
                            break
                    await asyncio.sleep(HEALTH_INTERVAL_S)
                if self._stopping:
                    return
                self._ready.clear()
                code = self.process.poll()
                if time.monotonic() - started > STABLE_AFTER_S:
                    backoff = 1.0
                self.restarts += 1
                self.state = "crashed"
                self.last_error = self.last_error or f"engine host exited with code {code}"
                self.log.warning("lightllm: engine host exited with code %s; restarting in %.0f s",
                                 code, backoff)
                await asyncio.sleep(backoff)
                self.last_error = ""
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _terminate(self, timeout: float) -> None:
        """SIGTERM to the child's process group, SIGKILL if it has not gone after `timeout`."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self._signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            self.log.warning("lightllm: engine host did not stop in %.0f s; killing it", timeout)
            self._signal_group(process, signal.SIGKILL)
            process.wait()

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
