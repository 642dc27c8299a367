"""Prefill attention for the CPU path: every request of a step in one scaled_dot_product_attention,
where the twin (prefill_attention_torch, the Triton kernel's oracle) makes one per request. Same
signature and result, checked against the twin.

The twin's loop costs ~15 torch calls a request and a layer: a step that admits 16 demo prompts spent
~100 of its ~500 ms in them. Here queries are padded to the longest chunk ([B, Hkv, group x Lq, D],
the GQA group folded into the query rows as the twin does), K/V gathered once ([B, Hkv, L, D]), and
one mask hides the keys after each query's position and the padded queries (which SDPA answers with
zeros, dropped when the rows go back to the ragged token order).

The mask has B x group x Lq x L entries (and SDPA a float copy of it): past PADDED_MASK_ELEMENTS, as
with long prompts, whose projections dwarf the loop anyway, the twin runs; so does a lone request (one
call already) and a dtype narrower than float32 (the twin widens it first).
"""

import torch
import torch.nn.functional as F

from .online_softmax import attention_output
from .prefill_attention import prefill_attention_torch

# Mask entries up to which the padded batch runs: 16 MB as float32.
PADDED_MASK_ELEMENTS = 1 << 22


def prefill_attention_cpu(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale,
                          max_q_len=None, out=None):
    """prefill_attention's contract: q [T, Hq, D] (request b's tokens are [q_starts[b], q_starts[b+1])),
    caches [S, Hkv, D], req_to_token [R, max_ctx], req_rows [B], kv_lens [B] (context after the chunk);
    q_starts[0] must be 0 (the model's calls: its prefill rows are passed as their own q), which the
    twin does not need."""
    batch = req_rows.shape[0]
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    q_lens = q_starts[1:] - q_starts[:-1]
    if batch < 2 or q.dtype not in (torch.float32, torch.float64) or tokens == 0:
        return prefill_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale,
                                       max_q_len, out)
    longest_q = int(max_q_len) if max_q_len is not None else int(q_lens.max())
    longest = int(kv_lens.max())
    if batch * group * longest_q * longest > PADDED_MASK_ELEMENTS:
        return prefill_attention_torch(q, k_cache, v_cache, req_to_token, req_rows, q_starts, kv_lens, scale,
                                       max_q_len, out)
    out = attention_output(q, out)
    key_positions = torch.arange(longest, device=q.device)
    slots = req_to_token[req_rows, :longest].masked_fill_(key_positions >= kv_lens[:, None], 0)  # padding: slot 0
    k = k_cache.index_select(0, slots.view(-1)).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, slots.view(-1)).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)

    offsets = torch.arange(longest_q, device=q.device)
    real = offsets < q_lens[:, None]                                                  # [B, Lq]
    token_of = (q_starts[:-1, None] + offsets).masked_fill_(~real, 0)                 # padded rows read token 0
    qb = q.index_select(0, token_of.view(-1)).view(batch, longest_q, num_kv_heads, group, head_dim)
    qb = qb.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * longest_q, head_dim)
    # Query i of request b sits at position kv_len - q_len + i and sees the keys up to it.
    positions = (kv_lens - q_lens)[:, None] + offsets                                 # [B, Lq]
    visible = (key_positions <= positions[:, :, None]) & real[:, :, None]             # [B, Lq, L]
    mask = visible[:, None, None].expand(batch, 1, group, longest_q, longest).reshape(batch, 1, -1, longest)
    attn = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
    padded = attn.view(batch, num_kv_heads, group, longest_q, head_dim).permute(0, 3, 1, 2, 4)
    padded = padded.reshape(batch * longest_q, num_q_heads, head_dim)
    # Token t of request b is padded row b * Lq + (t - q_starts[b]).
    shift = torch.arange(batch, device=q.device) * longest_q - q_starts[:-1]
    rows = torch.repeat_interleave(shift, q_lens, output_size=tokens) + torch.arange(tokens, device=q.device)
    return out.copy_(padded.index_select(0, rows))
