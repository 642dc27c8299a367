"""The engine's outputs equal Hugging Face transformers' on the same weights (float64, CPU)."""

import random

import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from lightllm_nb.scheduling.request import Request
from tiny_models import hf_greedy

MODELS = ["llama", "qwen2", "qwen3"]


def random_prompts(seed, count, low=3, high=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(low, high))] for _ in range(count)]


def tiny_engine(folder, **kwargs):
    return Engine(str(folder), device="cpu", dtype="float64", progress=False, **kwargs)


def prefill_logits(engine, prompt):
    """The logits after every prompt token, from one forward pass outside the scheduler."""
    req = Request("probe", prompt, SamplingParams())
    req.row = engine.pool.alloc_row()
    req.pages = engine.pool.alloc_pages(engine.pool.pages_for(len(prompt)), owner=req.row)
    batch, _, _ = engine.runner.prepare([(req, len(prompt))])
    batch.logits_index = torch.arange(len(prompt))
    logits = engine.model.forward(batch, engine.pool.buffers)
    engine.pool.free_pages(req.pages)
    engine.pool.free_row(req.row)
    return logits


@pytest.mark.parametrize("kind", MODELS + ["mistral"])
def test_prefill_logits_match_hf(tiny_model, kind):
    folder, hf = tiny_model(kind)
    prompt = random_prompts(seed=1, count=1, low=30, high=30)[0]
    with tiny_engine(folder) as engine:
        ours = prefill_logits(engine, prompt)
        assert engine.pool.is_whole()
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("setting", [
    dict(),                                                     # roomy: plain continuous batching
    dict(page_size=16),                                         # paged allocation
    dict(max_batch_tokens=16, max_running=8),                   # prompts prefilled in chunks
    dict(kv_tokens=96, scheduler="aggressive", max_running=8),  # so tight that requests are preempted
    dict(kv_tokens=96, scheduler="aggressive", max_running=8, overlap=True),  # the same, steps overlapped
])
def test_batched_greedy_equals_hf_one_by_one(tiny_model, kind, setting):
    folder, hf = tiny_model(kind)
    prompts = random_prompts(seed=MODELS.index(kind), count=6)
    max_new = 12
    expected = [hf_greedy(hf, p, max_new) for p in prompts]
    with tiny_engine(folder, **setting) as engine:
        events = []
        engine.subscribe(events.append)
        results = engine.generate(prompt_token_ids=prompts,
                                  sampling=SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True))
        assert [r.token_ids for r in results] == expected
        assert all(r.finish_reason == "length" for r in results)
        engine.clear_prefix_cache()
        assert engine.pool.is_whole()
        kinds = {d.kind for e in events for d in e.decisions}
        if setting.get("kv_tokens"):
            assert "preempt" in kinds, "the tight budget was meant to force preemption"
        if setting.get("max_batch_tokens"):
            assert max(e.prefill_tokens + e.decode_tokens for e in events) <= 16
            # a prompt continued from an earlier chunk: its context already held computed tokens
            assert any(r.phase == "prefill" and r.context > r.tokens for e in events for r in e.rows)


@pytest.mark.parametrize("kind", MODELS)
def test_float32_engine_with_packed_projections_matches_hf(tiny_model, kind):
    """The CPU's float32 path (projections packed for oneDNN) against HF in float64: float32's error only."""
    folder, hf = tiny_model(kind)
    prompt = random_prompts(seed=2, count=1, low=30, high=30)[0]
    with Engine(str(folder), device="cpu", dtype="float32", progress=False) as engine:
        assert engine.model.layers[0].qkv.is_mkldnn and engine.model.lm_head.is_mkldnn
        ours = prefill_logits(engine, prompt)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
