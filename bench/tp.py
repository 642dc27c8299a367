"""Tensor parallelism on one host: tp=1 vs tp=2 (vs tp=4) on a real shape with random weights.

    python bench/tp.py --tokenizer DIR [--shape llama-8b] [--tp 1 2 4] [--folder /tmp/tp-llama-8b] [--quick]

Writes random bf16 weights of the shape once to --folder as safetensors (worker processes load
from a path, as a served model would), then for each tp: the decode step at batch 1 and 64
(context 512), the offline workload of bench/throughput.py, and the share of a decode step the
all-reduces take (NCCL kernel time on rank 0 from the profiler / step wall time). Prints a table
with speed-up and scaling efficiency against tp=1; --out writes the log as JSON.
CPU smoke run (gloo, tiny shape): --device cpu --shape tiny --quick.
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
from engine_timing import decode_latency, weight_shapes  # noqa: E402
from roofline import SHAPES  # noqa: E402
from throughput import offline_workload  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402

TINY = dict(model_type="llama", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
BATCHES = (1, 64)
CONTEXT = 512


def write_random_folder(hf_config: dict, tokenizer, folder: Path, seed: int = 0) -> Path:
    """A Hugging Face folder of random bf16 weights with this shape (kept: a second run reuses it)."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes(hf_config).items():
        t = torch.empty(shape, dtype=torch.float32)
        t.uniform_(0.8, 1.2, generator=gen) if len(shape) == 1 else t.normal_(0, shape[-1] ** -0.5, generator=gen)
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "bfloat16"}))
    tokenizer.save_pretrained(folder)
    return folder


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def allreduce_share(engine: Engine, batch: int, steps: int = 10) -> float | None:
    """Share of rank 0's decode step wall time spent in NCCL all-reduce kernels (None on the CPU)."""
    if engine.device.type != "cuda":
        return None
    rng = np.random.default_rng(batch)
    sampling = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    rids = [engine.add_request(prompt_token_ids=rng.integers(0, 30000, CONTEXT).tolist(), sampling=sampling)
            for _ in range(batch)]
    while any(r.num_computed < r.num_prompt for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    _sync(engine)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(engine)
        wall = time.perf_counter() - t
    nccl_us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower()
                  and "allreduce" in e.key.lower().replace("_", ""))
    for rid in rids:
        engine.abort(rid)
    engine.step()
    return nccl_us / 1e6 / wall


def offline_tok_s(engine: Engine, n: int) -> float:
    prompts, outputs = offline_workload(n)
    sampling = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    _sync(engine)
    t = time.perf_counter()
    results = engine.generate(prompt_token_ids=prompts, sampling=sampling)
    _sync(engine)
    wall = time.perf_counter() - t
    assert sum(len(r.token_ids) for r in results) == sum(outputs)
    return sum(outputs) / wall


def measure(folder: Path, tp: int, device: str, quick: bool) -> dict:
    t = time.perf_counter()
    engine = Engine(str(folder), tp=tp, device=device, dtype="bfloat16" if device != "cpu" else "float32",
                    kv_tokens=None if device != "cpu" else 65536, progress=False)
    row = {"tp": tp, "start_s": time.perf_counter() - t, "max_running": engine.scheduler.max_running,
           "kv_capacity_tokens": engine.pool.capacity}
    try:
        for batch in BATCHES:
            row[f"step_ms_b{batch}"] = decode_latency(engine, batch, CONTEXT, steps=10 if quick else 30) * 1e3
            share = allreduce_share(engine, batch) if tp > 1 else None
            row[f"allreduce_share_b{batch}"] = share
        row["offline_tok_s"] = offline_tok_s(engine, 16 if quick else 256)
    finally:
        engine.close()
    print(json.dumps(row), flush=True)
    return row


def print_table(log: dict) -> None:
    base = next((r for r in log["runs"] if r["tp"] == 1), None)
    print(f"\n{log['card']} | {log['shape']} | context {CONTEXT} | tp>1 runs without CUDA graphs")
    print("tp | step b1 ms (x tp1) | step b64 ms (x tp1) | offline tok/s (speed-up, efficiency) | all-reduce share b1 / b64")
    for r in log["runs"]:
        def rel(key, invert=False):
            if base is None:
                return ""
            ratio = base[key] / r[key] if invert else r[key] / base[key]
            return f" ({ratio:.2f}x)"
        speed = base and r["offline_tok_s"] / base["offline_tok_s"]
        shares = " / ".join("-" if r[f"allreduce_share_b{b}"] is None else f"{r[f'allreduce_share_b{b}']:.0%}"
                            for b in BATCHES)
        print(f"{r['tp']} | {r['step_ms_b1']:.2f}{rel('step_ms_b1')} | {r['step_ms_b64']:.2f}{rel('step_ms_b64')} | "
              f"{r['offline_tok_s']:.0f}" + (f" ({speed:.2f}x, {speed / r['tp']:.0%})" if speed else "")
              + f" | {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (only detokenizes)")
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES) + ["tiny"])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--folder", default=None, help="where the random weights go (default /tmp/tp-<shape>)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer steps, a 16-request offline workload")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    hf_config = TINY if args.shape == "tiny" else SHAPES[args.shape]
    folder = write_random_folder(hf_config, AutoTokenizer.from_pretrained(args.tokenizer),
                                 Path(args.folder or f"/tmp/tp-{args.shape}"))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (gloo)"
    log = {"card": card, "gpus": torch.cuda.device_count() if args.device == "cuda" else 0, "shape": args.shape,
           "date": time.strftime("%Y-%m-%d"), "runs": [measure(folder, tp, args.device, args.quick) for tp in args.tp]}
    print_table(log)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
