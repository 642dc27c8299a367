"""Decode attention over the token-slot KV cache: one new query token per request.

Flash-decoding: each request's context is cut into ``num_splits`` chunks so that a small batch
still spreads over every SM. One program runs per (request, kv head, split); it takes all q heads
of the GQA group at once, so each K/V row gathered from the cache is read once per group. With
one split the program writes its output straight into ``out``. With several, each writes a
normalized partial output and its log-sum-exp to a float32 workspace and counts itself done on
a per-(request, kv head) counter; the last to finish merges the splits in split order (the same
sum whichever program comes last) and sets the counter back to zero. So a step runs one kernel
per layer for attention, not two. Chunk boundaries come from each request's own kv_len on the
device, so the grid depends only on (batch, kv heads, num_splits) and the launch can be captured
in a CUDA graph and replayed with other lengths.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dependent_launch import dependent_launch
from .dot_precision import dot_precision
from .online_softmax import attend_kv_blocks, attention_output, check_attention_inputs, fresh_softmax_state

_BLOCK_N = 64
# A split shorter than this spends more on launch and merge than it saves.
_MIN_SPLIT_LEN = 256
_MAX_SPLITS = 64
# Programs wanted per SM: two keep the SMs busy while some programs wait on memory.
_PROGRAMS_PER_SM = 2
# SM count assumed off-GPU (the interpreter); H100 SXM has 132.
_NOMINAL_SMS = 132
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, req_to_token_ptr, req_rows_ptr, kv_lens_ptr,
    part_out_ptr, part_lse_ptr, counters_ptr, out_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_req, stride_ob, stride_oh,
    scale_log2, num_q_heads, group, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # q, the new token's K/V and the step's lengths come from earlier kernels
        gdc_launch_dependents()
        gdc_wait()
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(kv_lens_ptr + batch).to(tl.int32)
    row = tl.load(req_rows_ptr + batch).to(tl.int64)
    # Chunks are whole KV blocks, so only the last block of a context runs partly empty.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    mask_gd = mask_g[:, None] & mask_d[None, :]
    heads = kv_head * group + offs_g
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_gd, other=0.0)

    acc, l_i, m_i = fresh_softmax_state(BLOCK_G, BLOCK_D)
    acc, l_i, m_i = attend_kv_blocks(
        q, offs_g, start, end, row, req_to_token_ptr, stride_req, k_cache_ptr, v_cache_ptr,
        stride_ks, stride_vs, kv_head * stride_kh, kv_head * stride_vh, offs_d, mask_d, scale_log2,
        acc, l_i, m_i, BLOCK_N=BLOCK_N, CAUSAL=False, DOT_PRECISION=DOT_PRECISION)

    # A split past the end of its request's context stays empty: lse -inf, output 0.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_rows = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if SINGLE_SPLIT:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        parts = (batch * num_q_heads + heads) * num_splits  # this group's split 0
        tl.store(part_out_ptr + (parts + split)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_gd)
        tl.store(part_lse_ptr + parts + split, lse, mask=mask_g)
        # Every thread's partial is stored before the count says so; the atomic releases them to
        # the program that merges and acquires the others' for it.
        tl.debug_barrier()
        counter = counters_ptr + batch * tl.num_programs(1) + kv_head
        finished_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if finished_before == num_splits - 1:
            tl.store(counter, 0)  # ready for the next launch (a CUDA graph replays this one)
            _merge_splits(part_out_ptr, part_lse_ptr, parts, out_rows, num_splits, offs_d, mask_g, mask_gd,
                          HEAD_DIM, BLOCK_G, BLOCK_D, BLOCK_S)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, parts, out_rows, num_splits, offs_d, mask_g, mask_gd,
                  HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Weight each split's output by its share of the softmax denominator, in split order."""
    offs_s = tl.arange(0, BLOCK_S)
    # .cg: read the other programs' partials from L2, where their stores landed, not from this SM's L1.
    lse_all = tl.load(part_lse_ptr + parts[:, None] + offs_s[None, :],
                      mask=mask_g[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                      cache_modifier=".cg")
    m = tl.max(lse_all, axis=1)
    # kv_len == 0 (a padded batch row) leaves every split empty: output zeros, not NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_all - m[:, None]), axis=1)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(part_lse_ptr + parts + s, mask=mask_g, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + (parts + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_gd,
                       other=0.0, cache_modifier=".cg")
        acc += tl.exp2(lse - m)[:, None] * part
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=mask_gd)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    # Asked once per device: the eager launcher runs every layer of every mixed step.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def decode_num_splits(batch, num_kv_heads, max_kv_len, device):
    """How many context chunks to give each (request, kv head) so ~2 programs land on every SM."""
    if device.type == "cuda":
        sms = _multiprocessors(_device_index(device))
    else:
        sms = _NOMINAL_SMS
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, max(batch * num_kv_heads, 1))
    useful = triton.cdiv(max(max_kv_len, 1), _MIN_SPLIT_LEN)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def decode_workspace_numel(batch, num_q_heads, head_dim, num_splits):
    """float32 elements decode_attention needs in its workspace (partial outputs, then their lse)."""
    return batch * num_q_heads * num_splits * (head_dim + 1)


