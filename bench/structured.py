"""GPU benchmark: what structured output costs a decode step, and what a grammar costs to compile.

    python bench/structured.py --device cuda --shape llama-1b --tokenizer DIR [--context 512] [--out FILE]
    python bench/structured.py --batches 1 4 --context 32          # CPU smoke run, tiny random Llama
    python bench/structured.py --host-only [--vocab 128256]         # the host side only, any machine

Decode-step time at batch 1, 32 and 128 with every request JSON-constrained against none, on one
engine (random bf16 weights of a real shape; the tokenizer is the real one, which is what a
grammar's masks depend on). Three configurations per batch:
  - none, overlapped: the engine's default on CUDA;
  - none, plain steps (overlap off): what a step costs when the host cannot hide behind the GPU;
  - json, overlapped: every request under a JSON schema whose one string field must run long
    (minLength), so random weights cannot finish it early and the batch stays full while it is
    timed. A constrained batch reads the previous tokens back after launching its forward and
    fills the mask while the GPU computes; its sampling waits for the mask.
Each configuration runs --repeats times, interleaved, and the table gives the median (one run's
batch-128 JSON step moved by ~10% between runs of the same code).
Then the compile time of the three test schemas, cold (a fresh compiler) and cached, and the host
side of a constrained step per batch: every row takes one token inside its JSON string and the
batch's mask is built (matchers advanced, rows filled), the engine's way against a same-process
baseline, the way the engine did it before (accept_token row by row on the step thread, a fresh
torch.full bitmask, xgrammar's BatchGrammarMatcher with min(8, torch threads) threads).
--host-only times just that (and the compiles) with a tokenizer, no model: --vocab pads the
logits' width as a model does (128256 for the Llama-3.2-1B shape); it also gives xgrammar's cost
per row on one thread (accept, fill), the process CPU time per mask (CPU / wall says how many
threads really ran at once), and with --sweep the mask at each mask-thread count and rows per thread.
--string free times a JSON string without minLength (a real schema's case). xgrammar's costs grow
with the ids past the tokenizer (each is a special id to it): the 1B shape pads the demo tokenizer's
49k ids to 128k, which made accept_token ~15x and a free string's fill ~40x dearer than at the
tokenizer's own width; the grammars now cover the tokenizer's ids only (grammar.grammar_width) and
the mask kernel forbids the padding. The baseline runs at that width too.
Prints JSON lines, and a table last.
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
from lightllm_nb.engine.mask_fill import ROWS_PER_THREAD  # noqa: E402
from lightllm_nb.loading import load_checkpoint  # noqa: E402
from lightllm_nb.scheduling.request import Request  # noqa: E402

LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 3000}},
             "required": ["text"]}
FREE_TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
STRINGS = {"long": LONG_TEXT, "free": FREE_TEXT}


def compile_times(tokenizer, vocab_size: int, stop_token_ids: list[int], device: torch.device) -> dict:
    """Seconds per schema: the first compile of a fresh compiler (its tokenizer table included),
    then each schema cold on that compiler, then cached (the same constraint again)."""
    compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids, device)
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


def inside_a_string(tokenizer, compiler: GrammarCompiler, schema: dict, batch: int):
    """`batch` requests whose grammars are inside the schema's "text" string, the tokens that took
    them there, a token that takes each one word further, and the compiled grammar."""
    sampling = SamplingParams(json_schema=schema)
    compiled = compiler.compile(sampling.constraint)
    prefix = tokenizer.encode('{"text": "Once upon', add_special_tokens=False)
    requests = []
    for i in range(batch):
        req = Request(f"mask-{i}", prefix, sampling)
        req.grammar = RequestGrammar(compiled)
        for t in prefix:
            req.grammar.accept(t)
        requests.append(req)
    compiler.mask(requests)  # the matchers consume the prefix
    return requests, prefix, tokenizer.encode(" time", add_special_tokens=False)[0], compiled.result().grammar


def grammar_host_ms(tokenizer, vocab_size: int, stop_token_ids: list[int], device: torch.device,
                    batch: int, rounds: int = 30, schema: dict = LONG_TEXT, mask_threads: int | None = None,
                    rows_per_thread: int = ROWS_PER_THREAD, baseline: bool = True) -> dict:
    """Median host time of a constrained step's grammar work, every row inside the schema's string
    taking one more token: the engine's (note the tokens, build the mask; its wall and process CPU
    time) and the baseline's."""
    import xgrammar as xgr

    compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids, device, mask_threads, rows_per_thread)
    requests, prefix, word, compiled = inside_a_string(tokenizer, compiler, schema, batch)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch if baseline else 0)]
    for matcher in matchers:
        assert all(matcher.accept_token(t) for t in prefix)
    xgrammar_batch = xgr.BatchGrammarMatcher(max(1, min(8, torch.get_num_threads())))

    def engine_way():
        for req in requests:
            req.grammar.accept(word)
        compiler.mask(requests)

    def baseline_way():
        assert all(matcher.accept_token(word) for matcher in matchers)
        bitmask = torch.full(xgr.get_bitmask_shape(batch, compiler.grammar_vocab), -1, dtype=torch.int32,
                             pin_memory=device.type == "cuda")
        xgrammar_batch.batch_fill_next_token_bitmask(matchers, bitmask, list(range(batch)))

    ways = (("engine", engine_way), ("baseline", baseline_way)) if baseline else (("engine", engine_way),)
    times: dict[str, list[float]] = {"engine_cpu": []}
    for _ in range(rounds):  # interleaved, so a busy moment of the machine hits both
        for name, way in ways:
            cpu, t = time.process_time(), time.perf_counter()
            way()
            times.setdefault(name, []).append(time.perf_counter() - t)
            if name == "engine":
                times["engine_cpu"].append(time.process_time() - cpu)
    compiler.close()
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def row_costs_us(tokenizer, vocab_size: int, stop_token_ids: list[int], schema: dict, rows: int = 64,
                 rounds: int = 20) -> dict:
    """xgrammar's own cost per row on one thread, inside the schema's string: accepting a token by
    id (the baseline's way) and by text (the engine's), filling a bitmask row."""
    import xgrammar as xgr

    compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids, torch.device("cpu"), mask_threads=1)
    requests, _, word, _ = inside_a_string(tokenizer, compiler, schema, rows)
    matchers = [r.grammar.matcher for r in requests]
    text = compiler._token_texts[word]
    bitmask = xgr.allocate_token_bitmask(rows, compiler.grammar_vocab)
    one_thread = xgr.BatchGrammarMatcher(1)
    times: dict[str, list[float]] = {"accept_by_id_us": [], "accept_by_text_us": [], "fill_us": []}
    for _ in range(rounds):
        for name, way in (("accept_by_id_us", lambda: all(m.accept_token(word) for m in matchers)),
                          ("accept_by_text_us", lambda: all(m.accept_string(text) for m in matchers)),
                          ("fill_us", lambda: one_thread.batch_fill_next_token_bitmask(
                              matchers, bitmask, list(range(rows))) is None)):
            t = time.perf_counter()
            assert way()
            times[name].append(time.perf_counter() - t)
    compiler.close()
    return {name: statistics.median(ts) / rows * 1e6 for name, ts in times.items()}


