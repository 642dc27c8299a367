"""Causal attention for a batch of variable-length prompt chunks over the token-slot KV cache.

The new tokens of all requests are packed into one q [T, Hq, D]; a request may continue a cached
prefix (prefix cache hit or an earlier prefill chunk), so its new token i sits at absolute
position kv_len - q_len + i. Every K/V row, prefix or new, is read through req_to_token, which
lets one kernel serve fresh prompts, chunked prefill and prefix-cache hits alike.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dot_precision import dot_precision
from .online_softmax import (attend_kv_blocks, attend_visible_blocks, attention_output, check_attention_inputs,
                             fresh_softmax_state)

_BLOCK_M = 64
_BLOCK_N = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, req_to_token_ptr, req_rows_ptr, q_starts_ptr, kv_lens_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_req,
    scale_log2, group,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    block_m = tl.program_id(2)
    kv_head = head // group

    q_start = tl.load(q_starts_ptr + req).to(tl.int64)
    q_len = (tl.load(q_starts_ptr + req + 1) - q_start).to(tl.int32)
    kv_len = tl.load(kv_lens_ptr + req).to(tl.int32)
    row = tl.load(req_rows_ptr + req).to(tl.int64)
    prefix = kv_len - q_len

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    tokens = q_start + offs_m
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    positions = prefix + offs_m

    # Keys below the block's first query position, in whole blocks, are seen by every row: no mask.
    # The rest, up to the block's last query (keys past it are masked for every row: stop there),
    # is its diagonal. Blocks past the end of a shorter request (the grid is sized for the
    # longest) do no work.
    active = block_m * BLOCK_M < q_len
    visible_end = tl.where(active, (prefix + block_m * BLOCK_M) // BLOCK_N * BLOCK_N, 0)
    kv_end = tl.where(active, tl.minimum(kv_len, prefix + (block_m + 1) * BLOCK_M), 0)
    acc, l_i, m_i = fresh_softmax_state(BLOCK_M, BLOCK_D)
    acc, l_i, m_i = attend_visible_blocks(
        q, 0, visible_end, row, req_to_token_ptr, stride_req, k_cache_ptr, v_cache_ptr,
        stride_ks, stride_vs, kv_head * stride_kh, kv_head * stride_vh, offs_d, mask_d, scale_log2,
        acc, l_i, m_i, BLOCK_N=BLOCK_N, EVEN_D=BLOCK_D == HEAD_DIM, DOT_PRECISION=DOT_PRECISION)
    acc, l_i, m_i = attend_kv_blocks(
        q, positions, visible_end, kv_end, row, req_to_token_ptr, stride_req, k_cache_ptr, v_cache_ptr,
        stride_ks, stride_vs, kv_head * stride_kh, kv_head * stride_vh, offs_d, mask_d, scale_log2,
        acc, l_i, m_i, BLOCK_N=BLOCK_N, CAUSAL=True, DOT_PRECISION=DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_attention(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale, max_q_len=None,
                      out=None):
    """Causal attention of packed new tokens over each request's full context.

    q [T, Hq, D] (rows and heads may be strided), k_cache/v_cache [S, Hkv, D], req_to_token
    [R, max_ctx] int32, req_rows [B], q_starts [B+1] int32 cumulative token offsets, kv_lens [B]
    context length including the new tokens (whose K/V is already written). Returns [T, Hq, D]
    in q.dtype: `out` when given (any [T, Hq, D] view with a contiguous last dim), else a new
    tensor. No host sync when max_q_len is given or B == 1. On GPU, float32 inputs multiply
    in full float32 (IEEE), so a float32 engine can be checked against a reference.
    """
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    check_attention_inputs(q, k_cache, v_cache, req_to_token)
    out = attention_output(q, out)
    batch = kv_lens.shape[0]
    if tokens == 0 or batch == 0:
        return out
    if max_q_len is None:
        # One request owns every token; otherwise this is a host sync (eager use only).
        max_q_len = tokens if batch == 1 else int((q_starts[1:] - q_starts[:-1]).max())
    block_d = triton.next_power_of_2(head_dim)
    _prefill_kernel[(batch, num_q_heads, triton.cdiv(max_q_len, _BLOCK_M))](
        q, k_cache, v_cache, out, req_to_token, req_rows, q_starts, kv_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        scale * _LOG2E, num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype),
        # Measured on an H200 (.. 2048 tokens, 32 heads): 4 warps and 2 stages beat 8 warps at head
        # dim 128 (172 against 303 us) and 3 stages at every length up to 2048.
        num_warps=4, num_stages=2,
    )
    return out


def prefill_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale,
                            max_q_len=None, out=None):
    """Torch path of prefill_attention: same signature and result (max_q_len is ignored)."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    # float32 at least; a float64 model (the exactness tests against HF) keeps float64.
    compute = torch.promote_types(q.dtype, torch.float32)
    out = attention_output(q, out)
    starts = q_starts.tolist()
    for b, (row, kv_len) in enumerate(zip(req_rows.tolist(), kv_lens.tolist())):
        start, q_len = starts[b], starts[b + 1] - starts[b]
        if q_len == 0:
            continue
        slots = req_to_token[row, :kv_len].long()
        k = k_cache[slots].to(compute).transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[slots].to(compute).transpose(0, 1)
        # Fold the GQA group into the query rows so K/V are used per kv head without repeating them.
        qb = q[start:start + q_len].to(compute).reshape(q_len, num_kv_heads, group, head_dim)
        qb = qb.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        positions = torch.arange(kv_len - q_len, kv_len, device=q.device)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=visible.repeat(group, 1), scale=scale)
        ob = ob.reshape(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[start:start + q_len] = ob.reshape(q_len, num_q_heads, head_dim)
    return out
