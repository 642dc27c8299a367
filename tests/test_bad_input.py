"""Every mistake a user can make gets an error naming the parameter, the value and the limit,
and the engine keeps serving everyone else with no KV slot lost."""

import json

import pytest
from safetensors.torch import save_file
import torch

from lightllm_nb import Engine, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model):
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=512) as eng:
        yield eng


@pytest.fixture
def fresh(tiny_model):
    """An engine whose low-level API (add_request / step) this thread drives: no driver loop yet."""
    folder, _ = tiny_model("llama")
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=512) as eng:
        yield eng


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), ["max_tokens=0", ">= 1"]),
    (dict(temperature=-0.5), ["temperature=-0.5", ">= 0"]),
    (dict(top_p=0.0), ["top_p=0.0", "(0, 1]"]),
    (dict(top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    (dict(top_k=-1), ["top_k=-1", ">= 0"]),
    (dict(repetition_penalty=0), ["repetition_penalty=0", "> 0"]),
    (dict(presence_penalty=3), ["presence_penalty=3", "[-2, 2]"]),
    (dict(logprobs=50), ["logprobs=50", "[0, 20]"]),
    (dict(temperature=float("inf")), ["temperature=inf", "finite"]),
    (dict(temperature=float("nan")), ["temperature=nan", "finite"]),
    (dict(repetition_penalty=float("inf")), ["repetition_penalty=inf", "finite"]),
    (dict(frequency_penalty=float("-inf")), ["frequency_penalty=-inf", "finite"]),
])
def test_bad_sampling_params(kwargs, words):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_prompts_are_rejected_and_others_keep_running(fresh):
    engine = fresh
    good = engine.add_request(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=8, temperature=0))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request(prompt_token_ids=[])
    with pytest.raises(InvalidRequestError, match=r"600 tokens but the context limit is 512"):
        engine.add_request(prompt_token_ids=[5] * 600)
    with pytest.raises(InvalidRequestError, match=r"max_tokens \(510\).*at most 502"):
        engine.add_request(prompt_token_ids=[5] * 10, sampling=SamplingParams(max_tokens=510))
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 49152\)"):
        engine.add_request(prompt_token_ids=[5, 99999])
    with pytest.raises(InvalidRequestError, match="exactly one of"):
        engine.generate()
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.completion
    assert finished[good].finish_reason == "length" and len(finished[good].token_ids) == 8
    engine.clear_prefix_cache()
    assert engine.pool.is_whole()


def test_generate_validates_all_prompts_before_running_any(engine):
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.generate(["hello", ""], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished() and engine.pool.is_whole()


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        Engine(str(tmp_path / "nowhere"), device="cpu", progress=False)


def test_unsupported_architecture(tmp_path, demo_tokenizer):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_embd": 8}))
    save_file({"wte.weight": torch.zeros(10, 8)}, str(tmp_path / "model.safetensors"))
    demo_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*not supported.*llama"):
        Engine(str(tmp_path), device="cpu", progress=False)


def test_bad_engine_settings(tiny_model):
    folder, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="scheduler='fastest' is unknown"):
        Engine(str(folder), device="cpu", scheduler="fastest", progress=False)
    with pytest.raises(ValueError, match="page_size=0"):
        Engine(str(folder), device="cpu", page_size=0, progress=False)
    with pytest.raises(ValueError, match="dtype='int8'"):
        Engine(str(folder), device="cpu", dtype="int8", progress=False)


def test_closed_engine_refuses_work(tiny_model):
    folder, _ = tiny_model("llama")
    engine = Engine(str(folder), device="cpu", progress=False, kv_tokens=256)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(["hi"])


@pytest.mark.parametrize("kwargs, words", [
    (dict(stop_token_ids=5), "stop_token_ids=5 is invalid"),
    (dict(temperature="0.5"), "temperature='0.5' is invalid"),
    (dict(seed="a"), "seed='a' is invalid"),
    (dict(seed=2**70), "seed=.* is invalid"),
    (dict(max_tokens=True), "max_tokens=True is invalid"),
])
def test_wrong_types_in_sampling_params(kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplingParams(**kwargs)


def test_wrong_shapes_of_prompt_token_ids(engine, fresh):
    with pytest.raises(InvalidRequestError, match="list of integer token ids"):
        fresh.add_request(prompt_token_ids="hello")
    with pytest.raises(InvalidRequestError, match="list of integer token ids"):
        fresh.add_request(prompt_token_ids=[3.7])
    with pytest.raises(InvalidRequestError, match="list of integer token ids"):
        fresh.add_request(prompt_token_ids=5)
    with pytest.raises(InvalidRequestError, match=r"wrap a single prompt as \[ids\]"):
        engine.generate(prompt_token_ids=[3, 4, 5])
    assert not engine.has_unfinished() and engine.pool.is_whole()


def test_small_mistakes_get_clear_errors(engine):
    with pytest.raises(InvalidRequestError, match="prompts must be a string or a list of strings, got int"):
        engine.generate(123)
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\] is NoneType: each prompt must be a string"):
        engine.generate(["hi", None])
    with pytest.raises(InvalidRequestError, match=r"sampling has unknown fields \['max_new_tokens'\]"):
        engine.generate(["hi"], {"max_new_tokens": 3})
    with pytest.raises(InvalidRequestError, match="sampling must be a SamplingParams or a dict"):
        engine.generate(["hi"], 0.5)
    with pytest.raises(InvalidRequestError, match="messages must be a non-empty list"):
        engine.chat([])
    # A dict of SamplingParams fields is as good as the object.
    done = engine.generate(["hi"], {"max_tokens": 3, "temperature": 0, "ignore_eos": True})[0]
    assert done.completion_tokens == 3 and done.finish_reason == "length"
    assert not engine.has_unfinished()


def test_stats_after_close_says_closed(tiny_model):
    folder, _ = tiny_model("llama")
    engine = Engine(str(folder), device="cpu", progress=False, kv_tokens=64)
    engine.generate(prompt_token_ids=[[5, 6]], sampling=SamplingParams(max_tokens=2))
    engine.close()
    assert engine.stats() == {"model": engine.model_name, "closed": True}
    with pytest.raises(RuntimeError, match="closed"):
        engine.client()


@pytest.mark.parametrize("kwargs, words", [
    (dict(kv_tokens=0), "kv_tokens=0 is invalid"),
    (dict(kv_tokens=-5), "kv_tokens=-5 is invalid"),
    (dict(dtype="fp8"), "dtype='fp8' is not supported"),
    (dict(max_running=0), "max_running=0 is invalid"),
    (dict(seed=-1), "seed=-1 is invalid"),
    (dict(kv_memory_fraction=1.5), "kv_memory_fraction=1.5 is invalid"),
])
def test_engine_settings_are_checked_before_the_model_loads(tmp_path, kwargs, words):
    # The model path does not exist: a FileNotFoundError would mean the load came first.
    with pytest.raises(ValueError, match=words):
        Engine(str(tmp_path / "nowhere"), device="cpu", progress=False, **kwargs)


def test_an_unseeded_engine_leaves_the_global_rng_alone(tiny_model):
    folder, _ = tiny_model("llama")
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    with Engine(str(folder), device="cpu", progress=False, kv_tokens=64, seed=None) as engine:
        engine.generate(prompt_token_ids=[[5, 6]], sampling=SamplingParams(max_tokens=3, temperature=1.0))
    assert torch.equal(torch.random.get_rng_state(), before)
