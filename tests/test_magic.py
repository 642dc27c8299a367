"""%%lightllm in a real IPython kernel (jupyter_client) on the embedded demo engine: streaming in
several display updates, options, usage messages, {name} filling, conversations with cached
tokens in the footer, config, and an interrupt that aborts the request and frees its KV."""

import os
import queue
import re
import subprocess
import sys
import time

import pytest
from jupyter_client.manager import start_new_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    # A private runtime dir: a Jupyter server someone else runs on this machine must not be found.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTLLM_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    env["OMP_NUM_THREADS"] = "2"
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


class Outputs:
    """What one cell produced, in the order the front end got it."""

    def __init__(self, messages):
        self.messages = messages

    def of(self, *types):
        return [m for m in self.messages if m["msg_type"] in types]

    @property
    def stdout(self):
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stdout")

    @property
    def errors(self):
        text = "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stderr")
        return text + "".join(" ".join(m["content"]["traceback"]) for m in self.of("error"))

    def updates(self, display_id):
        return [m["content"]["data"] for m in self.of("display_data", "update_display_data")
                if m["content"].get("transient", {}).get("display_id") == display_id]

    @property
    def display_ids(self):
        return [m["content"]["transient"]["display_id"] for m in self.of("display_data")
                if "display_id" in m["content"].get("transient", {})]


def run(kc, code, timeout=240, on_message=None):
    msg_id = kc.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"the cell did not finish in {timeout}s: {messages[-3:]}")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return Outputs(messages)
        messages.append(msg)
        if on_message is not None:
            on_message(msg)


def text_of(data):
    return data.get("text/markdown") or data.get("text/plain") or ""


def test_a_cell_streams_its_answer_in_several_updates_with_a_footer(kernel):
    _, kc = kernel
    run(kc, "%load_ext lightllm_nb\nwho = 'Ada Lovelace'")
    out = run(kc, "%%lightllm --max-tokens 40 --temperature 0 --var answer\nWrite two sentences about {who}.")
    assert "embedded in this kernel" in out.stdout, out.stdout
    assert not out.errors, out.errors
    answer_id, footer_id = out.display_ids[:2]
    shown = [text_of(d) for d in out.updates(answer_id)]
    assert len(shown) >= 4, shown  # the first empty output, then several updates as text arrives
    grown = [s.rstrip(" \u258c") for s in shown[1:]]
    assert all(a and b.startswith(a) for a, b in zip(grown, grown[1:])) and len(grown[-1]) > len(grown[0])
    footer = text_of(out.updates(footer_id)[-1])
    assert re.search(r"\d+ tokens .*TTFT [\d.]+ s .*tok/s .*prompt tokens cached", footer), footer
    check = run(kc, "print(answer.completion_tokens, answer.prompt_tokens, repr(answer.text[:40]))")
    tokens, prompt = map(int, check.stdout.split()[:2])
    assert f"{tokens} tokens" in footer and prompt > 10
    assert check.stdout.split(" ", 2)[2].strip().strip("'")[:20] in grown[-1]


def test_options_parse_and_bad_ones_give_a_usage_message(kernel):
    _, kc = kernel
    for line, says in [("--max-tokens lots", "invalid int value"), ("--colour red", "unrecognized arguments"),
                       ("--temperature -1", "temperature"), ("--format html", "invalid choice"),
                       ("--raw --chat c", "--raw sends a plain prompt")]:
        out = run(kc, f"%%lightllm {line}\nhello")
        assert "usage: %%lightllm" in out.errors or says in out.errors, (line, out.errors)
        assert says in out.errors, (line, out.errors)
        assert "Traceback" not in out.errors and len(out.errors.strip().splitlines()) <= 6, out.errors
    missing = run(kc, "%%lightllm\nTell {nobody} a joke.")
    assert "no variable nobody exists" in missing.errors
    out = run(kc, "%%lightllm --format text --raw --max-tokens 6 --temperature 0 --seed 3\nThe capital of France is")
    answer_id = out.display_ids[0]
    assert set(out.updates(answer_id)[-1]) == {"text/plain"}
    code = run(kc, "%%lightllm --format code --max-tokens 6 --temperature 0\nprint hello in python")
    assert "text/html" in code.updates(code.display_ids[0])[-1]
    config = run(kc, "%lightllm config max_tokens=5 temperature=0")
    assert "max_tokens = 5" in config.stdout
    short = run(kc, "%%lightllm --var short\nCount to twenty.")
    assert int(run(kc, "print(short.completion_tokens)").stdout) <= 5
    assert "not a command" in run(kc, "%lightllm frobnicate").errors
    run(kc, "%lightllm config max_tokens=256 temperature=0.7")


