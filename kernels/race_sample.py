"""Sampling in one pass over the logits: temperature, the structured-output mask and the draw fused.

A row with logits x and temperature T draws token argmax_i(x_i / T + g_i), with g_i i.i.d.
Gumbel(0, 1): token i with probability softmax(x / T)_i (the Gumbel-max trick; g = -log E with
E ~ Exp(1) makes it the exponential race argmax p_i / E_i the sampler's torch path runs). No
softmax, no normalizing sum, no noise tensor in memory: the logits are read once, where the torch
path ran seven full-width ops (~0.3 ms of the H200 at 128 rows of a 128k vocabulary). A row of
temperature 0 takes the argmax; ties go to the lowest id, as torch.argmax's do. (A NaN logit never
wins here, where torch.argmax would take it: a model whose logits hold NaNs is broken either way.)

The noise is counter-based, Philox4x32-10 (Triton's tl.philox): a row's 64-bit key and its draw
number (its low 32 bits) pick the stream, the column picks the place in it. So a seeded request's
draws depend only on its seed and on how many draws it made, never on its batch or its row; the kernel counts the
draw (draws[row] += 1), so a batch that keeps its rows uploads nothing between steps. One Philox
call gives four numbers: a block of BLOCK columns is four quarters, and quarter q takes word q of
the calls for counters block * QUARTER + (0 .. QUARTER-1). A word's top 23 bits make the uniform
number (k + 1/2) / 2**23, never 0 or 1, so every Gumbel value is finite.

One launch of rows x splits programs, each keeping its columns' best (score, id); the last of a
row's programs to finish (an atomic counter, set back to zero by it) picks the best of its splits
(the lowest split on a tie: the lowest id) and counts the draw. Splits give small batches enough
programs to read at the card's bandwidth; a launch costs the host more than the GPU here, hence one.

With a mask (flags [B], bitmask [B, words], as kernels/token_mask.py takes them), a flagged row
draws only among ids < grammar_vocab whose bit is set.
"""

import functools

import torch
import triton
import triton.language as tl

BLOCK = 1024
QUARTER = BLOCK // 4
PHILOX_ROUNDS = 10
# Splits are chosen so that rows x splits puts about this many programs on each SM: a program
# streams its columns one block at a time, so the card's bandwidth needs many of them in flight.
PROGRAMS_PER_SM = 8


