"""GPU benchmark: what structured output costs a decode step, and what a grammar costs to compile.

    python bench/structured.py --device cuda --shape llama-1b --tokenizer DIR [--context 512] [--out FILE]
    python bench/structured.py --batches 1 4 --context 32          # CPU smoke run, tiny random Llama

Decode-step time at batch 1, 32 and 128 with every request JSON-constrained against none, on one
engine (random bf16 weights of a real shape; the tokenizer is the real one, which is what a
grammar's masks depend on). Three configurations per batch:
  - none, overlapped: the engine's default on CUDA;
  - none, plain steps (overlap off): what a step costs when the host cannot hide behind the GPU;
  - json, overlapped: every request under a JSON schema whose one string field must run long
    (minLength), so random weights cannot finish it early and the batch stays full while it is
    timed. A constrained batch reads the previous tokens back after launching its forward and
    fills the mask while the GPU computes; its sampling waits for the mask.
Then the compile time of the three test schemas, cold (a fresh compiler) and cached, and the host
time to build a batch's bitmask. Prints JSON lines, and a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from engine_timing import add_model_options, bench_engine, decode_latency  # noqa: E402
from structured_schemas import SCHEMAS  # noqa: E402  (the schemas the CPU tests validate against)

from lightllm_nb import Engine, SamplingParams  # noqa: E402
from lightllm_nb.engine.grammar import GrammarCompiler, RequestGrammar  # noqa: E402
from lightllm_nb.scheduling.request import Request  # noqa: E402

LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 3000}},
             "required": ["text"]}


def compile_times(engine: Engine) -> dict:
    """Seconds per schema: the first compile of a fresh compiler (its tokenizer table included),
    then each schema cold on that compiler, then cached (the same constraint again)."""
    compiler = GrammarCompiler(engine.tokenizer, engine.config.vocab_size, engine.eos_token_ids, engine.device)
    result = {}
    t = time.perf_counter()
    compiler.compile(SamplingParams(regex="x").constraint).result()
    result["first_compile_with_tokenizer_table_s"] = time.perf_counter() - t
    for name, schema in SCHEMAS.items():
        constraint = SamplingParams(json_schema=schema).constraint
        t = time.perf_counter()
        compiler.compile(constraint).result()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        compiler.compile(constraint).result()
        result[name] = {"cold_ms": cold * 1e3, "cached_ms": (time.perf_counter() - t) * 1e3}
    compiler.close()
    return result


def mask_fill_ms(engine: Engine, batch: int, repeats: int = 20) -> float:
    """Host time to build a batch's bitmask, every row inside LONG_TEXT's string."""
    sampling = SamplingParams(json_schema=LONG_TEXT)
    compiled = engine.grammars.compile(sampling.constraint)
    prefix = engine.tokenizer.encode('{"text": "Once upon', add_special_tokens=False)
    requests = []
    for i in range(batch):
        req = Request(f"mask-{i}", prefix, sampling)
        req.grammar = RequestGrammar(compiled)
        assert all(req.grammar.accept(t) for t in prefix)
        requests.append(req)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.grammars.mask(requests)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp)
    card = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    log = {"card": card, "model": engine.model_name, "date": time.strftime("%Y-%m-%d"),
           "context": args.context, "compile": compile_times(engine)}
    print(json.dumps(log), flush=True)
    plain = SamplingParams(max_tokens=400, temperature=0.8, ignore_eos=True)
    constrained = SamplingParams(max_tokens=400, temperature=0.8, json_schema=LONG_TEXT)
    rows = []
    for batch in args.batches:
        row = {"batch": batch}
        for name, sampling, overlap in (("none_overlap", plain, True), ("none_plain", plain, False),
                                        ("json", constrained, True)):
            engine.overlap = overlap
            row[name + "_ms"] = decode_latency(engine, batch, args.context, sampling=sampling) * 1e3
        row["mask_fill_ms"] = mask_fill_ms(engine, batch)
        row["json_vs_none"] = row["json_ms"] / row["none_overlap_ms"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    log["decode"] = rows
    print("\nbatch | none, overlapped | none, plain steps | JSON | JSON vs none | bitmask fill (host)")
    for r in rows:
        print(f"{r['batch']:5d} | {r['none_overlap_ms']:8.2f} ms | {r['none_plain_ms']:8.2f} ms | "
              f"{r['json_ms']:8.2f} ms | {r['json_vs_none'] * 100:+6.1f}% | {r['mask_fill_ms']:6.2f} ms")
    print("compile:", json.dumps(log["compile"]))
    engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
