"""The discovery file: how `lightllm_nb.connect()` in a kernel finds this server's engine, no config."""

from __future__ import annotations

import json
import os

from lightllm_nb.connect import discovery_path


def write_discovery_file(runtime_dir: str, *, url: str, token: str, engine_url: str) -> str:
    """Writes `{url, token, engine_url, pid}` readable by this user only (it holds a token)."""
    os.makedirs(runtime_dir, exist_ok=True)
    path = discovery_path(runtime_dir, os.getpid())
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "engine_url": engine_url, "pid": os.getpid()}, f)
    os.replace(tmp, path)  # a kernel never reads half a file
    return path


def remove_discovery_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
