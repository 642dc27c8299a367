"""Builds a LlamaModel from a checkpoint's Hugging Face-named tensors, streaming them one by one."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from .kernel_set import KernelSet
from .config import ModelConfig
from .llama import LayerWeights, LlamaModel

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_PARTS = {
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
}


def build_model(config: ModelConfig, checkpoint, *, device: torch.device, dtype: torch.dtype,
                kernels: KernelSet, max_positions: int, progress: bool = True, shard=None) -> LlamaModel:
    """`shard(name, tensor)`, for tensor parallelism, returns the part this rank keeps; it runs
    before the copy to the device, so the full tensor never reaches it."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
    top: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(checkpoint.tensors(), total=checkpoint.num_tensors, disable=not progress,
                             desc="loading weights", unit="tensor", leave=False):
        tensor = (tensor if shard is None else shard(name, tensor)).to(device=device, dtype=dtype)
        match = _LAYER_NAME.fullmatch(name)
        if match and match.group(2) in _LAYER_PARTS and int(match.group(1)) < config.num_layers:
            parts[int(match.group(1))][match.group(2)] = tensor
        elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            top[name] = tensor
    # The last layers' q/k/v can be fused only once every piece has arrived.
    layers = [_fuse_layer(i, p, config) for i, p in enumerate(parts)]
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        _require(top, name, checkpoint.source)
    embed = top["model.embed_tokens.weight"]
    if not config.tie_word_embeddings:
        _require(top, "lm_head.weight", checkpoint.source)
    lm_head = embed if config.tie_word_embeddings else top["lm_head.weight"]
    model = LlamaModel(config, layers, embed, top["model.norm.weight"], lm_head, kernels, max_positions)
    model.choose_decode_kernels()
    return model


def _fuse_layer(index: int, p: dict[str, torch.Tensor], config: ModelConfig) -> LayerWeights:
    where = f"layer {index}"
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
        _require(p, name, where)
    qkv = torch.cat([p.pop("self_attn.q_proj.weight"), p.pop("self_attn.k_proj.weight"),
                     p.pop("self_attn.v_proj.weight")])
    bias = None
    if "self_attn.q_proj.bias" in p:
        bias = torch.cat([p.pop("self_attn.q_proj.bias"), p.pop("self_attn.k_proj.bias"),
                          p.pop("self_attn.v_proj.bias")])
    if config.qk_norm:
        _require(p, "self_attn.q_norm.weight", where)
        _require(p, "self_attn.k_norm.weight", where)
    return LayerWeights(
        qkv=qkv, qkv_bias=bias, o=p.pop("self_attn.o_proj.weight"),
        gate_up=torch.cat([p.pop("mlp.gate_proj.weight"), p.pop("mlp.up_proj.weight")]),
        down=p.pop("mlp.down_proj.weight"),
        attn_norm=p.pop("input_layernorm.weight"), mlp_norm=p.pop("post_attention_layernorm.weight"),
        q_norm=p.pop("self_attn.q_norm.weight", None), k_norm=p.pop("self_attn.k_norm.weight", None))


def _require(tensors: dict, name: str, where: str) -> None:
    if name not in tensors:
        raise ValueError(f"the checkpoint ({where}) has no tensor {name!r}: it is incomplete or not a "
                         "Llama-family model")