def host_only(args: argparse.Namespace) -> None:
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = load_checkpoint("demo").tokenizer
    vocab = args.vocab or len(tokenizer)
    stop, cpu, schema = [tokenizer.eos_token_id], torch.device("cpu"), STRINGS[args.string]
    log = {"host": "cpu", "torch_threads": torch.get_num_threads(), "vocab": vocab, "string": args.string,
           "date": time.strftime("%Y-%m-%d"), "compile": compile_times(tokenizer, vocab, stop, cpu),
           "per_row_one_thread": row_costs_us(tokenizer, vocab, stop, schema)}
    print(json.dumps(log), flush=True)
    rows = [dict(batch=batch, **grammar_host_ms(tokenizer, vocab, stop, cpu, batch, schema=schema))
            for batch in args.batches]
    for row in rows:
        print(json.dumps(row), flush=True)
    log["host_side"] = rows
    per_row = log["per_row_one_thread"]
    print(f"\nhost side of a constrained step, vocabulary {vocab}, {args.string} string, "
          f"{log['torch_threads']} torch threads; one thread, per row: accept by id / by text "
          f"{per_row['accept_by_id_us']:.1f} / {per_row['accept_by_text_us']:.1f} us, fill {per_row['fill_us']:.1f} us")
    print("batch | engine | its CPU / wall | baseline (before) | engine / baseline")
    for r in rows:
        print(f"{r['batch']:5d} | {r['engine']:7.3f} ms | {r['engine_cpu'] / r['engine']:4.1f} | "
              f"{r['baseline']:7.3f} ms | {r['engine'] / r['baseline']:5.2f}")
    if args.sweep:
        log["sweep"] = sweep(tokenizer, vocab, stop, schema, args.batches)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


