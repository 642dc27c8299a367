"""Serving benchmark: the same requests through `lightllm-nb serve` (streaming HTTP clients) and
through the embedded engine in one process (asyncio tasks on a DriverLoop).

    python bench/serving.py --model demo --device cpu -n 32 -p 64 -o 16 -c 8          # CPU
    python bench/serving.py --shape llama-1b --tokenizer DIR -n 1024 -p 512 -o 128 -c 256   # GPU

N requests of P random prompt tokens and exactly O output tokens (ignore_eos) are sent by C
closed-loop clients: each sends its next request when its last one finished. HTTP clients are
raw asyncio streams split over a few processes, so the load generator never is the bottleneck.
`--shape` serves random bf16 weights of that shape, saved as a Hugging Face folder (CUDA only).
`--api-server-count N` runs serve's HTTP front end in N processes of its own (0: in the engine's).
Prints output tok/s, TTFT and TPOT p50/p99 per path, and the HTTP/embedded ratio, as a table last,
and the serve process's CPU per streamed token: main thread, other threads, API server processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_KEY = "bench-key-0123456789"


# ---- the requests and their figures ----------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct random prompts (no shared prefix: the prefix cache must not flatter either path)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1000, min(vocab, 30000), size=(n, length)).tolist()


def summarize(records: list[dict], wall: float) -> dict:
    """records: {"sent", "first", "end", "tokens"} per request, monotonic seconds."""
    tokens = sum(r["tokens"] for r in records)
    ttft = np.array([r["first"] - r["sent"] for r in records])
    tpot = np.array([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1])
    ms = lambda a, q: float(np.percentile(a, q) * 1e3) if len(a) else float("nan")  # noqa: E731
    return {"requests": len(records), "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "tpot_p50_ms": ms(tpot, 50),
            "tpot_p99_ms": ms(tpot, 99)}


# ---- embedded: asyncio tasks on a DriverLoop in this process -------------------------------
def run_embedded(model, warm, prompts, output_len: int, clients: int, engine_kwargs: dict) -> dict:
    import torch

    from lightllm_nb import Engine, SamplingParams
    from lightllm_nb.serving.driver import DriverLoop

    engine = Engine(model, **engine_kwargs)
    loop = DriverLoop(engine)
    sampling = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    async def one(ids, record):
        record["sent"] = time.monotonic()
        async for out in loop.submit(ids, sampling, user="bench", stream_text=True):
            if out.new_token_ids and "first" not in record:
                record["first"] = time.monotonic()
            record["tokens"] += len(out.new_token_ids)
        record["end"] = time.monotonic()

    async def closed_loop(batch):
        queue = list(enumerate(batch))[::-1]
        records = [{"tokens": 0} for _ in batch]

        async def client():
            while queue:
                i, ids = queue.pop()
                await one(ids, records[i])
        await asyncio.gather(*(client() for _ in range(clients)))
        return records

    asyncio.run(closed_loop(warm))
    started = time.monotonic()
    records = asyncio.run(closed_loop(prompts))
    result = summarize(records, time.monotonic() - started)
    loop.shutdown()
    engine.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ---- HTTP: raw asyncio streams to `lightllm-nb serve` ----------------------------------------
async def _stream_one(reader, writer, host: str, body: bytes, record: dict) -> None:
    writer.write(f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {BENCH_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    record["sent"] = time.monotonic()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"serve answered {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    while True:  # chunked transfer: one chunk per flush, each holding one or more SSE records
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: "):
                out = json.loads(line[6:])
                if out["token_ids"] and "first" not in record:
                    record["first"] = time.monotonic()
                record["tokens"] += len(out["token_ids"])
                if out["finished"]:
                    record["end"] = time.monotonic()


def _http_worker(args) -> list[dict]:
    """One load-generator process: `clients` closed-loop connections over its share of prompts."""
    host, port, prompts, output_len, clients = args

    async def main():
        queue = list(enumerate(prompts))[::-1]
        records = [{"tokens": 0} for _ in prompts]

        async def client():
            reader, writer = await asyncio.open_connection(host, port)
            while queue:
                i, ids = queue.pop()
                body = json.dumps({"prompt_token_ids": ids, "stream": True, "sampling": {
                    "max_tokens": output_len, "temperature": 0, "ignore_eos": True}}).encode()
                await _stream_one(reader, writer, f"{host}:{port}", body, records[i])
            writer.close()
        await asyncio.gather(*(client() for _ in range(clients)))
        return records
    return asyncio.run(main())


def run_http_load(host: str, port: int, prompts, output_len: int, clients: int, procs: int) -> tuple[list, float]:
    procs = max(1, min(procs, clients))
    shares = [(host, port, prompts[i::procs], output_len, clients // procs + (i < clients % procs))
              for i in range(procs)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        started = time.monotonic()
        parts = pool.map(_http_worker, shares)
        wall = time.monotonic() - started
    return [r for part in parts for r in part], wall


def start_serve(model: str, serve_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "lightllm_nb.cli", "serve", "--model", model, "--port", "0",
           "--api-key", BENCH_KEY, *serve_args]
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        m = re.search(r"listening on http://([\d.]+):(\d+)", log_path.read_text())
        if m:
            return process, m.group(1), int(m.group(2))
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("lightllm-nb serve did not start:\n" + log_path.read_text()[-3000:])


def _cpu_seconds(stat_path: Path) -> float:
    try:
        stat = stat_path.read_text()
    except OSError:  # it ended meanwhile
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the serve process, from /proc (Linux): its main thread (the
    IOLoop in one process), its other threads (the step loop, torch's), those again by thread name
    (`lightllm-driver` steps, with the OpenMP workers it started on a CPU; `ZMQbg/*` are zmq's I/O;
    unnamed ones carry the process's name) and its
    child processes (the API servers of --api-server-count)."""
    main = _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name != str(pid):
            try:
                name = (task / "comm").read_text().strip()
            except OSError:  # it ended meanwhile
                continue
            by_name["  " + name] = by_name.get("  " + name, 0.0) + _cpu_seconds(task / "stat")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {"main thread": main, "other threads": sum(by_name.values()),
            "API server processes": sum(_cpu_seconds(Path(f"/proc/{child}/stat")) for child in children),
            **by_name}


