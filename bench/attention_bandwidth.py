"""Achieved bandwidth of the decode attention kernel alone, on random K/V behind shuffled slots.

    python bench/attention_bandwidth.py
"""

import torch
import triton.testing

from lightllm_nb.kernels import decode_attention, decode_attention_torch


def main() -> None:
    torch.manual_seed(0)
    hq, hkv, d = 32, 8, 64
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'us':>8} {'GB/s':>8}  max |err| vs torch")
    for batch, ctx in ((1, 512), (128, 512), (128, 2048), (32, 4096)):
        slots_total = batch * ctx
        k_cache = torch.randn(slots_total + 1, hkv, d, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        # Every request owns its own slots, shuffled over the whole pool as a busy server's would be.
        req_to_token = torch.randperm(slots_total, device="cuda").to(torch.int32).view(batch, ctx)
        rows = torch.arange(batch, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
        run = lambda: decode_attention(q, k_cache, v_cache, req_to_token, rows, lens, d ** -0.5, max_kv_len=ctx)
        err = (run().float() - decode_attention_torch(q, k_cache, v_cache, req_to_token, rows, lens,
                                                      d ** -0.5).float()).abs().max().item()
        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        moved = 2 * batch * ctx * hkv * d * 2  # K and V, bf16, read once
        from lightllm_nb.kernels import decode_num_splits
        splits = decode_num_splits(batch, hkv, ctx, q.device)
        print(f"{batch:>5} {ctx:>5} {splits:>6} {ms * 1e3:8.1f} {moved / ms / 1e6:8.0f}  {err:.3g}")


if __name__ == "__main__":
    main()