def sweep(tokenizer, vocab: int, stop: list[int], schema: dict, batches: list[int]) -> list[dict]:
    """The engine's mask at each mask-thread count and rows per thread: what to set on this host."""
    rows = []
    print("\nmask threads x rows per thread: engine ms (CPU / wall) per batch", batches)
    for threads in (1, 2, 4, 8, 12):
        for per_thread in (8, 16, 32, 64):
            if threads == 1 and per_thread != ROWS_PER_THREAD:
                continue  # one thread whatever the batch
            row = {"mask_threads": threads, "rows_per_thread": per_thread}
            for batch in batches:
                ms = grammar_host_ms(tokenizer, vocab, stop, torch.device("cpu"), batch, schema=schema,
                                     mask_threads=threads, rows_per_thread=per_thread, baseline=False)
                row[f"b{batch}_ms"], row[f"b{batch}_cpu_ms"] = ms["engine"], ms["engine_cpu"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            print(f"{threads:3d} x {per_thread:3d} | " + " | ".join(
                f"{row[f'b{b}_ms']:7.3f} ms ({row[f'b{b}_cpu_ms'] / row[f'b{b}_ms']:3.1f})" for b in batches))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each mode at each batch (interleaved); the table gives their median")
    parser.add_argument("--out", default=None)
    parser.add_argument("--host-only", action="store_true", help="time the host side only, with a tokenizer")
    parser.add_argument("--vocab", type=int, default=None, help="--host-only: the logits' width (default: the tokenizer's)")
    parser.add_argument("--string", choices=sorted(STRINGS), default="long",
                        help="--host-only: inside a string with minLength (the GPU run's) or a free one")
    parser.add_argument("--sweep", action="store_true", help="--host-only: every mask-thread count and rows per thread")
    args = parser.parse_args()
    if args.host_only:
        host_only(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(args, tmp)
    card = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    log = {"card": card, "model": engine.model_name, "date": time.strftime("%Y-%m-%d"),
           "context": args.context,
           "compile": compile_times(engine.tokenizer, engine.config.vocab_size, engine.eos_token_ids, engine.device)}
    print(json.dumps(log), flush=True)
    plain = SamplingParams(max_tokens=400, temperature=0.8, ignore_eos=True)
    constrained = SamplingParams(max_tokens=400, temperature=0.8, json_schema=LONG_TEXT)
    rows = []
    for batch in args.batches:
        row = {"batch": batch}
        runs = {}
        for _ in range(args.repeats):  # the modes interleaved, so a slow moment of the host hits all of them
            for name, sampling, overlap in (("none_overlap", plain, True), ("none_plain", plain, False),
                                            ("json", constrained, True)):
                engine.overlap = overlap
                runs.setdefault(name, []).append(decode_latency(engine, batch, args.context, sampling=sampling) * 1e3)
        for name, times in runs.items():
            row[name + "_ms"], row[name + "_runs_ms"] = statistics.median(times), [round(t, 3) for t in times]
        host = grammar_host_ms(engine.tokenizer, engine.config.vocab_size, engine.eos_token_ids, engine.device, batch)
        row["grammar_host_ms"], row["grammar_host_before_ms"] = host["engine"], host["baseline"]
        row["json_vs_none"] = row["json_ms"] / row["none_overlap_ms"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    log["decode"] = rows
    print("\nbatch | none, overlapped | none, plain steps | JSON | JSON vs none | grammar host side (before)")
    for r in rows:
        print(f"{r['batch']:5d} | {r['none_overlap_ms']:8.2f} ms | {r['none_plain_ms']:8.2f} ms | "
              f"{r['json_ms']:8.2f} ms | {r['json_vs_none'] * 100:+6.1f}% | {r['grammar_host_ms']:6.2f} ms "
              f"({r['grammar_host_before_ms']:.2f} ms)")
    print("compile:", json.dumps(log["compile"]))
    engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
