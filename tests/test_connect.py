"""`lightllm_nb.connect()`: how a kernel finds its engine (the Jupyter Server extension is tested
end to end in test_server_ext.py; here: the choice between discovery, environment and embedded)."""

import json
import os
import subprocess
import sys

import pytest

import lightllm_nb
from lightllm_nb import SamplingParams
from lightllm_nb.connect import discovery_path
from lightllm_nb.serving.client import LocalClient
from lightllm_nb.serving.http_client import HTTPClient


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    for name in ("LIGHTLLM_URL", "LIGHTLLM_API_KEY", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def write_record(runtime_dir, pid, **record):
    path = discovery_path(str(runtime_dir), pid)
    with open(path, "w") as f:
        json.dump({"pid": pid, **record}, f)
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_nothing_found_means_an_embedded_engine_announced_in_one_line(runtime_dir, tiny_model, capsys):
    folder, _ = tiny_model("llama")
    write_record(runtime_dir, dead_pid(), url="http://127.0.0.1:9/lightllm", token="t")  # a stopped server's
    client = lightllm_nb.connect(model=str(folder), device="cpu")
    try:
        notice = capsys.readouterr().out.strip().splitlines()
        assert len(notice) == 1 and "no engine server found" in notice[0] and "embedded" in notice[0]
        assert isinstance(client, LocalClient)
        [done] = client.generate(["hello"], SamplingParams(max_tokens=3, ignore_eos=True))
        assert done.completion_tokens == 3
    finally:
        client.close()


def test_the_discovery_file_of_a_live_server_is_used(runtime_dir):
    write_record(runtime_dir, os.getpid(), url="http://127.0.0.1:8888/lightllm", token="jupyter-token",
                 engine_url="http://127.0.0.1:40000")
    client = lightllm_nb.connect()
    assert isinstance(client, HTTPClient) and client.url == "http://127.0.0.1:8888/lightllm"
    client.close()


def test_under_jupyterhub_kernels_go_to_the_hub_service_with_their_own_token(runtime_dir, monkeypatch):
    # A single-user server has no Jupyter token of its own to hand out: the kernel's Hub token names its user.
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "kernel-hub-token")
    write_record(runtime_dir, os.getpid(), url="http://127.0.0.1:8888/user/alice/lightllm", token="",
                 engine_url="http://127.0.0.1:40000")
    client = lightllm_nb.connect()
    assert isinstance(client, HTTPClient) and client.url == "http://127.0.0.1:40000"
    client.close()


def test_the_environment_overrides_discovery(runtime_dir, monkeypatch):
    write_record(runtime_dir, os.getpid(), url="http://127.0.0.1:8888/lightllm", token="jupyter-token")
    monkeypatch.setenv("LIGHTLLM_URL", "http://127.0.0.1:41000")
    monkeypatch.setenv("LIGHTLLM_API_KEY", "key-from-env")
    client = lightllm_nb.connect()
    assert isinstance(client, HTTPClient) and client.url == "http://127.0.0.1:41000"
    client.close()
