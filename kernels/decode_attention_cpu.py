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

Every layer of a step reads the same slots under the same mask: DecodeAttentionCPU (the CPU kernel
set's decode attention, one per model) makes that gather plan at a step's first layer and keeps it for
the others, 3 torch calls and ~70 us a layer fewer (in-engine A/B, 16 demo streams: 492 -> 420 us).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .online_softmax import attention_output, check_attention_inputs

# Gathered K elements (batch x context x kv heads x head dim) up to which attention runs on one thread:
# 4 MB of float32, where a gather alone takes about a millisecond and a second thread is worth its
# wake-up. A judgement, not a measured crossover: the demo's 16 streams sit at 1/5 of it.
ONE_THREAD_ELEMENTS = 1 << 20


def decode_attention_cpu(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                         max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None):
    """decode_attention's contract (max_kv_len and the tuning arguments are ignored): q [B, Hq, D],
    caches [S, Hkv, D], req_to_token [R, max_ctx], req_rows [B], kv_lens [B] (0 gives a zero output)."""
    return _decode(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale, out, None, keep=False)[0]


@dataclass(frozen=True)
class GatherPlan:
    """Where a step's decode rows read the cache: slots [B * L] (a row's padding reads slot 0) and an
    additive mask [B, 1, 1, L] (0 or -inf), from the inputs it holds (so their memory is not reused
    while it lives: `key` names them by address, layout and version)."""
    slots: torch.Tensor
    mask: torch.Tensor
    longest: int  # L: the rows' longest context
    inputs: tuple
    key: tuple


class DecodeAttentionCPU:
    """decode_attention_cpu for one model's steps: the gather plan made at a step's first layer is
    kept for the layers after it, as long as the same tensors come in, unchanged (torch's version
    counter: the engine makes fresh index tensors each step and writes req_to_token through torch;
    a tensor changed behind torch's back, through numpy or `.data`, would not be seen: its inputs must
    be fresh tensors or written through torch). Inference tensors (an engine made under
    torch.inference_mode) keep no version counter: their plan is made again at every layer."""

    def __init__(self):
        self._plan: GatherPlan | None = None

    def __call__(self, q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale,
                 max_kv_len=None, num_splits=None, workspace=None, split_counters=None, out=None):
        out, self._plan = _decode(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale, out, self._plan,
                                  keep=True)
        return out


def _decode(q, k_cache, v_cache, req_to_token, req_rows, kv_lens, scale, out, plan, keep):
    """(attention output, the gather plan to keep: `plan` where it still fits, else a new one; None
    where not `keep` or the inputs cannot be told apart from later ones)."""
    batch, _, head_dim = q.shape
    check_attention_inputs(q, k_cache, v_cache, req_to_token)
    out = attention_output(q, out)
    if batch == 0:
        return out, plan
    inputs = (req_to_token, req_rows, kv_lens)
    key = _plan_key(inputs, q.dtype) if keep else None
    if key is None or plan is None or plan.key != key:
        plan = _on_one_thread(_gather_plan, inputs, q.dtype, key)  # [B, L] elements: always small
    kept = plan if key is not None else None
    if plan.longest == 0:
        return out.zero_(), kept
    if batch * plan.longest * k_cache.shape[1] * head_dim <= ONE_THREAD_ELEMENTS:
        _on_one_thread(_attend, q, k_cache, v_cache, plan, scale, out)
    else:
        _attend(q, k_cache, v_cache, plan, scale, out)
    return out, kept


def _on_one_thread(fn, *args):
    """fn(*args) with torch on one thread, its count put back after."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args)
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _plan_key(inputs, dtype) -> tuple | None:
    """What a plan was made from: the inputs' address, layout and version; None for inference
    tensors, which have no version."""
    if any(t.is_inference() for t in inputs):
        return None
    return (dtype,) + tuple((t.data_ptr(), t.dtype, t.shape, t.stride(), t._version) for t in inputs)


def _gather_plan(inputs, dtype, key) -> GatherPlan:
    # Indexing takes int32 rows, slots and lengths as they come: no int64 copies.
    req_to_token, req_rows, kv_lens = inputs
    # These rows' own longest context, not the caller's max_kv_len (a mixed step's longest row, maybe
    # a prefill's, which every decode row would be padded to): on the CPU the max costs no sync, and
    # with the plan kept it is taken once a step, not once a layer.
    longest = int(kv_lens.max())
    padding = torch.arange(longest, device=kv_lens.device) >= kv_lens[:, None]           # [B, L]
    slots = req_to_token[req_rows, :longest].masked_fill_(padding, 0)
    mask = torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill_(padding, float("-inf"))
    return GatherPlan(slots.view(-1), mask[:, None, None, :], longest, inputs, key)


def _attend(q, k_cache, v_cache, plan, scale, out):
    batch, num_q_heads, head_dim = q.shape
    longest = plan.longest
    num_kv_heads = k_cache.shape[1]
    k = k_cache.index_select(0, plan.slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, plan.slots).view(batch, longest, num_kv_heads, head_dim).transpose(1, 2)
    qb = q.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    attn = F.scaled_dot_product_attention(qb, k, v, attn_mask=plan.mask, scale=scale)
    # A row with no context has every key masked: SDPA gives it zeros, as the contract says (tested).
    return out.copy_(attn.reshape(batch, num_q_heads, head_dim))
