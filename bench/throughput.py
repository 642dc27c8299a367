"""GPU benchmark: decode-step latency against the bandwidth floor, offline throughput against the
roofline ceiling, and HF transformers on the same weights, all in one run on one card.

    python bench/throughput.py --tokenizer DIR [--shape llama-1b] [--quick]

Weights are random bf16 with real shapes (speed does not depend on their values); the tokenizer
folder only serves detokenization. Prints one table last; --out writes the full log as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import decode_latency, random_checkpoint  # noqa: E402
from roofline import SHAPES, decode_step_floor, workload_ceiling  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def prefill_ceiling(config, weight_bytes: int, length: int, flop_rate: float) -> float:
    """Prompt tokens per second of one prompt's prefill at the GEMM rate: the layers' weights in GEMMs
    and causal attention's two products (the vocabulary head runs for the last token only)."""
    tables = 1 if config.tie_word_embeddings else 2
    params = weight_bytes / 2 - tables * config.vocab_size * config.hidden_size
    attn = 4 * config.num_layers * config.num_q_heads * config.head_dim
    flops = 2 * params * length + attn * length * (length + 1) / 2
    return length / (flops / flop_rate)


def prefill_rate(engine: Engine, length: int, repeats: int = 3) -> float:
    """Prompt tokens per second of one request's prefill (a fresh prompt each time: no prefix hits),
    median of `repeats`; the single sampled token is part of the time."""
    rng = np.random.default_rng(length)
    sampling = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.generate(prompt_token_ids=[rng.integers(0, 30000, length).tolist()], sampling=sampling)  # warm-up
    times = []
    for _ in range(repeats):
        prompt = rng.integers(0, 30000, length).tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(prompt_token_ids=[prompt], sampling=sampling)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return length / statistics.median(times)


def offline_workload(n=256, seed=0):
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(100, 1025, n)
    output_lens = rng.integers(100, 1025, n)
    prompts = [rng.integers(0, 30000, p).tolist() for p in prompt_lens]
    return prompts, output_lens.tolist()


def run_offline(engine: Engine, prompts, outputs) -> float:
    sampling = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = engine.generate(prompt_token_ids=prompts, sampling=sampling)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    assert sum(len(r.token_ids) for r in results) == sum(outputs)
    return wall


def hf_model(hf_config: dict, tensors: dict):
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict({k: v for k, v in tensors.items()}, assign=True, strict=False)
    if hf_config.get("tie_word_embeddings"):
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg, device="cuda")
    return model.eval()


def hf_decode_step(model, batch: int, context: int, new_tokens: int = 64) -> float:
    ids = torch.randint(0, 30000, (batch, context), device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
    torch.cuda.synchronize()
    short = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t - short) / (new_tokens - 4)  # prefill cancels out