def decode_attention(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                     max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None, pdl=False):
    """Attention of one query token per request over its cached context.

    q [B, Hq, D] (rows and heads may be strided), k_cache/v_cache [S, Hkv, D], req_to_token
    [R, max_ctx] int32, req_rows [B], kv_lens [B] (context including the current token, whose
    K/V is already written; 0 gives a zero output). Returns [B, Hq, D] in q.dtype: `out` when
    given (any [B, Hq, D] view with a contiguous last dim, e.g. the decode rows of a step's
    attention output), else a new tensor.

    No host sync when max_kv_len or num_splits is given (CUDA-graph safe). workspace: optional
    flat float32 tensor of at least decode_workspace_numel(...) elements. split_counters:
    optional int32 tensor of at least B * Hkv zeros, which the kernel leaves zero again, so one
    zeroed tensor serves every layer of a step; needed only with more than one split. On GPU,
    float32 inputs multiply in full float32 (IEEE), so a float32 engine can be checked against a
    reference. pdl: programmatic dependent launch where the card has it (kernels/dependent_launch.py).
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    check_attention_inputs(q, k_cache, v_cache, req_to_token)
    out = attention_output(q, out)
    if batch == 0:
        return out
    if num_splits is None:
        if max_kv_len is None:
            max_kv_len = int(kv_lens.max())  # host sync: eager use only
        num_splits = decode_num_splits(batch, num_kv_heads, max_kv_len, q.device)
    if num_splits == 1:  # the kernel writes its output directly: no partials, no counters
        part_out = part_lse = split_counters = out
    else:
        parts = batch * num_q_heads * num_splits
        need = decode_workspace_numel(batch, num_q_heads, head_dim, num_splits)
        workspace = _scratch(workspace, "workspace", torch.float32, need, q.device, "elements")
        part_out, part_lse = workspace[: parts * head_dim], workspace[parts * head_dim: need]
        split_counters = _scratch(split_counters, "split_counters", torch.int32, batch * num_kv_heads, q.device,
                                  "zeros (batch x kv heads)")

    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    # Launched early, a grid of more programs than SMs is placed around the kernel still running
    # (the rotary write) and ran 4% slower at batch 32 / context 2048 on an H200; one wave gains.
    pdl = dependent_launch(pdl, q) and batch * num_kv_heads * num_splits <= _multiprocessors(_device_index(q.device))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, req_to_token, req_rows, kv_lens, part_out, part_lse, split_counters, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        scale * _LOG2E, num_q_heads, group, num_splits,
        HEAD_DIM=head_dim,
        # tl.dot needs at least 16 rows; the unused rows of a small GQA group cost little
        # because decode is bound by the K/V reads, not by the tensor cores.
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=_BLOCK_N, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        SINGLE_SPLIT=num_splits == 1, DOT_PRECISION=dot_precision(q.dtype), PDL=pdl, launch_pdl=pdl,
    )
    return out


def _scratch(given, name, dtype, need, device, what):
    """The caller's scratch tensor, checked, or a new one (counters must start at zero)."""
    if given is None:
        return (torch.zeros if dtype == torch.int32 else torch.empty)(need, dtype=dtype, device=device)
    if given.dtype != dtype or given.numel() < need or not given.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of at least {need} {what}, "
                         f"got {given.dtype} with {given.numel()}")
    return given.view(-1)


def decode_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                           max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None):
    """Torch path of decode_attention: same signature and result (tuning arguments are ignored).

    All requests at once, padded to the longest context and masked: on the CPU one batched
    product beats a Python loop of small ones (it was a quarter of a demo-model decode step)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    # float32 at least; a float64 model (the exactness tests against HF) keeps float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    lengths = kv_lens.long()
    longest = int(max_kv_len) if max_kv_len is not None else int(lengths.max()) if batch else 0
    out = attention_output(q, out)
    if batch == 0 or longest == 0:
        return out.zero_()
    slots = req_to_token[req_rows.long(), :longest].long()                        # [B, L]
    valid = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]   # [B, L]
    slots = torch.where(valid, slots, 0)  # padding reads slot 0, then is masked out
    k = k_cache[slots].to(compute)                                                # [B, L, Hkv, D]
    v = v_cache[slots].to(compute)
    qb = q.to(compute).reshape(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qb, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty context gives zeros, not NaN
    return out.copy_(torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(batch, num_q_heads, head_dim))
