"""What both attention kernels share: flash-attention's online softmax over KV blocks gathered
through a request's row of req_to_token (a @triton.jit helper, inlined into each kernel), and
the checks their launchers make on the inputs and on the output they write into."""

import torch
import triton
import triton.language as tl


@triton.jit
def fresh_softmax_state(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, l_i, m_i) before any key: the state attend_kv_blocks and attend_visible_blocks carry."""
    return (tl.zeros([ROWS, BLOCK_D], tl.float32), tl.zeros([ROWS], tl.float32),
            tl.full([ROWS], float("-inf"), tl.float32))


@triton.jit
def _online_softmax_step(q, k, v, visible, acc, l_i, m_i, scale_log2, MASKED: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One KV block into the running state; MASKED: keys where `visible` is false are left out."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))
    # Every row sees at least one key of every block it reaches, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, l_i, m_new


@triton.jit
def attend_kv_blocks(q, positions, start, end, row, req_to_token_ptr, stride_req,
                     k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, k_head_offset, v_head_offset,
                     offs_d, mask_d, scale_log2, acc, l_i, m_i,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The state (acc: unnormalized output, l_i: softmax denominator, m_i: running max) of `q`
    [ROWS, BLOCK_D] carried over keys [start, end), which may end inside a block. CAUSAL: query row
    i sees keys up to positions[i] only. Scores are in log2 units."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # Slot indices times strides can pass 2**31 elements on a large card: 64-bit offsets.
        slots = tl.load(req_to_token_ptr + row * stride_req + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] * stride_ks + k_head_offset + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slots[:, None] * stride_vs + v_head_offset + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if CAUSAL:
            visible = (offs_n[None, :] <= positions[:, None]) & mask_n[None, :]
        else:
            visible = mask_n[None, :]
        acc, l_i, m_i = _online_softmax_step(q, k, v, visible, acc, l_i, m_i, scale_log2, True, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def attend_visible_blocks(q, start, end, row, req_to_token_ptr, stride_req,
                          k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, k_head_offset, v_head_offset,
                          offs_d, mask_d, scale_log2, acc, l_i, m_i,
                          BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """attend_kv_blocks over whole blocks [start, end) whose every key every row sees: no bounds or
    causal mask at all (the bulk of a causal prefill, below its diagonal blocks: 15-45% of its
    time at 512-8192 tokens on an H200 went to masks that removed nothing). EVEN_D: the head
    dimension fills BLOCK_D, so loads need no mask either."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slots = tl.load(req_to_token_ptr + row * stride_req + offs_n).to(tl.int64)
        k_ptrs = k_cache_ptr + slots[:, None] * stride_ks + k_head_offset + offs_d[None, :]
        v_ptrs = v_cache_ptr + slots[:, None] * stride_vs + v_head_offset + offs_d[None, :]
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        acc, l_i, m_i = _online_softmax_step(q, k, v, None, acc, l_i, m_i, scale_log2, False, DOT_PRECISION)
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
