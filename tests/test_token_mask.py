"""The structured-output mask kernel (kernels/token_mask.py) against its torch twin, and the twin
against xgrammar's own CPU kernel plus the rule for a padded vocabulary's ids. Fresh random inputs.

On a CPU-only machine conftest.py turns on Triton's interpreter; tests/test_structured_gpu.py runs
the kernel on the GPU inside the engine's upload path."""

import pytest
import torch

from lightllm_nb.kernels import apply_token_mask, apply_token_mask_torch


def _random_mask(gen, rows, grammar_vocab):
    words = -(-grammar_vocab // 32)
    bitmask = torch.randint(-2**31, 2**31, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)
    flags = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int32)
    flags[0] = 1  # at least one constrained row
    return bitmask, flags


@pytest.mark.parametrize("grammar_vocab,width", [(70, 70), (70, 96), (64, 4100), (4097, 9000)])
def test_the_twin_is_xgrammars_mask_and_forbids_the_padding(grammar_vocab, width):
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(grammar_vocab + width)
    bitmask, flags = _random_mask(gen, 5, grammar_vocab)
    logits = torch.randn(5, width, generator=gen)
    expected = logits.clone()
    constrained = flags.nonzero().flatten().tolist()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=grammar_vocab, indices=constrained)
    expected[constrained, grammar_vocab:] = float("-inf")
    assert torch.equal(apply_token_mask_torch(logits.clone(), bitmask, flags, grammar_vocab), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grammar_vocab,width", [(70, 70), (70, 96), (33, 4100), (4097, 9000)])
def test_kernel_matches_the_twin(dtype, grammar_vocab, width):
    gen = torch.Generator().manual_seed(7 * grammar_vocab + width)
    bitmask, flags = _random_mask(gen, 6, grammar_vocab)
    logits = torch.randn(6, width, generator=gen).to(dtype)
    expected = apply_token_mask_torch(logits.clone(), bitmask, flags, grammar_vocab)
    out = logits.clone()
    assert apply_token_mask(out, bitmask, flags, grammar_vocab) is out
    assert torch.equal(out, expected)
    untouched = (flags == 0).nonzero().flatten()
    assert torch.equal(out[untouched], logits[untouched])


def test_kernel_reads_strided_views_of_one_region():
    """The engine uploads flags and bitmask as one region and hands the kernel views of it, and its
    logits can be a row slice of a wider tensor."""
    gen = torch.Generator().manual_seed(3)
    rows, grammar_vocab = 4, 100
    bitmask, flags = _random_mask(gen, rows, grammar_vocab)
    region = torch.cat([flags, bitmask.flatten()])
    wide = torch.randn(rows, 160, generator=gen)
    logits = wide[:, :130]
    expected = apply_token_mask_torch(logits.clone(), bitmask, flags, grammar_vocab)
    apply_token_mask(logits, region[rows:].view(rows, -1), region[:rows], grammar_vocab)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("fn", [apply_token_mask, apply_token_mask_torch])
def test_shapes_that_do_not_fit_are_refused(fn):
    logits = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="bitmask must be int32"):
        fn(logits, torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="flags must be"):
        fn(logits, torch.zeros(3, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="wider than the logits"):
        fn(logits, torch.zeros(3, 3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 65)
