"""The command line: help with defaults for every option, arguments checked before the model
loads, and `serve` generating its own key (mode 0600) when none is given."""

import json
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lightllm_nb.cli import build_parser, main
from lightllm_nb.host_cpus import usable_cpus
from lightllm_nb.serving.host import api_server_count, auto_api_server_count
from serve_process import start_serve


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "lightllm_nb.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subcommands) == {"generate", "demo", "serve"}
    for name, sub in subcommands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        text = sub.format_help()
        assert "(default: " in text, name
    serve_help = subcommands["serve"].format_help()
    for flag in ("--host", "--port", "--api-key", "--tokens-file", "--uds", "--served-model-name", "--max-num-seqs",
                 "--gpu-memory-utilization", "--block-size", "--enable-prefix-caching", "--shutdown-timeout"):
        assert flag in serve_help
    top = run_cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to build an Engine fails the test: the error had to come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model started loading before the arguments were checked")
    monkeypatch.setattr("lightllm_nb.engine.engine.Engine.__init__", refuse)


def run_main(capsys, *args):
    """The CLI in this process (no interpreter start per case): exit code and stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--max-tokens", "-5"], "--max-tokens"),
    (["demo", "--top-p", "0"], "--top-p"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--kv-tokens", "0"], "--kv-tokens"),
    (["serve", "--tokens-file", "/no/such/file.json"], "--tokens-file"),
    (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["serve", "--max-num-seqs", "8", "--max-num-batched-tokens", "4"],
     "--max-num-batched-tokens=4 is less than --max-num-seqs=8"),
    (["serve", "--max-num-seqs", "1000000000"], "--max-num-seqs=1000000000 is more requests at once"),
    (["serve", "--max-num-seqs", "100", "--kv-tokens", "64"], "raise --kv-tokens"),
])
def test_bad_arguments_are_reported_before_the_model_loads(capsys, no_model_load, args, says):
    code, err = run_main(capsys, *args)
    assert code == 2 and says in err, err


def test_a_limit_the_loaded_pool_refuses_is_reported_with_serves_flags(capsys, monkeypatch):
    """--max-num-seqs beyond the KV pool sized after the load: still said in the flags' names."""
    from lightllm_nb.engine.arguments import check_batch_limits

    monkeypatch.setattr("lightllm_nb.serving.host.run_host",
                        lambda args, factory: check_batch_limits(args.max_num_seqs, None, kv_tokens=23_301,
                                                                 max_context=8192))
    code, err = run_main(capsys, "serve", "--max-num-seqs", "60000")
    assert code == 2 and "--max-num-seqs=60000 is more than the KV cache's 23301 pages (--kv-tokens=23301)" in err
    assert "max_running" not in err


def test_generate_names_its_own_flags_too(capsys, monkeypatch):
    monkeypatch.setattr("lightllm_nb.engine.engine.load_checkpoint", lambda *a: pytest.fail("the model loaded"))
    code, err = run_main(capsys, "generate", "hi", "--kv-tokens", "3", "--page-size", "4")
    assert code == 2 and "--kv-tokens=3 is less than one page (--page-size=4): raise --kv-tokens" in err


def test_a_malformed_tokens_file_is_reported_before_the_model_loads(capsys, no_model_load, tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text(json.dumps({"short": {"user": "alice"}}))
    code, err = run_main(capsys, "serve", "--tokens-file", str(bad), "--port", "0")
    assert code == 2 and "tokens file" in err and "8+ characters" in err
    bad.write_text("{oops")
    code, err = run_main(capsys, "serve", "--tokens-file", str(bad), "--port", "0")
    assert code == 2 and "not readable JSON" in err


def test_serve_without_a_key_writes_one_mode_0600_and_accepts_only_it(tmp_path):
    # On a Unix socket this time (a socket file of mode 0600, for its owner only).
    socket_path = tmp_path / "engine.sock"
    host = start_serve(tmp_path, "--uds", str(socket_path), keys=False, env={"XDG_RUNTIME_DIR": str(tmp_path)})
    try:
        line = next(line for line in host.log if "API key written to" in line)
        path = line.split("API key written to ")[1].split(" (mode")[0]
        assert os.path.dirname(path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        key = open(path).read().strip()
        assert len(key) >= 32
        assert host.get("/v1/models", token=key)[0] == 200
        assert host.get("/v1/models", token="operator-key-for-tests")[0] == 401
        assert any("%|" in line or "it/s" in line for line in host.log), "no model-load progress bar"
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        assert "engine.sock" in path  # the key file is named after the socket
    finally:
        assert host.stop() == 0


@pytest.mark.parametrize("cores, can_split, front_ends", [(16, True, 2), (8, True, 2), (7, True, 0), (2, True, 0),
                                                          (1, True, 0), (64, False, 0)])
def test_auto_api_server_count_splits_off_two_front_ends_where_cores_and_pyzmq_allow(cores, can_split, front_ends):
    assert auto_api_server_count(cores, can_split) == front_ends


def test_auto_keeps_one_process_where_the_engine_cannot_watch_its_front_ends(monkeypatch):
    """No pidfds (not Linux, a kernel before 5.3, a seccomp profile that blocks pidfd_open): forking
    front ends would fail after the model load, so `auto` does not, however many cores there are."""
    monkeypatch.delattr(os, "pidfd_open", raising=False)
    assert api_server_count("auto", cores=64) == 0


def test_auto_counts_the_cpus_a_cgroup_quota_leaves(monkeypatch, tmp_path):
    """A container limited to 2 CPUs on a 64-core node: the quota, not the node, decides."""
    real_open = open
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("200000 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpu_max if path == "/sys/fs/cgroup/cpu.max"
                                                                         else path, *a, **k))
    assert usable_cpus() == 2
    assert api_server_count("auto") == 0


def test_an_explicit_api_server_count_is_kept_on_any_host():
    assert api_server_count(0, cores=64) == 0
    assert api_server_count(3, cores=2) == 3


def _with_cores(monkeypatch, cores: int) -> None:
    monkeypatch.setattr("lightllm_nb.serving.host.usable_cpus", lambda: cores)


def test_serve_by_default_runs_two_api_server_processes_on_a_16_core_host(monkeypatch):
    """The default reaches the split: the real run_host, with a stand-in engine and run_split."""
    _with_cores(monkeypatch, 16)
    monkeypatch.setattr("lightllm_nb.serving.host.can_watch_child_processes", lambda: True)
    monkeypatch.setattr("gc.freeze", lambda: None)  # run_host's freeze would keep this test process's heap
    split = []
    monkeypatch.setattr("lightllm_nb.cli._serving_engine",
                        lambda args: SimpleNamespace(prompts=SimpleNamespace(max_context=64), tokenizer=None,
                                                        model_name="m", close=lambda: None))
    monkeypatch.setattr("lightllm_nb.serving.api_servers.run_split",
                        lambda args, engine, *rest: split.append(args.api_server_count) or 0)
    assert main(["serve", "--port", "0", "--api-key", "a-key-for-this-test"]) == 0
    assert split == [2]


@pytest.mark.parametrize("cores, argv, front_ends", [(2, [], 0), (16, ["--api-server-count", "0"], 0),
                                                     (2, ["--api-server-count", "2"], 2)])
def test_serve_keeps_the_front_end_in_process_on_a_small_host_or_when_asked(monkeypatch, cores, argv, front_ends):
    _with_cores(monkeypatch, cores)
    hosted = []
    monkeypatch.setattr("lightllm_nb.serving.host.run_host", lambda args, factory: hosted.append(args.api_server_count))
    main(["serve", *argv])
    assert hosted == [front_ends]