def run_http(model: str, warm, prompts, output_len: int, clients: int, serve_args: list[str], procs: int,
             log_path: Path) -> dict:
    process, host, port = start_serve(model, serve_args, log_path)
    try:
        run_http_load(host, port, warm, output_len, min(clients, len(warm)), 1)
        before = serve_cpu_seconds(process.pid)
        records, wall = run_http_load(host, port, prompts, output_len, clients, procs)
        after = serve_cpu_seconds(process.pid)
    finally:
        process.terminate()
        code = process.wait(120)
    if code != 0:
        raise RuntimeError(f"serve exited {code}:\n" + log_path.read_text()[-3000:])
    result = summarize(records, wall)
    result["serve_cpu_us_per_token"] = {name.strip(): round((after[name] - before.get(name, 0.0))
                                                            / result["output_tokens"] * 1e6, 1) for name in after}
    return result


# ---- the model -------------------------------------------------------------------------------
def write_random_model(shape: str, tokenizer_dir: str, folder: Path) -> None:
    """Random bf16 weights of a real shape as a Hugging Face folder that `serve --model` loads."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from roofline import SHAPES
    from throughput import random_checkpoint

    config = dict(SHAPES[shape], _shape=shape)
    _, tensors = random_checkpoint(config, None)
    save_file({name: t.cpu() for name, t in tensors.items()}, folder / "model.safetensors")
    del config["_shape"]
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"],
                                                    "torch_dtype": "bfloat16"}))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def print_table(log: dict) -> None:
    print(f"\n{log['device']} | {log['model']} | {log['requests']} requests, {log['prompt_len']} in / "
          f"{log['output_len']} out, {log['clients']} clients, --api-server-count {log['api_server_count']} | "
          f"{log['date']}")
    print(f"{'path':<10} {'out tok/s':>10} {'TTFT p50':>10} {'TTFT p99':>10} {'TPOT p50':>10} {'TPOT p99':>10}")
    for path in ("embedded", "http"):
        if path in log:
            r = log[path]
            print(f"{path:<10} {r['output_tok_s']:>10.1f} {r['ttft_p50_ms']:>8.1f}ms {r['ttft_p99_ms']:>8.1f}ms "
                  f"{r['tpot_p50_ms']:>8.1f}ms {r['tpot_p99_ms']:>8.1f}ms")
    if "embedded" in log and "http" in log:
        print(f"HTTP keeps {log['http']['output_tok_s'] / log['embedded']['output_tok_s']:.1%} of the embedded "
              "throughput")
    if "http" in log:
        print("serve CPU per streamed token:",
              ", ".join(f"{name} {us:.0f} us" for name, us in log["http"]["serve_cpu_us_per_token"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what `serve --model` takes (ignored with --shape)")
    parser.add_argument("--shape", default=None, help="random weights of this shape (bench/roofline.SHAPES)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-n", "--requests", type=int, default=32)
    parser.add_argument("-p", "--prompt-len", type=int, default=64)
    parser.add_argument("-o", "--output-len", type=int, default=16)
    parser.add_argument("-c", "--clients", type=int, default=8)
    parser.add_argument("--client-procs", type=int, default=4, help="load-generator processes for HTTP")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before measuring, per path")
    parser.add_argument("--paths", default="http,embedded")
    parser.add_argument("--api-server-count", type=int, default=0,
                        help="serve's HTTP front-end processes (0: in the engine's process)")
    parser.add_argument("--out", default=None, help="write the log as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = args.model
    if args.shape:
        model = str(work / "model")
        Path(model).mkdir()
        write_random_model(args.shape, args.tokenizer, Path(model))
    engine_kwargs = {"device": args.device, "seed": 0, "progress": False}
    serve_args = ["--device", args.device, "--seed", "0", "--log-level", "warning"]
    serve_args += ["--api-server-count", str(args.api_server_count)]  # given: serve's default depends on the cores
    for flag, key, value in (("--max-num-seqs", "max_running", args.max_num_seqs),
                             ("--max-num-batched-tokens", "max_batch_tokens", args.max_num_batched_tokens),
                             ("--kv-tokens", "kv_tokens", args.kv_tokens)):
        if value is not None:
            engine_kwargs[key] = value
            serve_args += [flag, str(value)]
    from lightllm_nb.loading import load_checkpoint

    vocab = len(load_checkpoint(model).tokenizer)
    prompts = make_prompts(args.requests + args.warmup, args.prompt_len, vocab)
    warm, measured = prompts[args.requests:], prompts[:args.requests]
    log = {"model": args.shape or args.model, "api_server_count": args.api_server_count,
           "requests": args.requests, "prompt_len": args.prompt_len,
           "output_len": args.output_len, "clients": args.clients, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}
    import torch

    log["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for path in args.paths.split(","):
        if path == "http":
            log["http"] = run_http(model, warm, measured, args.output_len, args.clients, serve_args,
                                   args.client_procs, work / "serve.log")
        else:
            log["embedded"] = run_embedded(model, warm, measured, args.output_len, args.clients, engine_kwargs)
        print(json.dumps({path: log[path]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))
    print_table(log)


if __name__ == "__main__":
    main()
