"""Rotary on q and k fused with the KV-cache write, for the CPU path: rotary_kv_write_torch's
contract (the Triton kernel's twin and this one's oracle) in about half the torch calls.

q and k are neighbouring column slices of the model's fused qkv projection: one view over both
([T, Hq + Hkv, D], q's heads then k's) is rotated by one set of elementwise ops where the twin
rotates each on its own, and the cos / sin rows are looked up once. The rotated rows go to a new
tensor: q takes its heads back in place, the cache takes k's, and the projection's k columns stay
unrotated, as the contract says. Each element is computed by the twin's own expressions (x1 * c -
x2 * s, x2 * c + x1 * s in the same dtype), so the bits are the twin's.

Where q and k are not neighbours (a caller's own tensors) or are narrower than float32 (the twin
widens them to float32 first), the twin runs.
"""

import torch

from .rotary_kv_write import rotary_kv_write_torch


def rotary_kv_write_cpu(q, k, v, positions, cos, sin, k_cache, v_cache, slots):
    """rotary_kv_write_torch's contract: q [T, Hq, D] rotated in place, rotated k and plain v into
    k_cache / v_cache [S, Hkv, D] at slots [T]; cos / sin [max_pos, D/2]."""
    query_and_key = _joint_view(q, k)
    if query_and_key is None or q.dtype not in (torch.float32, torch.float64):
        return rotary_kv_write_torch(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    positions = positions.to(cos.device, torch.long)
    c = cos.index_select(0, positions).to(q.dtype).unsqueeze(1)  # [T, 1, D/2]
    s = sin.index_select(0, positions).to(q.dtype).unsqueeze(1)
    x1, x2 = query_and_key[..., :half], query_and_key[..., half:]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)  # [T, Hq + Hkv, D]
    q.copy_(rotated[:, :num_q_heads])
    index = slots.to(k_cache.device, torch.long)
    k_cache.index_copy_(0, index, rotated[:, num_q_heads:].to(k_cache.dtype))
    v_cache.index_copy_(0, index, v.to(v_cache.dtype))


def _joint_view(q, k):
    """[T, Hq + Hkv, D] over q's heads and then k's where k's heads follow q's in memory with the
    same strides (slices of one qkv row); None otherwise."""
    if (k.dtype != q.dtype or k.stride() != q.stride() or q.stride(-1) != 1 or q.stride(1) != q.shape[2]
            or k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
            or k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size()):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
