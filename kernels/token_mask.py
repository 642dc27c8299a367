"""Structured output's token mask on the logits: disallowed tokens of constrained rows become -inf.

The mask comes from xgrammar as a bitmask, one bit per token of the tokenizer's vocabulary (bit set:
allowed), one row per logits row. The logits can be wider than the tokenizer (a model's padded
vocabulary: the 1B benchmark shape pads a 49k tokenizer to 128k); those ids are never allowed in a
constrained row, and the grammar never sees them, so its matchers work at the tokenizer's width
(xgrammar's mask costs grow with every id it must treat as special). A row flag says which rows
are constrained: the others are not touched, whatever their bits.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # logits per program: 128 bitmask words


@triton.jit
def _token_mask_kernel(logits_ptr, bitmask_ptr, flags_ptr, logits_stride, bitmask_stride, width, grammar_vocab,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(flags_ptr + row) == 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_grammar = offs < grammar_vocab
    # Lanes of one word read the same address: one transaction per 32 logits.
    words = tl.load(bitmask_ptr + row * bitmask_stride + offs // 32, mask=in_grammar, other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * logits_stride + offs, float("-inf"), mask=(offs < width) & ~allowed)


def _check(logits, bitmask, flags, grammar_vocab):
    rows, width = logits.shape
    if bitmask.dtype != torch.int32 or bitmask.shape[0] != rows or bitmask.shape[1] * 32 < grammar_vocab:
        raise ValueError(f"bitmask must be int32 [{rows}, >= {-(-grammar_vocab // 32)}] for {rows} rows and a "
                         f"{grammar_vocab}-token grammar vocabulary, got {bitmask.dtype} {tuple(bitmask.shape)}")
    if flags.shape != (rows,):
        raise ValueError(f"flags must be [{rows}] (one per logits row), got {tuple(flags.shape)}")
    if grammar_vocab > width:
        raise ValueError(f"the grammar's vocabulary ({grammar_vocab}) is wider than the logits ({width})")


def apply_token_mask(logits, bitmask, flags, grammar_vocab):
    """In place on logits [B, V]: for each row whose flag is nonzero, -inf at every id < grammar_vocab
    whose bit in bitmask [B, ceil(grammar_vocab / 32)] (int32) is clear and at every id >= grammar_vocab.
    Rows whose flag is 0 are left as they are. Returns logits."""
    _check(logits, bitmask, flags, grammar_vocab)
    rows, width = logits.shape
    if rows and width:
        _token_mask_kernel[(rows, triton.cdiv(width, _BLOCK))](
            logits, bitmask, flags, logits.stride(0), bitmask.stride(0), width, grammar_vocab, BLOCK=_BLOCK)
    return logits


def apply_token_mask_torch(logits, bitmask, flags, grammar_vocab):
    """Torch path of apply_token_mask: same signature and semantics."""
    _check(logits, bitmask, flags, grammar_vocab)
    constrained = flags.nonzero().flatten()
    if constrained.numel():
        ids = torch.arange(grammar_vocab, device=logits.device)
        bits = (bitmask[constrained][:, ids // 32] >> (ids % 32)) & 1
        allowed = torch.zeros((constrained.numel(), logits.shape[1]), dtype=torch.bool, device=logits.device)
        allowed[:, :grammar_vocab] = bits.bool()
        logits[constrained] = logits[constrained].masked_fill(~allowed, float("-inf"))
    return logits
