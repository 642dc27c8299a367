"""Leaving Python with requests still running: the open engine is closed on the way out (its requests
aborted, its driver thread joined), so the process exits 0, never aborts in torch's C++."""

import subprocess
import sys
import textwrap

import pytest

START = """
    import threading
    from lightllm_nb import Engine, SamplingParams
    engine = Engine({folder!r}, device="cpu", dtype="float64", progress=False, kv_tokens=4096)
    LONG = SamplingParams(max_tokens=300, ignore_eos=True)
    prompts = [[5 + i] * 200 for i in range(8)]  # steps long enough to be inside a torch op at exit
"""
LEAVERS = {
    # A stream read once, then the script ends (no close(), no `with`).
    "stream": """
        streams = [engine.stream(prompt_token_ids=p, sampling=LONG) for p in prompts]
        next(iter(streams[0]))
    """,
    # generate() on a daemon thread, still running when the main thread ends.
    "generate_in_a_thread": """
        stepped = threading.Event()
        engine.subscribe(lambda event: stepped.set())
        threading.Thread(target=lambda: engine.generate(prompt_token_ids=prompts, sampling=LONG),
                         daemon=True).start()
        stepped.wait(60)
    """,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("leaver", sorted(LEAVERS))
def test_exiting_with_requests_running_closes_the_engine_and_exits_0(tiny_model, leaver):
    folder, _ = tiny_model("llama")
    script = textwrap.dedent(START.format(folder=str(folder))) + textwrap.dedent(LEAVERS[leaver])
    for _ in range(3):  # the crash it guards against hit 4 runs of 4 with the demo model
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
        assert "terminate called" not in done.stderr and done.returncode == 0, done.stderr[-2000:]
