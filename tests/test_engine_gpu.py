"""The engine on CUDA (Triton kernels, CUDA-graph decode) against HF transformers. Run through the
device tool: `python -m pytest -m gpu tests/test_engine_gpu.py`."""

import random

import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from tiny_models import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def prompts(seed, count):
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(3, 60))] for _ in range(count)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_on_gpu_equals_hf(tiny_model, kind, page_size):
    folder, hf = tiny_model(kind)
    batch = prompts(seed=page_size, count=12)
    expected = [hf_greedy(hf, p, 16) for p in batch]
    # float32 on the GPU (the attention kernels multiply in IEEE float32 then), so greedy choices
    # match a float64 reference; the tiny models' logits are wide on purpose.
    with Engine(str(folder), device="cuda", dtype="float32", page_size=page_size, max_running=16,
                progress=False) as engine:
        assert engine.runner.graphs is not None
        got = engine.generate(prompt_token_ids=batch,
                              sampling=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        assert [c.token_ids for c in got] == expected
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()


def test_cuda_graphs_change_nothing(tiny_model):
    folder, _ = tiny_model("llama")
    batch = prompts(seed=3, count=20)
    outs = []
    for graphs in (True, False):
        # float32 (IEEE dots): graphs fix the split count of decode attention, eager chooses it
        # per batch, so the sums differ in order; in bf16 that alone can flip a close argmax.
        with Engine(str(folder), device="cuda", dtype="float32", cuda_graphs=graphs, max_running=32,
                    progress=False) as engine:
            outs.append([c.token_ids for c in engine.generate(
                prompt_token_ids=batch, sampling=SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))])
    assert outs[0] == outs[1]
