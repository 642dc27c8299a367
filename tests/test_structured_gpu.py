"""Structured output on CUDA: the Llama-3.2-1B shape (random weights, the demo tokenizer, so ids past
the tokenizer's 49152 are padding the mask must close), overlapped steps on. Run through the device
tool: `LIGHTLLM_NB_TEST_TOKENIZER=.tok python -m pytest -m gpu tests/test_structured_gpu.py`."""

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from lightllm_nb import Engine, SamplingParams
from structured_schemas import SCHEMAS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DATE = r"20\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"


@pytest.fixture(scope="module")
def engine(demo_tokenizer):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from roofline import SHAPES
    from engine_timing import random_checkpoint

    ckpt, _ = random_checkpoint(dict(SHAPES["llama-1b"], _shape="llama-1b"), demo_tokenizer)
    # float32: the unconstrained rows are compared token by token between two batch shapes.
    with Engine(ckpt, dtype="float32", overlap=True, max_running=128, progress=False) as engine:
        yield engine


def test_every_output_fits_its_constraint_with_overlap_on(engine, demo_tokenizer):
    params = [SamplingParams(json_schema=schema, temperature=0.8, seed=seed, max_tokens=160)
              for schema in SCHEMAS.values() for seed in range(20)]
    params += [SamplingParams(regex=DATE, temperature=0.8, seed=seed, max_tokens=16) for seed in range(8)]
    done = engine.generate(["Answer:"] * len(params), params)
    for completion, p in zip(done, params):
        assert completion.finish_reason == "stop", completion
        assert all(t < len(demo_tokenizer) or t in engine.eos_token_ids for t in completion.token_ids)
        if p.json_schema is not None:
            jsonschema.validate(json.loads(completion.text), p.json_schema)
        else:
            assert re.fullmatch(DATE, completion.text), completion.text


def test_unconstrained_rows_keep_their_tokens_and_overlap(engine):
    plain = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True)] * 2
    constrained = [SamplingParams(json_schema=schema, temperature=0.8, seed=1, max_tokens=160)
                   for schema in SCHEMAS.values()]
    prompts = ["The capital of France is", "Once upon a time", "def main():", "1, 2, 3,"]
    alone = engine.generate(prompts, plain)
    mixed = engine.generate(prompts + ["JSON:"] * 3, plain + constrained)
    assert [c.token_ids for c in mixed[:4]] == [c.token_ids for c in alone]
    for completion, schema in zip(mixed[4:], SCHEMAS.values()):
        jsonschema.validate(json.loads(completion.text), schema)


def test_the_reused_bitmask_reaches_the_mask_kernel_intact():
    """Each step's bitmask is refilled in the same pinned buffer and copied into the same device
    buffer while the compute stream is still busy with earlier steps: every step's mask kernel must
    see its own step's bits and flags, never a later step's (in the host buffer or the device one). The grammar covers 49,152 ids of 128,256 logits (the 1B benchmark shape's padding)."""
    from lightllm_nb.engine.grammar import TokenMask
    from lightllm_nb.engine.mask_fill import BitmaskBuffer
    from lightllm_nb.kernels import apply_token_mask_torch

    steps, batch, vocab, grammar_vocab = 4, 128, 128256, 49152
    buffer = BitmaskBuffer(words=-(-grammar_vocab // 32), pinned=True)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(steps, batch, vocab, generator=gen)
    on_gpu = logits.cuda()
    expected = logits.clone()
    torch.cuda.synchronize()
    for step in range(steps):
        rows = torch.randperm(batch, generator=gen)[:batch // 2 + step].tolist()
        mask = TokenMask(buffer, rows, batch, grammar_vocab)
        mask.bitmask.copy_(torch.randint(-2**31, 2**31, mask.bitmask.shape, generator=gen,
                                         dtype=torch.int64).to(torch.int32))
        apply_token_mask_torch(expected[step], mask.bitmask.clone(), mask.flags.clone(), grammar_vocab)
        torch.cuda._sleep(20_000_000)  # a long "forward" on the compute stream
        mask.apply(on_gpu[step])
    assert torch.equal(on_gpu.cpu(), expected)
