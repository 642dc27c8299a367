"""What a model sees of the KV cache: the buffers it reads and writes, not the pool that hands them out.

The pool (lightllm_nb.kv) decides which slots and rows belong to whom; a model only needs the
tensors. Defined here, below the KV room, so models never import it. The tensors are the pool's
own (not copies), so a CUDA graph captured over them reads whatever the pool maps later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVBuffers:
    k_cache: torch.Tensor       # [layers, slots, kv_heads, head_dim]
    v_cache: torch.Tensor       # [layers, slots, kv_heads, head_dim]
    req_to_token: torch.Tensor  # [rows, max_context] int32: slot of each position of each request's row
