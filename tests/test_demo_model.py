"""The real demo model (SmolLM2-135M-Instruct from its GGUF file) through the whole engine."""

import subprocess
import sys
import threading

import pytest

from lightllm_nb import Engine, SamplingParams


@pytest.fixture(scope="module")
def demo_engine():
    with Engine("demo", device="cpu", progress=False, kv_tokens=4096) as engine:
        yield engine


def test_answers_a_factual_question(demo_engine):
    reply = demo_engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"  # it ends its answer with <|im_end|>
    assert reply.metrics["time_to_first_token"] > 0


def test_stream_deltas_add_up_to_generate(demo_engine):
    sampling = SamplingParams(max_tokens=20, temperature=0)
    ids = demo_engine.chat_prompt_ids([{"role": "user", "content": "Name three primary colors."}])
    streamed = "".join(demo_engine.stream(prompt_token_ids=ids, sampling=sampling))
    whole = demo_engine.generate(prompt_token_ids=[ids], sampling=sampling)[0].text
    assert streamed == whole and len(whole) > 10


def test_stop_string_cuts_the_text(demo_engine):
    ids = demo_engine.chat_prompt_ids([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    free = demo_engine.generate(prompt_token_ids=[ids], sampling=SamplingParams(max_tokens=40, temperature=0))[0]
    assert "4" in free.text, free.text
    cut = demo_engine.generate(prompt_token_ids=[ids],
                               sampling=SamplingParams(max_tokens=40, temperature=0, stop=["4"]))[0]
    assert cut.finish_reason == "stop" and "4" not in cut.text
    assert free.text.startswith(cut.text)
    streamed = "".join(demo_engine.stream(prompt_token_ids=ids,
                                          sampling=SamplingParams(max_tokens=40, temperature=0, stop=["4"])))
    assert streamed == cut.text


def test_seeded_sampling_reproduces_in_any_batch(demo_engine):
    prompt = "Once upon a time"
    solo = demo_engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=7))[0]
    crowd = demo_engine.generate(["The weather", prompt, "In 1990"],
                                 [SamplingParams(max_tokens=9, temperature=1.0),
                                  SamplingParams(max_tokens=16, temperature=1.0, seed=7),
                                  SamplingParams(max_tokens=12, temperature=0.7, seed=3)])
    assert crowd[1].token_ids == solo.token_ids


def test_two_threads_generating_at_once_get_their_own_answers(demo_engine):
    """Once garbled (' Paris Paris..\n\n\nTheThe answer answer is is:'): both threads ran steps."""
    questions = ["What is the capital of France?", "Name three primary colors."]
    prompts = [demo_engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in questions]
    sampling = SamplingParams(max_tokens=16, temperature=0)
    alone = [c.text for c in demo_engine.generate(prompt_token_ids=prompts, sampling=sampling)]
    together = {}

    def ask(name):
        together[name] = [c.text for c in demo_engine.generate(prompt_token_ids=prompts, sampling=sampling)]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == {0: alone, 1: alone}
    assert "Paris" in alone[0]


def test_cli_generate_streams(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lightllm_nb.cli", "generate", "--model", "demo", "--device", "cpu",
                          "--max-tokens", "16", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_cli_reports_bad_input_clearly():
    run = subprocess.run([sys.executable, "-m", "lightllm_nb.cli", "generate", "--model", "/no/such/model", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "No model at" in run.stderr


def test_overlapped_steps_give_the_same_text_and_stops(demo_engine):
    questions = ["Count from 1 to 10, separated by commas.", "Name three primary colors.",
                 "What is the capital of France?"]
    prompts = [demo_engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in questions]
    sampling = [SamplingParams(max_tokens=30, temperature=0, stop=["4"]),
                SamplingParams(max_tokens=30, temperature=0),
                SamplingParams(max_tokens=5, temperature=0)]
    plain = demo_engine.generate(prompt_token_ids=prompts, sampling=sampling)
    with Engine("demo", device="cpu", progress=False, kv_tokens=4096, overlap=True) as overlapped:
        again = overlapped.generate(prompt_token_ids=prompts, sampling=sampling)
        streamed = "".join(overlapped.stream(prompt_token_ids=prompts[0], sampling=sampling[0]))
    assert [(c.text, c.token_ids, c.finish_reason) for c in again] == \
        [(c.text, c.token_ids, c.finish_reason) for c in plain]
    assert [c.finish_reason for c in plain] == ["stop", "stop", "length"]
    assert streamed == plain[0].text
