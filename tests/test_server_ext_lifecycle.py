"""The engine host's life follows the Jupyter server's: started lazily on the first request when so
configured, and never outliving the server, even one killed with SIGKILL (no cleanup code runs)."""

from __future__ import annotations

import signal
import time

import pytest

from jupyter_harness import JupyterServer, pid_alive, wait_for

pytestmark = pytest.mark.slow


def test_lazy_start_then_no_orphan_after_sigkill(tmp_path):
    server = JupyterServer(tmp_path, "--LightLLM.device=cpu", "--LightLLM.start=lazy")
    try:
        status = wait_for(server.status, 60, "the extension to answer")
        time.sleep(1.0)
        assert server.status()["state"] == "stopped" and status["pid"] is None  # lazy: no model loaded yet
        # The first request starts the engine host and waits for it.
        answer = server.http.post("/lightllm/api/generate", timeout=300,
                                  json={"prompt": "Hi", "sampling": {"max_tokens": 2}, "stream": False})
        assert answer.status_code == 200 and answer.json()["finish_reason"] == "length"
        engine_pid = server.status()["pid"]
        assert pid_alive(engine_pid)
        server.stop(signal.SIGKILL)
        # PR_SET_PDEATHSIG: the kernel itself tells the engine host its parent is gone.
        wait_for(lambda: not pid_alive(engine_pid), 15, "the engine host to die with its Jupyter server")
    finally:
        server.stop()
