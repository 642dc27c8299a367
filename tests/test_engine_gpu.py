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


def test_long_contexts_match_hf_logprobs(tmp_path, demo_tokenizer):
    """Decode at contexts of 2.5k-6k tokens (CUDA graphs, split-K decode attention) against HF in
    float64, logprob by logprob: attention that skipped part of the context would move them by
    far more than the tolerance (checked below by changing the prompt's first half)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                                      rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    demo_tokenizer.save_pretrained(tmp_path)
    hf = hf.to("cuda", torch.float64).eval()
    rng = random.Random(11)
    lengths = [2500, 4100, 6000, 40]
    batch = [[rng.randrange(3, 4096) for _ in range(n)] for n in lengths]
    new = 6
    with Engine(str(tmp_path), device="cuda", dtype="float32", max_running=8, progress=False) as engine:
        got = engine.generate(prompt_token_ids=batch, sampling=SamplingParams(
            max_tokens=new, temperature=0, ignore_eos=True, logprobs=0))

    def hf_logprobs(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids], device="cuda")).logits[0]
        return torch.log_softmax(logits, -1)

    for prompt, completion in zip(batch, got):
        full = prompt + completion.token_ids
        logprobs = hf_logprobs(full)[len(prompt) - 1:-1]  # the distributions the new tokens came from
        ours = torch.tensor([entry["logprob"] for entry in completion.logprobs], dtype=torch.float64)
        theirs = logprobs[torch.arange(new), torch.tensor(completion.token_ids)].cpu()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)
        # Greedy: each token is HF's choice, or ties with it within float32 rounding.
        assert (logprobs.max(-1).values.cpu() - theirs).max() < 2e-3
        if len(prompt) > 1000:
            # The test can see skipped context: another first half moves these logprobs by far more.
            other = [rng.randrange(3, 4096) for _ in range(len(prompt) // 2)] + full[len(prompt) // 2:]
            moved = hf_logprobs(other)[len(prompt) - 1:-1]
            moved = moved[torch.arange(new), torch.tensor(completion.token_ids)].cpu()
            assert (moved - theirs).abs().max() > 0.05
