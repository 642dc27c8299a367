"""Programmatic dependent launch (kernels/dependent_launch.py) on a CUDA GPU: a batch-1 decode
layer's kernel chain, each kernel reading what the one before it wrote, gives the same bits with
PDL as without, eagerly and replayed from a CUDA graph with new inputs each time (a kernel that
read its input before the wait would see the previous replay's values)."""

import pytest
import torch

from lightllm_nb.kernels import decode_attention, decode_num_splits, gemv, rmsnorm, rotary_kv_write, silu_mul
from lightllm_nb.kernels.dependent_launch import dependent_launch
from test_kernels import _rope_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, CONTEXT = 2048, 32, 8, 64, 8192, 4, 1500


def _layers(gen):
    def weight(n, k):
        return (torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5).to(torch.bfloat16)

    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [dict(qkv=weight(qkv, HIDDEN), o=weight(HIDDEN, Q_HEADS * HEAD_DIM), gate_up=weight(2 * FFN, HIDDEN),
                 down=weight(HIDDEN, FFN), norm=torch.rand(HIDDEN, generator=gen, device="cuda").to(torch.bfloat16) + 0.5)
            for _ in range(LAYERS)]


def _chain(layers, cache, x, pdl):
    """LAYERS decode layers at batch 1 with the engine's fused kernels; returns the last hidden."""
    k_cache, v_cache, req_to_token, positions, slots, kv_lens, cos, sin, counters = cache
    splits = decode_num_splits(1, KV_HEADS, CONTEXT, x.device)
    residual = x.clone()
    h = rmsnorm(x, layers[0]["norm"], 1e-5, pdl=pdl)
    for i, layer in enumerate(layers):
        qkv = gemv(h, layer["qkv"], split_k=2, split_counters=counters, pdl=pdl)
        q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k, v = q.view(1, Q_HEADS, HEAD_DIM), k.view(1, KV_HEADS, HEAD_DIM), v.view(1, KV_HEADS, HEAD_DIM)
        rotary_kv_write(q, k, v, positions, cos, sin, k_cache[i], v_cache[i], slots, pdl=pdl)
        attn = decode_attention(q, k_cache[i], v_cache[i], req_to_token, torch.zeros_like(kv_lens), kv_lens, HEAD_DIM ** -0.5,
                                max_kv_len=CONTEXT, num_splits=splits, split_counters=counters[-KV_HEADS:], pdl=pdl)
        h, residual = gemv(attn.view(1, -1), layer["o"], add_rmsnorm=(residual, layer["norm"], 1e-5), block_n=4,
                           block_k=1024, split_k=2, split_counters=counters, pdl=pdl)
        gate_up = gemv(h, layer["gate_up"], block_n=4, block_k=1024, pdl=pdl)
        if i % 2:  # SiLU-mul on its own, as at larger batches
            act, swiglu = silu_mul(gate_up, pdl=pdl), False
        else:
            act, swiglu = gate_up, True
        h, residual = gemv(act, layer["down"], swiglu=swiglu, add_rmsnorm=(residual, layer["norm"], 1e-5),
                           block_n=8, block_k=512, split_k=3, split_counters=counters, pdl=pdl)
    return h


def _cache(gen):
    slots_total = CONTEXT + 7
    k_cache = torch.randn(LAYERS, slots_total, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
    v_cache = torch.randn(LAYERS, slots_total, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
    req_to_token = torch.randperm(slots_total, generator=gen, device="cuda")[:CONTEXT].to(torch.int32)[None, :]
    cos, sin = (t.cuda() for t in _rope_tables(CONTEXT, HEAD_DIM))
    positions = torch.tensor([CONTEXT - 1], device="cuda")
    slots = req_to_token[0, -1:].long()
    kv_lens = torch.tensor([CONTEXT], dtype=torch.int32, device="cuda")
    counters = torch.zeros(2 * FFN // 4 + 1 + KV_HEADS, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, req_to_token, positions, slots, kv_lens, cos, sin, counters


def test_pdl_is_on_where_the_card_has_it():
    x = torch.zeros(1, device="cuda")
    assert dependent_launch(True, x) == (torch.cuda.get_device_capability()[0] >= 9)
    assert not dependent_launch(False, x) and not dependent_launch(True, x.cpu())


def test_decode_layer_chain_with_pdl_gives_the_same_bits_eager_and_in_a_graph():
    gen = torch.Generator("cuda").manual_seed(0)
    layers, cache = _layers(gen), _cache(gen)
    inputs = [torch.randn(1, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(6)]
    expected = [_chain(layers, cache, x, pdl=False) for x in inputs]
    assert all(not torch.equal(expected[0], e) for e in expected[1:])  # the inputs matter
    assert all(torch.equal(_chain(layers, cache, x, pdl=True), e) for x, e in zip(inputs, expected))

    static_x = inputs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(layers, cache, static_x, pdl=True)
    for _ in range(3):  # alternate inputs: a read before its producer finished sees the last replay's
        for x, e in zip(inputs, expected):
            static_x.copy_(x)
            graph.replay()
            assert torch.equal(out, e)
    assert not cache[-1].any()  # every split-K and attention counter left at zero
