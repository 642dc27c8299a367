"""What the engine benchmarks share: the engine they time and how they time its decode step.

The engine: random bf16 weights of a real shape (bench/roofline.py) on the GPU, where speed does
not depend on the weights' values; a model folder or name; or, by default, a tiny random Llama
(tests/tiny_models.py), which keeps a CPU smoke run cheap. The timing: the median wall time of a
whole engine step (schedule + forward + sample) with a full batch of requests at one context.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import SHAPES  # noqa: E402

from lightllm_nb import Engine, SamplingParams  # noqa: E402
from lightllm_nb.loading import Checkpoint  # noqa: E402


def weight_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama-family checkpoint with this config, by its Hugging Face name."""
    h, f, d = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["head_dim"]
    q, kv = hf_config["num_attention_heads"] * d, hf_config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (hf_config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    if not hf_config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (hf_config["vocab_size"], h)
    return shapes


def random_checkpoint(hf_config: dict, tokenizer, seed: int = 0) -> tuple[Checkpoint, dict]:
    """Random bf16 weights generated on the GPU; the same tensors also feed the HF model."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for name, shape in weight_shapes(hf_config).items():
        t = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        if len(shape) == 1:
            t.uniform_(0.8, 1.2, generator=gen)
        else:
            t.normal_(0, shape[-1] ** -0.5, generator=gen)
        tensors[name] = t
    ckpt = Checkpoint(config=hf_config, tensors=lambda: iter(tensors.items()), num_tensors=len(tensors),
                      tokenizer=tokenizer, source=f"random {hf_config['_shape']}")
    return ckpt, tensors


def add_model_options(parser: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    """--model, --shape, --tokenizer and --device, read back by `bench_engine`."""
    parser.add_argument("--model", default=default_model,
                        help=f"a HF folder or a model name (default: {default_model or 'a tiny random Llama made here'})")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="CUDA only: random bf16 weights of this shape (bench/roofline.py) instead of --model")
    parser.add_argument("--tokenizer", default=None, help="with --shape: a tokenizer folder")
    parser.add_argument("--device", default="cpu")


def bench_engine(args: argparse.Namespace, folder: str, **settings) -> Engine:
    """The engine `add_model_options`' options name (a tiny random Llama is written to `folder`),
    with these Engine `settings`; loading progress is not shown."""
    if (args.shape is None) != (args.tokenizer is None):
        raise SystemExit("--shape and --tokenizer DIR go together: random weights come without a tokenizer")
    if args.shape is not None:
        if not args.device.startswith("cuda"):
            raise SystemExit(f"--shape makes its random weights on the GPU: add --device cuda (not {args.device})")
        from transformers import AutoTokenizer

        model, _ = random_checkpoint(dict(SHAPES[args.shape], _shape=args.shape),
                                     AutoTokenizer.from_pretrained(args.tokenizer))
        settings.setdefault("dtype", "bfloat16")
    elif args.model is not None:
        model = args.model
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import make_tiny_model

        from lightllm_nb.loading import load_checkpoint

        make_tiny_model("llama", folder, load_checkpoint("demo").tokenizer)
        model = folder
    return Engine(model, device=args.device, progress=False, **settings)


def model_label(args: argparse.Namespace) -> str:
    """What `bench_engine` runs, in a few words, for a result's heading."""
    return args.shape or args.model or "tiny random Llama"


def decode_latency(engine: Engine, batch: int, context: int, steps: int = 30,
                   sampling: SamplingParams | None = None) -> float:
    """Median wall time of a whole engine step (schedule + forward + sample) at this batch, every
    request under `sampling` (default greedy, ignore_eos; its max_tokens is set here)."""
    rng = np.random.default_rng(batch * 7 + context)
    # Requests decode while later ones prefill: max_tokens must outlast the whole prefill, or
    # the first requests finish before the timing starts and a smaller batch is timed (this is
    # what made the decode kernel look faster than its bytes at batch 128 / context 2048).
    prefill_steps = -(-batch * context // engine.scheduler.max_batch_tokens) + batch
    sampling = dataclasses.replace(sampling or SamplingParams(temperature=0, ignore_eos=True),
                                   max_tokens=prefill_steps + steps + 40)
    rids = [engine.add_request(prompt_token_ids=rng.integers(0, 30000, context).tolist(), sampling=sampling)
            for _ in range(batch)]
    while any(r.num_computed < r.num_prompt for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    check_full_batch(engine, batch)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    check_full_batch(engine, batch)
    for rid in rids:
        engine.abort(rid)
    engine.step()
    return statistics.median(times)


def check_full_batch(engine: Engine, batch: int) -> None:
    running = engine.scheduler.running
    if len(running) != batch or any(r.num_computed < r.num_prompt for r in running):
        raise RuntimeError(f"{len(running)} requests are decoding, not {batch}: the timing would be of a smaller batch")
