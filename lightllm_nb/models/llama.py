"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a flat batch of tokens.

A step's tokens from every request are concatenated ("ragged" batch, no padding); attention
finds each request's context through `req_to_token`, so prefill chunks, cached prefixes and
decodes mix freely in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernel_set import KernelSet
from .config import ModelConfig
from .decode_linear import DecodeLinear
from .packed_linear import can_pack, pack
from .kv_buffers import KVBuffers
from .rope import rotary_tables


@dataclass
class ForwardBatch:
    """One step's inputs. Decodes (one new token each) come first, prefill chunks after."""

    input_ids: torch.Tensor     # [T] int64
    positions: torch.Tensor     # [T] int64
    out_slots: torch.Tensor     # [T] int64, where each token's K/V goes
    req_rows: torch.Tensor      # [B] int32, each request's row of req_to_token
    q_starts: torch.Tensor      # [B+1] int32, request b's tokens are [q_starts[b], q_starts[b+1])
    kv_lens: torch.Tensor       # [B] int32, context length after this step
    logits_index: torch.Tensor  # [N] int64, tokens whose next-token logits are wanted
    num_decodes: int
    max_q_len: int
    max_kv_len: int
    decode_splits: int | None = None  # fixed split count for CUDA graphs; None lets the kernel choose


@dataclass
class LayerWeights:
    qkv: torch.Tensor           # q, k and v projections stacked: one GEMM instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor       # gate and up stacked, for silu_mul
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


class LlamaModel:
    def __init__(self, config: ModelConfig, layers: list[LayerWeights], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor, kernels: KernelSet, max_positions: int):
        self.config = config
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.kernels = kernels
        self.cos, self.sin = rotary_tables(config, max_positions, embed.device)
        self.scale = config.head_dim ** -0.5
        # Projections: F.linear until choose_decode_kernels() measures where the GEMV wins.
        self.linear = DecodeLinear()
        # Tensor parallelism's collectives (lightllm_nb.parallel.comm.ShardComm); None at tp=1.
        self.tp = None

    def choose_decode_kernels(self) -> None:
        """On CUDA, time cuBLAS against the Triton GEMV for every projection at batch 1; on the
        CPU, pack the projections' weights for oneDNN (float32 and bfloat16: packed_linear.py)."""
        if self.device.type != "cuda":
            self._pack_projections()
            return
        weights = [(w, b) for layer in self.layers
                   for w, b in ((layer.qkv, layer.qkv_bias), (layer.o, None), (layer.gate_up, None), (layer.down, None))]
        self.linear = DecodeLinear.measured(weights + [(self.lm_head, None)], [layer.down for layer in self.layers])

    def _pack_projections(self) -> None:
        if not can_pack(self.lm_head):
            return
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, pack(getattr(layer, name)))
        # A tied head is also the embedding table, which stays a plain tensor: the head gets a copy.
        self.lm_head = pack(self.lm_head)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVBuffers) -> torch.Tensor:
        """Logits [N, vocab] (float32, or float64 for a float64 model) for the tokens at batch.logits_index."""
        cfg, k = self.config, self.kernels
        if self.tp is None:
            hidden = F.embedding(batch.input_ids, self.embed)
        else:  # this rank's vocabulary rows: the others' tokens come from the other ranks
            hidden = self.tp.embed(batch.input_ids, self.embed)
        residual = hidden
        # Decode attention's split counters: zeroed once per step, each layer's launch leaves them zero.
        split_counters = torch.zeros(batch.num_decodes * cfg.num_kv_heads, dtype=torch.int32, device=self.device)
        x = k.rmsnorm(hidden, self.layers[0].attn_norm, cfg.rms_norm_eps)
        norms_after_mlp = [layer.attn_norm for layer in self.layers[1:]] + [self.final_norm]
        for i, layer in enumerate(self.layers):
            attn = self._attention(i, layer, x, batch, kv, split_counters)
            x, residual = self._project_add_rmsnorm(attn, layer.o, residual, layer.mlp_norm)
            gate_up = self.linear(x, layer.gate_up)
            x, residual = self._project_add_rmsnorm(gate_up, layer.down, residual, norms_after_mlp[i], swiglu=True)
        # Only the rows that sample need the (large) vocabulary projection. The index is increasing,
        # so as many rows as tokens means all of them (a decode step): no gather.
        if batch.logits_index.shape[0] != x.shape[0]:
            x = x[batch.logits_index]
        logits = self.linear(x, self.lm_head)
        if self.tp is not None:  # this rank's vocabulary shard: rank 0 gathers the whole row
            logits = self.tp.gather_logits(logits)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _project_add_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                             norm_weight: torch.Tensor, swiglu: bool = False):
        """residual += the projection of x (of silu(gate) * up with swiglu); (rmsnorm(residual), residual)."""
        cfg, k = self.config, self.kernels
        if self.tp is None:  # one launch for both where the projection is a one-row GEMV
            return self.linear.then_add_rmsnorm(x, weight, residual, norm_weight, cfg.rms_norm_eps, k, swiglu)
        # o and down see only this rank's heads / columns: sum the parts before the residual add.
        projected = self.linear.swiglu(x, weight, k.silu_mul) if swiglu else self.linear(x, weight)
        self.tp.all_reduce(projected)
        return k.add_rmsnorm(projected, residual, norm_weight, cfg.rms_norm_eps)

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor, batch: ForwardBatch,
                   kv: KVBuffers, split_counters: torch.Tensor) -> torch.Tensor:
        cfg, k = self.config, self.kernels
        num_tokens = x.shape[0]
        qkv = self.linear(x, layer.qkv, layer.qkv_bias)
        q, key, value = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(num_tokens, cfg.num_q_heads, cfg.head_dim)
        key = key.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        value = value.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:  # Qwen3 normalizes each head before rotary
            q = k.rmsnorm(q.reshape(-1, cfg.head_dim), layer.q_norm, cfg.rms_norm_eps).view_as(q)
            key = k.rmsnorm(key.reshape(-1, cfg.head_dim), layer.k_norm, cfg.rms_norm_eps).view_as(key)
        k.rotary_kv_write(q, key, value, batch.positions, self.cos, self.sin, kv.k_cache[i], kv.v_cache[i],
                          batch.out_slots)

        # Each attention kernel writes its rows of the output in place: no copy into the slices.
        out = torch.empty((num_tokens, cfg.num_q_heads, cfg.head_dim), dtype=x.dtype, device=x.device)
        d = batch.num_decodes
        if d:
            k.decode_attention(q[:d], kv.k_cache[i], kv.v_cache[i], kv.req_to_token, batch.req_rows[:d],
                               batch.kv_lens[:d], self.scale, max_kv_len=batch.max_kv_len,
                               num_splits=batch.decode_splits, split_counters=split_counters, out=out[:d])
        if d < batch.req_rows.shape[0]:
            k.prefill_attention(q[d:], kv.k_cache[i], kv.v_cache[i], kv.req_to_token, batch.req_rows[d:],
                                batch.q_starts[d:] - d, batch.kv_lens[d:], self.scale, max_q_len=batch.max_q_len,
                                out=out[d:])
        return out.view(num_tokens, -1)
