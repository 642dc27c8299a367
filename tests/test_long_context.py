"""Engine-level exactness past several attention blocks: prompts and outputs of 300+ tokens equal
Hugging Face's (float64, CPU). Short tests stay inside the first 64-token KV block, where an
attention path that drops or misreads a later block is invisible."""

import random

import pytest

from lightllm_nb import Engine, SamplingParams
from tiny_models import hf_greedy

MAX_NEW = 40


@pytest.mark.parametrize("setting", [
    dict(),                                   # whole prompts in one step, page size 1
    dict(max_batch_tokens=96, page_size=16),  # prompts prefilled in chunks over several blocks, paged
], ids=["whole", "chunked-paged"])
def test_long_prompts_and_outputs_equal_hf(tiny_model, setting):
    folder, hf = tiny_model("llama")   # Llama 3 rope scaling: positions far past its original 64 too
    rng = random.Random(4)
    # Contexts end at 340, 229 and 168 tokens: decodes cross block boundaries (320, 192, 128) mid-output.
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (300, 189, 128)]
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    with Engine(str(folder), device="cpu", dtype="float64", progress=False, kv_tokens=2048, **setting) as engine:
        results = engine.generate(prompt_token_ids=prompts,
                                  sampling=SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
    for got, want in zip(results, expected):
        assert got.token_ids == want
