"""Decode attention for the CPU path: each request's K/V gathered once per layer, then torch's
fused scaled_dot_product_attention. Same signature and result as decode_attention_torch, the
twin that stays the oracle for the Triton kernel; this one is for speed, checked against it.

The twin materializes scores, mask, softmax and the einsums' contiguous copies of K/V per layer
(a quarter of a 16-stream demo-model step after the packed projections). Here the GQA group is
folded into SDPA's query length ([B, Hkv, group, D] against [B, Hkv, L, D]), so K/V are neither
repeated nor copied after the one gather, and the padded tail of shorter contexts is masked.
"""

import torch
import torch.nn.functional as F

from .online_softmax import attention_output, check_attention_inputs


def decode_attention_cpu(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                         max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None):
    """decode_attention's contract (tuning arguments are ignored): q [B, Hq, D], caches [S, Hkv, D],
    req_to_token [R, max_ctx], req_rows [B], kv_lens [B] (0 gives a zero output)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    check_attention_inputs(q, k_cache, v_cache, req_to_token)
    out = attention_output(q, out)
    lengths = kv_lens.long()
    longest = int(max_kv_len) if max_kv_len is not None else int(lengths.max()) if batch else 0
    if batch == 0 or longest == 0:
        return out.zero_()
    valid = torch.arange(longest, device=q.device)[None, :] < lengths[:, None]        # [B, L]
    slots = torch.where(valid, req_to_token[req_rows.long(), :longest], 0).view(-1)  # padding reads slot 0
    k = k_cache.index_select(0, slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    qb = q.reshape(batch, num_kv_heads, group, head_dim)
    attn = F.scaled_dot_product_attention(qb, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    # A row with no context has every key masked: SDPA gives it zeros, as the contract says (tested).
    return out.copy_(attn.reshape(batch, num_q_heads, head_dim))
