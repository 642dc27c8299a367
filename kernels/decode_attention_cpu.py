"""Decode attention for the CPU path: each request's K/V gathered once per layer, then torch's
fused scaled_dot_product_attention. Same signature and result as decode_attention_torch, the
twin that stays the oracle for the Triton kernel; this one is for speed, checked against it.

The twin materializes scores, mask, softmax and the einsums' contiguous copies of K/V per layer
(a quarter of a 16-stream demo-model step after the packed projections). Here the GQA group is
folded into SDPA's query length ([B, Hkv, group, D] against [B, Hkv, L, D]), so K/V are neither
repeated nor copied after the one gather, and the padded tail of shorter contexts is masked.

A decode step's attention is small (16 demo streams at 64 tokens of context: 200k elements of K),
yet the gathers and SDPA each fork a parallel region, and with two torch threads each region waits
for a worker that slept since the last projection: the layer took 990-1000 us on 2 threads against
290-305 us on one (2 Zen 4 vCPUs, the caller a driver-loop-like thread, other sessions' load ~3).
So attention this small runs on the calling thread alone (310-317 us with 2 threads set), and torch's
count is put back before returning (set_num_threads also moves torch's process-wide default, which
threads started meanwhile would begin from: the step thread is the only one that calls this).
"""

import torch
import torch.nn.functional as F

from .online_softmax import attention_output, check_attention_inputs

# Gathered K elements (batch x context x kv heads x head dim) up to which attention runs on one thread:
# 4 MB of float32, where a gather alone takes about a millisecond and a second thread is worth its
# wake-up. A judgement, not a measured crossover: the demo's 16 streams sit at 1/5 of it.
ONE_THREAD_ELEMENTS = 1 << 20


def decode_attention_cpu(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                         max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None):
    """decode_attention's contract (tuning arguments are ignored): q [B, Hq, D], caches [S, Hkv, D],
    req_to_token [R, max_ctx], req_rows [B], kv_lens [B] (0 gives a zero output)."""
    batch, _, head_dim = q.shape
    check_attention_inputs(q, k_cache, v_cache, req_to_token)
    out = attention_output(q, out)
    longest = int(max_kv_len) if max_kv_len is not None else int(kv_lens.max()) if batch else 0
    if batch == 0 or longest == 0:
        return out.zero_()
    threads = torch.get_num_threads()
    if threads == 1 or batch * longest * k_cache.shape[1] * head_dim > ONE_THREAD_ELEMENTS:
        return _attend(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, longest, scale, out)
    torch.set_num_threads(1)
    try:
        return _attend(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, longest, scale, out)
    finally:
        torch.set_num_threads(threads)


def _attend(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, longest, scale, out):
    # Few torch calls: each costs a layer microseconds of dispatch, and indexing takes int32
    # rows, slots and lengths as they come (no int64 copies).
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    valid = torch.arange(longest, device=q.device) < kv_lens[:, None]                 # [B, L]
    slots = req_to_token[req_rows, :longest].masked_fill_(~valid, 0).view(-1)       # padding reads slot 0
    k = k_cache.index_select(0, slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    qb = q.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    attn = F.scaled_dot_product_attention(qb, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    # A row with no context has every key masked: SDPA gives it zeros, as the contract says (tested).
    return out.copy_(attn.reshape(batch, num_q_heads, head_dim))