@triton.jit
def _gumbel(words):
    uniform = ((words >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(uniform))


@triton.jit
def _quarter_best(logits_ptr, row_offset, cols, width, inv_temp, noise, bitmask_ptr, bitmask_row, grammar_vocab,
                  constrained, best, best_id, MASKED: tl.constexpr):
    """Each lane's (best, best_id) after the columns `cols` (each lane's column after all it saw)."""
    x = tl.load(logits_ptr + row_offset + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
    score = x * inv_temp + noise
    if MASKED:
        if constrained:
            in_grammar = cols < grammar_vocab
            words = tl.load(bitmask_ptr + bitmask_row + cols // 32, mask=in_grammar, other=0)
            allowed = in_grammar & (((words >> (cols % 32)) & 1) != 0)
            score = tl.where(allowed, score, float("-inf"))
    better = score > best  # strictly: on a tie the lane's earlier column keeps it
    return tl.where(better, score, best), tl.where(better, cols, best_id)


# Ints that change with the batch or the model are not specialized on (Triton compiles a variant per
# int equal to 1 or divisible by 16): a notebook would otherwise pay a compile for many new batch
# sizes. Pointers are: callers keep them 16-byte aligned (the sampler's uploads are padded).
@triton.jit(do_not_specialize=["logits_stride", "bitmask_stride", "width", "grammar_vocab", "num_blocks",
                               "blocks_per_split", "num_splits"])
def _race_kernel(logits_ptr, temperatures_ptr, keys_ptr, draws_ptr, bitmask_ptr, flags_ptr,
                 best_ptr, best_id_ptr, counters_ptr, tokens_ptr, logits_stride, bitmask_stride, width, grammar_vocab,
                 num_blocks, blocks_per_split, num_splits,
                 BLOCK: tl.constexpr, QUARTER: tl.constexpr, ROUNDS: tl.constexpr, MASKED: tl.constexpr,
                 SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    sampled = temperature > 0
    inv_temp = 1.0 / tl.where(sampled, temperature, 1.0)
    key = tl.load(keys_ptr + row)
    draw = tl.load(draws_ptr + row).to(tl.uint32)
    constrained = False
    if MASKED:
        constrained = tl.load(flags_ptr + row) != 0
    row_offset = row * logits_stride
    bitmask_row = row * bitmask_stride
    i = tl.arange(0, QUARTER)
    zero = tl.zeros([QUARTER], dtype=tl.uint32)
    # Lanes keep their own best through the loop (no reduction across the program per block: those
    # barriers made the kernel latency-bound); one reduction at the end.
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_id = tl.zeros([QUARTER], dtype=tl.int32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        counters = (block * QUARTER + i).to(tl.uint32)
        if sampled:
            w0, w1, w2, w3 = tl.philox(key, counters, zero + draw, zero, zero, ROUNDS)
            n0, n1, n2, n3 = _gumbel(w0), _gumbel(w1), _gumbel(w2), _gumbel(w3)
        else:
            n0 = tl.zeros([QUARTER], dtype=tl.float32)
            n1, n2, n3 = n0, n0, n0
        base = block * BLOCK + i
        best, best_id = _quarter_best(logits_ptr, row_offset, base, width, inv_temp, n0, bitmask_ptr, bitmask_row,
                                      grammar_vocab, constrained, best, best_id, MASKED)
        best, best_id = _quarter_best(logits_ptr, row_offset, base + QUARTER, width, inv_temp, n1, bitmask_ptr,
                                      bitmask_row, grammar_vocab, constrained, best, best_id, MASKED)
        best, best_id = _quarter_best(logits_ptr, row_offset, base + 2 * QUARTER, width, inv_temp, n2, bitmask_ptr,
                                      bitmask_row, grammar_vocab, constrained, best, best_id, MASKED)
        best, best_id = _quarter_best(logits_ptr, row_offset, base + 3 * QUARTER, width, inv_temp, n3, bitmask_ptr,
                                      bitmask_row, grammar_vocab, constrained, best, best_id, MASKED)
    top = tl.max(best, 0)
    # The lowest id among ties (a lane that never saw a finite score keeps id 0: a row with no
    # finite score at all, a mask allowing nothing, takes 0, as torch.argmax does).
    best_id = tl.min(tl.where(best == top, best_id, 2147483647), 0)
    best = top
    if SPLITS == 1:  # a vocabulary of one block
        tl.store(tokens_ptr + row, best_id.to(tl.int64))
        tl.store(draws_ptr + row, tl.load(draws_ptr + row) + 1)
    else:
        tl.store(best_ptr + row * num_splits + split, best)
        tl.store(best_id_ptr + row * num_splits + split, best_id)
        # Every thread's stores are issued before the count says so; the atomic releases them to
        # the program that picks and acquires the others' for it.
        tl.debug_barrier()
        finished_before = tl.atomic_add(counters_ptr + row, 1, sem="acq_rel", scope="gpu")
        if finished_before == num_splits - 1:
            tl.store(counters_ptr + row, 0)  # ready for the next launch
            s = tl.arange(0, SPLITS)
            bests = tl.load(best_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
            ids = tl.load(best_id_ptr + row * num_splits + s, mask=s < num_splits, other=2147483647)
            top = tl.max(bests, 0)
            # Splits hold ascending columns, each its lowest id among ties: the lowest such id overall.
            # A row with no finite score at all (a mask allowing nothing) takes split 0's id, 0.
            token = tl.min(tl.where(bests == top, ids, 2147483647), 0)
            tl.store(tokens_ptr + row, token.to(tl.int64))
            tl.store(draws_ptr + row, tl.load(draws_ptr + row) + 1)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_splits(width: int, device: torch.device) -> int:
    """The most programs a row gets (a batch of one): one a block, about PROGRAMS_PER_SM a multiprocessor."""
    sms = _multiprocessors(device) if device.type == "cuda" else 4
    return min(triton.cdiv(width, BLOCK), PROGRAMS_PER_SM * sms)


def num_splits(rows: int, width: int, device: torch.device) -> int:
    """Programs per row: enough that the batch puts about PROGRAMS_PER_SM on each multiprocessor, at
    most one a block. (Dividing the most a row gets, which the blocks cap, by the rows gave batches
    from 127 rows one program a row, under one a multiprocessor: 209 us at 128 rows of a 128k
    vocabulary on the H200, a tenth of the step.)"""
    sms = _multiprocessors(device) if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(width, BLOCK), triton.cdiv(PROGRAMS_PER_SM * sms, max(rows, 1))))


def _check(logits, temperatures, keys, draws, bitmask, flags, grammar_vocab):
    rows, width = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have a contiguous last dim, got strides {logits.stride()}")
    for name, tensor, dtype in (("temperatures", temperatures, torch.float32), ("keys", keys, torch.int64),
                                ("draws", draws, torch.int64)):
        if tensor.shape != (rows,) or tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} [{rows}] (one per logits row), got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if (bitmask is None) != (flags is None):
        raise ValueError("bitmask and flags go together: pass both for a masked batch, neither otherwise")
    if bitmask is not None:
        if bitmask.dtype != torch.int32 or bitmask.shape[0] != rows or bitmask.shape[1] * 32 < grammar_vocab:
            raise ValueError(f"bitmask must be int32 [{rows}, >= {-(-grammar_vocab // 32)}], got "
                             f"{bitmask.dtype} {tuple(bitmask.shape)}")
        if flags.shape != (rows,):
            raise ValueError(f"flags must be [{rows}] (one per logits row), got {tuple(flags.shape)}")
        if not 0 < grammar_vocab <= width:
            raise ValueError(f"grammar_vocab={grammar_vocab} must be in [1, {width}] (the logits' width)")


def race_sample(logits, temperatures, keys, draws, bitmask=None, flags=None, grammar_vocab=0, split_counters=None):
    """One token id per row of logits [B, V] (any float dtype), int64 [B] on logits' device.

    temperatures float32 [B] (0: the argmax), keys int64 [B] (a row's noise stream), draws int64
    [B] (its draw number; each row's is incremented in place). With bitmask int32 [B, words] and
    flags [B], a row whose flag is nonzero draws only among ids < grammar_vocab whose bit is set.
    split_counters: int32 zeros, at least B of them, which the launch leaves at zero (a caller that
    keeps them saves a fill each launch); new ones if None."""
    _check(logits, temperatures, keys, draws, bitmask, flags, grammar_vocab)
    rows, width = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return tokens
    splits = num_splits(rows, width, logits.device)
    # The merge's width is the widest any batch gets, so one compiled variant serves every batch size.
    most = max_splits(width, logits.device)
    num_blocks = triton.cdiv(width, BLOCK)
    if most == 1:  # the one program of a row writes its token: no partials, no counters
        best = best_id = split_counters = tokens
    else:
        best = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
        best_id = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
        if split_counters is None:
            split_counters = torch.zeros(rows, dtype=torch.int32, device=logits.device)
        elif split_counters.dtype != torch.int32 or split_counters.numel() < rows:
            raise ValueError(f"split_counters must be int32 zeros, at least {rows} of them, got "
                             f"{split_counters.dtype} with {split_counters.numel()}")
    masked = bitmask is not None
    _race_kernel[(rows, splits)](
        logits, temperatures, keys, draws, bitmask if masked else logits, flags if masked else logits,
        best, best_id, split_counters, tokens, logits.stride(0), bitmask.stride(0) if masked else 0, width,
        grammar_vocab, num_blocks, triton.cdiv(num_blocks, splits), splits,
        BLOCK=BLOCK, QUARTER=QUARTER, ROUNDS=PHILOX_ROUNDS, MASKED=masked, SPLITS=triton.next_power_of_2(most))
    return tokens


# ---- the torch twin ----------------------------------------------------------------------------
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant and uint32 values held in int64: in
    16-bit halves, so that no product overflows int64."""
    low, high = b & 0xFFFF, b >> 16
    p_low, p_high = a * low, a * high  # each < 2**48
    middle = p_low + ((p_high & 0xFFFF) << 16)
    return (p_high >> 16) + (middle >> 32), middle & _U32


def philox_torch(c0, c1, c2, c3, k0, k1, rounds=PHILOX_ROUNDS):
    """Philox4x32 (Random123's, as Triton's tl.philox runs it) on uint32 values held in int64 tensors."""
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def race_noise_torch(keys, draws, width):
    """The Gumbel noise race_sample adds to each row's scaled logits: float32 [B, width]."""
    num_blocks = triton.cdiv(width, BLOCK)
    counters = torch.arange(num_blocks * QUARTER, dtype=torch.int64, device=keys.device)[None, :]
    k0, k1 = (keys & _U32)[:, None], ((keys >> 32) & _U32)[:, None]
    zero = torch.zeros_like(counters)
    words = philox_torch(counters, (draws & _U32)[:, None] + zero, zero, zero, k0, k1)
    # Word q of counter block * QUARTER + i is column block * BLOCK + q * QUARTER + i.
    words = torch.stack(words, dim=1).view(len(keys), 4, num_blocks, QUARTER).transpose(1, 2)
    words = words.reshape(len(keys), num_blocks * BLOCK)[:, :width]
    uniform = ((words >> 9).float() + 0.5) * (1.0 / 8388608.0)
    return -torch.log(-torch.log(uniform))


def race_scores_torch(logits, temperatures, keys, draws, bitmask=None, flags=None, grammar_vocab=0):
    """Each row's scores, whose argmax race_sample returns: float32 [B, V] (-inf where masked)."""
    _check(logits, temperatures, keys, draws, bitmask, flags, grammar_vocab)
    sampled = temperatures > 0
    inv_temp = 1.0 / torch.where(sampled, temperatures, torch.ones_like(temperatures))
    noise = race_noise_torch(keys, draws, logits.shape[1]) * sampled[:, None]
    scores = logits.float() * inv_temp[:, None] + noise
    if bitmask is not None:
        ids = torch.arange(logits.shape[1], device=logits.device)
        in_grammar = ids < grammar_vocab
        bits = (bitmask[:, (ids // 32).clamp(max=bitmask.shape[1] - 1)] >> (ids % 32)) & 1
        forbidden = (flags != 0)[:, None] & ~(in_grammar & (bits != 0))
        scores = scores.masked_fill(forbidden, float("-inf"))
    return scores


def race_sample_torch(logits, temperatures, keys, draws, bitmask=None, flags=None, grammar_vocab=0):
    """Torch path of race_sample: same signature and semantics (but a NaN logit wins, as in torch.argmax)."""
    tokens = race_scores_torch(logits, temperatures, keys, draws, bitmask, flags, grammar_vocab).argmax(dim=-1)
    draws += 1
    return tokens
