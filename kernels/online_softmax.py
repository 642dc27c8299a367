"""What both attention kernels share: flash-attention's online softmax over KV blocks gathered
through a request's row of req_to_token (a @triton.jit helper, inlined into each kernel), and
the checks their launchers make on the inputs and on the output they write into."""

import torch
import triton
import triton.language as tl


@triton.jit
def attend_kv_blocks(q, positions, start, end, row, req_to_token_ptr, stride_req,
                     k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, k_head_offset, v_head_offset,
                     offs_d, mask_d, scale_log2,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Unnormalized output, softmax denominator and running max of `q` [ROWS, BLOCK_D] over keys
    [start, end). CAUSAL: query row i sees keys up to positions[i] only. Scores are in log2 units."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # Slot indices times strides can pass 2**31 elements on a large card: 64-bit offsets.
        slots = tl.load(req_to_token_ptr + row * stride_req + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] * stride_ks + k_head_offset + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if CAUSAL:
            visible = (offs_n[None, :] <= positions[:, None]) & mask_n[None, :]
        else:
            visible = mask_n[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        # Every row sees at least one key of every block it reaches, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_cache_ptr + slots[:, None] * stride_vs + v_head_offset + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, l_i, m_i


def check_attention_inputs(q, k_cache, v_cache, req_to_token) -> None:
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, req_to_token)):
        raise ValueError("q, the KV caches and req_to_token need a contiguous last dim")


def attention_output(q, out):
    """`out` checked to fit q's result, or a new tensor: the launchers write straight into a
    caller's slice (the decode or prefill rows of a step's output), so nobody copies it there."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out
