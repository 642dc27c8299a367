"""Triton kernels of lightllm-nb, each with a plain-torch twin (``*_torch``) that is the CPU path."""

from .decode_attention import (decode_attention, decode_attention_torch, decode_num_splits,
                               decode_workspace_numel)
from .decode_attention_cpu import DecodeAttentionCPU, decode_attention_cpu
from .gemv import GEMV_MAX_M, gemv, gemv_torch
from .prefill_attention import prefill_attention, prefill_attention_torch
from .prefill_attention_cpu import prefill_attention_cpu
from .race_sample import race_sample, race_sample_torch
from .rmsnorm import add_rmsnorm, add_rmsnorm_torch, norm_warps, rmsnorm, rmsnorm_torch
from .rmsnorm_cpu import add_rmsnorm_cpu, rmsnorm_cpu
from .rotary_kv_write import rotary_kv_write, rotary_kv_write_torch
from .rotary_kv_write_cpu import rotary_kv_write_cpu
from .silu_mul import silu_mul, silu_mul_torch
from .silu_mul_cpu import silu_mul_cpu
from .token_mask import apply_token_mask, apply_token_mask_torch

__all__ = [
    "add_rmsnorm", "add_rmsnorm_cpu", "add_rmsnorm_torch", "apply_token_mask", "apply_token_mask_torch",
    "decode_attention", "DecodeAttentionCPU", "decode_attention_cpu", "decode_attention_torch",
    "decode_num_splits", "decode_workspace_numel",
    "GEMV_MAX_M", "gemv", "gemv_torch", "norm_warps",
    "prefill_attention", "prefill_attention_cpu", "prefill_attention_torch", "race_sample", "race_sample_torch",
    "rmsnorm", "rmsnorm_cpu", "rmsnorm_torch",
    "rotary_kv_write", "rotary_kv_write_cpu", "rotary_kv_write_torch",
    "silu_mul", "silu_mul_cpu", "silu_mul_torch",
]