def test_json_schema_and_regex_options_constrain_the_answer(kernel, tmp_path):
    _, kc = kernel
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "year": {"type": "integer", "minimum": 0, "maximum": 3000}},
              "required": ["city", "year"]}
    run(kc, f"%load_ext lightllm_nb\nimport json\nperson = {schema!r}")
    out = run(kc, "%%lightllm --json-schema person --var fact --max-tokens 40 --temperature 0.8 --seed 1\n"
                  "When and where was the Eiffel Tower built? Answer in JSON.")
    assert not out.errors, out.errors
    check = run(kc, "print(sorted(json.loads(fact.text)), fact.finish_reason)")
    assert check.stdout.strip() == "['city', 'year'] stop", check.stdout
    (tmp_path / "s.json").write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}')
    out = run(kc, f"%%lightllm --json-schema {tmp_path / 's.json'} --var flag --max-tokens 20\nIs water wet?")
    assert run(kc, "print(json.loads(flag.text))").stdout.strip() in ("{'ok': True}", "{'ok': False}")
    out = run(kc, "%%lightllm --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}' --var day --max-tokens 20\nA date, please.")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", run(kc, "print(day.text)").stdout.strip())
    for line, says in [("--json-schema nowhere", "neither a variable"), ("--regex '[^\\s\\S]'", "cannot match"),
                       ("--regex a --json-schema person", "at most one")]:
        bad = run(kc, f"%%lightllm {line}\nhello")
        assert says in bad.errors and "Traceback" not in bad.errors, (line, bad.errors)


def test_a_conversation_continues_and_its_history_comes_from_the_prefix_cache(kernel):
    _, kc = kernel
    first = run(kc, "%%lightllm --chat tutor --max-tokens 12 --temperature 0 --system 'You are terse.'\n"
                    "What is a KV cache?")
    assert not first.errors, first.errors
    second = run(kc, "%%lightllm --chat tutor --max-tokens 12 --temperature 0\nAnd why does it help?")
    footer = text_of(second.updates(second.display_ids[1])[-1])
    cached, prompt = map(int, re.search(r"(\d+) of (\d+) prompt tokens cached", footer).groups())
    assert cached > 20 and prompt > cached, footer
    status = run(kc, "%lightllm status")
    assert "tutor (2 turns)" in status.stdout


def test_interrupting_a_cell_aborts_the_request_and_frees_its_kv(kernel):
    km, kc = kernel
    interrupted = []

    def interrupt_once_streaming(msg):
        if msg["msg_type"] == "update_display_data" and not interrupted:
            interrupted.append(time.monotonic())
            km.interrupt_kernel()

    out = run(kc, "%%lightllm --max-tokens 1500 --temperature 1.0 --seed 1\nWrite a very long story.",
              on_message=interrupt_once_streaming)
    assert interrupted
    footer = text_of(out.updates(out.display_ids[1])[-1])
    assert "interrupted" in footer and "aborted, its KV cache freed" in footer, footer
    assert "Traceback" not in out.errors
    status = run(kc, "%lightllm status").stdout
    assert "engine: 0 running, 0 waiting" in status, status
    used, reclaimable = (int(x.replace(",", "")) for x in
                         re.search(r"KV cache: ([\d,]+) of [\d,]+ tokens in use .*?([\d,]+) of them", status).groups())
    assert used == reclaimable, status  # only the prefix cache holds KV now: no request does


def test_the_magic_and_its_dashboard_work_the_same_on_a_shared_engine(kernel, tmp_path):
    """Last in this module: it moves the kernel's magic from the embedded engine to a real
    `lightllm-nb serve` process over HTTP."""
    _, kc = kernel
    key = "key-for-the-magic-test"
    server = subprocess.Popen([sys.executable, "-m", "lightllm_nb.cli", "serve", "--model", "demo", "--device", "cpu",
                               "--host", "127.0.0.1", "--port", "0", "--api-key", key],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(line.split("listening on ")[1].strip() for line in server.stdout if "listening on" in line)
        connected = run(kc, f"%lightllm connect {url} {key}")
        assert f"using the shared engine at {url}" in connected.stdout, connected.stdout + connected.errors
        out = run(kc, "%%lightllm --panel --max-tokens 24 --temperature 0\nName three colours.")
        assert not out.errors, out.errors
        answer_id, footer_id = out.display_ids[:2]
        assert len(out.updates(answer_id)) >= 3
        assert "shared engine" in text_of(out.updates(footer_id)[-1])
        assert any("application/vnd.jupyter.widget-view+json" in m["content"]["data"] for m in out.of("display_data"))
        seen = run(kc, "import time; time.sleep(1)\n"
                       "kv = get_ipython().magics_manager.registry['LightLLMMagics'].dashboard.parts[1].latest\n"
                       "print(kv.step, len(kv.page_owner))")
        step, pages = map(int, seen.stdout.split())
        assert step > 0 and pages > 1000, seen.stdout  # StepEvents with the page map came over the websocket
        refused = run(kc, "%%lightllm --user mallory\nhello")
        assert "--user works only on an engine embedded in this kernel" in refused.errors
    finally:
        server.terminate()
        server.wait(timeout=30)