def hf_offline(model, prompts, outputs, batch: int, max_new: int) -> tuple[float, int]:
    """Padded static batches (left padding), outputs capped at max_new: HF's best offline mode."""
    useful, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, outs = prompts[i:i + batch], outputs[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        steps = min(max(outs), max_new)
        model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
        useful += sum(min(o, steps) for o in outs)
    torch.cuda.synchronize()
    return time.perf_counter() - t, useful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="fewer sizes, smaller workload")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    hf_config = dict(SHAPES[args.shape], _shape=args.shape)
    card = torch.cuda.get_device_name()
    bandwidth, flops = copy_bandwidth(), matmul_rate()
    log = {"card": card, "shape": args.shape, "date": time.strftime("%Y-%m-%d"),
           "copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}
    print(json.dumps(log), flush=True)
    ckpt, tensors = random_checkpoint(hf_config, tokenizer)
    t = time.perf_counter()
    engine = Engine(ckpt, dtype="bfloat16")  # the defaults a user gets: batch limits chosen for the card
    log["engine_start_s"] = time.perf_counter() - t
    log["limits"] = {k: engine.stats()[k] for k in ("max_running", "max_batch_tokens", "kv_capacity_tokens")}
    log["decode_linear"] = engine.model.linear.timings
    print(json.dumps({"limits": log["limits"], "decode_linear": log["decode_linear"]}), flush=True)
    weight_bytes = engine.model.weight_bytes()
    kv_per_token = engine.config.kv_bytes_per_token
    rows = []
    batches, contexts = ((1, 32), (512,)) if args.quick else ((1, 8, 32, 128), (512, 2048))
    for context in contexts:
        for batch in batches:
            step = decode_latency(engine, batch, context)
            floor = decode_step_floor(weight_bytes, kv_per_token, [context] * batch, bandwidth)
            rows.append({"batch": batch, "context": context, "step_ms": step * 1e3, "floor_ms": floor * 1e3,
                         "x_floor": step / floor, "tok_s": batch / step})
            print(json.dumps(rows[-1]), flush=True)
    log["decode"] = rows
    prefill = []
    for length in (512, 2048, 8192):
        rate = prefill_rate(engine, length)
        ceiling = prefill_ceiling(engine.config, weight_bytes, length, flops)
        prefill.append({"prompt": length, "tok_s": rate, "ceiling_tok_s": ceiling, "fraction": rate / ceiling})
        print(json.dumps(prefill[-1]), flush=True)
    log["prefill"] = prefill
    n = 64 if args.quick else 256
    prompts, outputs = offline_workload(n)
    wall = run_offline(engine, prompts, outputs)
    ceiling = workload_ceiling(engine.config, weight_bytes, [len(p) for p in prompts], outputs, bandwidth, flops)
    out_tokens = sum(outputs)
    log["offline"] = {"requests": n, "output_tokens": out_tokens, "wall_s": wall, "tok_s": out_tokens / wall,
                      "ceiling_tok_s": out_tokens / ceiling, "fraction_of_ceiling": ceiling / wall}
    print(json.dumps(log["offline"]), flush=True)
    engine.close()
    if not args.no_hf:
        model = hf_model(hf_config, tensors)
        hf_rows = []
        for batch in batches:
            step = hf_decode_step(model, batch, 512)
            ours = next(r for r in rows if r["batch"] == batch and r["context"] == 512)
            hf_rows.append({"batch": batch, "context": 512, "hf_step_ms": step * 1e3,
                            "speedup": step * 1e3 / ours["step_ms"]})
            print(json.dumps(hf_rows[-1]), flush=True)
        sub = 64
        hf_wall, useful = hf_offline(model, prompts[:sub], outputs[:sub], batch=64, max_new=256)
        log["hf"] = {"decode": hf_rows, "offline_subset": sub, "offline_max_new": 256,
                     "offline_tok_s": useful / hf_wall, "speedup": log["offline"]["tok_s"] / (useful / hf_wall)}
        print(json.dumps(log["hf"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))
    print_table(log)


def print_table(log: dict) -> None:
    print(f"\n{log['card']} | {log['shape']} | copy {log['copy_bandwidth_GBps']:.0f} GB/s | "
          f"bf16 GEMM {log['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'batch':>5} {'ctx':>5} {'step ms':>8} {'floor ms':>8} {'x floor':>7} {'tok/s':>8} {'HF ms':>8} {'x HF':>6}")
    hf = {(r["batch"], r["context"]): r for r in log.get("hf", {}).get("decode", [])}
    for r in log["decode"]:
        h = hf.get((r["batch"], r["context"]))
        extra = f"{h['hf_step_ms']:8.2f} {h['speedup']:6.1f}" if h else ""
        print(f"{r['batch']:>5} {r['context']:>5} {r['step_ms']:8.3f} {r['floor_ms']:8.3f} {r['x_floor']:7.2f} "
              f"{r['tok_s']:8.0f} {extra}")
    for p in log["prefill"]:
        print(f"prefill {p['prompt']:>5} tokens: {p['tok_s']:9.0f} tok/s, GEMM-bound ceiling {p['ceiling_tok_s']:9.0f} "
              f"({100 * p['fraction']:.0f}%)")
    print(f"limits {log['limits']}")
    o = log["offline"]
    print(f"offline {o['requests']} seqs: {o['tok_s']:.0f} out tok/s, ceiling {o['ceiling_tok_s']:.0f} "
          f"({100 * o['fraction_of_ceiling']:.0f}% of it)" +
          (f"; HF padded batches {log['hf']['offline_tok_s']:.0f} tok/s -> {log['hf']['speedup']:.1f}x"
           if "hf" in log else ""))


if __name__ == "__main__":
    main()
