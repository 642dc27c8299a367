"""`lightllm_nb.connect()`: the engine this kernel should use, found with no configuration.

In order: an explicit `url`; `LIGHTLLM_URL` (+ `LIGHTLLM_API_KEY`) in the environment; the discovery
file that the Jupyter Server extension writes into the Jupyter runtime dir; else an engine embedded
in this process, announced in one line.
"""

from __future__ import annotations

import glob
import json
import os

DISCOVERY_PREFIX = "lightllm-server-"


def discovery_path(runtime_dir: str, server_pid: int) -> str:
    return os.path.join(runtime_dir, f"{DISCOVERY_PREFIX}{server_pid}.json")


def _runtime_dir() -> str | None:
    if os.environ.get("JUPYTER_RUNTIME_DIR"):
        return os.environ["JUPYTER_RUNTIME_DIR"]
    try:  # jupyter_core is absent on a bare GPU box; then there is no server to discover
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:
        return None
    return jupyter_runtime_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_server(runtime_dir: str | None = None) -> dict | None:
    """The discovery record of the Jupyter server that started this kernel, else of the newest live one."""
    runtime_dir = runtime_dir or _runtime_dir()
    if not runtime_dir:
        return None
    # A kernel is a child of its Jupyter server, so the parent's file is the right one when it exists.
    candidates = [discovery_path(runtime_dir, os.getppid())]
    candidates += sorted(glob.glob(os.path.join(runtime_dir, f"{DISCOVERY_PREFIX}*.json")),
                         key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if _alive(int(record.get("pid", -1))):
            return record
    return None


def connect(url: str | None = None, token: str | None = None, *, model: str = "demo", quiet: bool = False,
            **engine_options):
    """A `Client` for the shared engine; falls back to `Engine(model, **engine_options)` in-process."""
    from .serving.http_client import HTTPClient

    if url is None and os.environ.get("LIGHTLLM_URL"):
        url, token = os.environ["LIGHTLLM_URL"], token or os.environ.get("LIGHTLLM_API_KEY")
    if url is None:
        record = find_server()
        if record is not None:
            url, token = _route(record)
    if url is not None:
        return HTTPClient(url, token)
    if not quiet:
        print(f"lightllm-nb: no engine server found (no running Jupyter server with the lightllm extension, "
              f"no LIGHTLLM_URL); starting an embedded engine with model {model!r} in this process.")
    from .engine.engine import Engine

    return Engine(model, **engine_options).client()


def _route(record: dict) -> tuple[str, str | None]:
    """Through the Jupyter server with its token; under JupyterHub (no server token) straight to the
    Hub service with this kernel's own Hub token, which names its user."""
    if record.get("token"):
        return record["url"], record["token"]
    hub_token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if hub_token and record.get("engine_url"):
        return record["engine_url"], hub_token
    return record["url"], None
