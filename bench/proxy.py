"""Overhead of the Jupyter Server extension's proxy: the same concurrent streams sent to the engine
host directly and through `/lightllm/` on a Jupyter server, alternating, on one engine.

    python bench/proxy.py --device cpu --streams 64 --max-tokens 32        # the demo model on CPU
    python bench/proxy.py --device cuda --model /path/to/Llama-3.2-1B --streams 64 --max-tokens 256
    python bench/proxy.py --device cuda --shape llama-1b --tokenizer DIR --streams 64 --max-tokens 256
    python bench/proxy.py --stub-step-ms 3 --streams 64 --max-tokens 256      # the proxy alone, no model

Starts `jupyter server` with the extension (which starts `lightllm-nb serve`), then runs `--rounds`
pairs (direct, proxied) of `--streams` concurrent SSE streams and prints, for each path (median and
range over the rounds) and their difference: the time to the response head (the engine host sends
it once it has taken the request, so through the proxy the wait in the Jupyter server shows here),
TTFT p50/p99 and output tok/s. Then `--probes` lone streams, one at a time, the paths alternating:
the proxy's own latency per request, without a burst's queueing (64 requests at once wait in line
on the Jupyter server's one thread). `--shape` serves random bf16 weights of that shape
(bench/roofline.SHAPES), written as a Hugging Face folder with the tokenizer
from `--tokenizer` into a temporary directory (on the GPU: the weights are made there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import SHAPES  # noqa: E402

PROMPTS = ["Write a story about a lighthouse keeper.", "Explain how a GPU runs many threads at once.",
           "List ten fruits and their colors.", "Describe the water cycle in detail.",
           "What makes a good cup of tea?", "Summarize the history of the printing press."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stub_engine_host(sock: socket.socket, step_ms: float) -> None:
    """`POST /api/generate` as the engine host streams it (head at once, then `max_tokens` events of
    one token each), every stream's next event written on one shared tick every `step_ms`."""
    from tornado import web
    from tornado.httpserver import HTTPServer

    streaming: set[web.RequestHandler] = set()

    class Generate(web.RequestHandler):
        async def post(self) -> None:
            self.left = json.loads(self.request.body)["sampling"]["max_tokens"]
            self.ended = asyncio.get_running_loop().create_future()
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("X-Request-Id", secrets.token_hex(8))
            self.flush()
            streaming.add(self)
            await self.ended

        def on_connection_close(self) -> None:
            streaming.discard(self)
            if not self.ended.done():
                self.ended.set_result(None)

    async def step() -> None:
        while True:
            await asyncio.sleep(step_ms / 1000)
            for stream in list(streaming):
                stream.left -= 1
                event = {"text": "x", "token_ids": [stream.left], "finished": not stream.left}
                stream.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if stream.left:
                    stream.flush()
                else:
                    streaming.discard(stream)
                    stream.finish()
                    stream.ended.set_result(None)

    async def serve() -> None:
        HTTPServer(web.Application([(r"/api/generate", Generate)])).add_sockets([sock])
        await step()

    asyncio.run(serve())


def start_stub_engine_host(step_ms: float) -> tuple[multiprocessing.Process, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        sock.setblocking(False)
        process = multiprocessing.get_context("fork").Process(target=run_stub_engine_host, args=(sock, step_ms),
                                                              daemon=True)
        process.start()  # (the child has its own copy of the listening socket)
        return process, f"http://127.0.0.1:{sock.getsockname()[1]}"


def start_jupyter(workdir: Path, args) -> tuple[subprocess.Popen, str, str]:
    token, port = secrets.token_hex(16), free_port()
    config_dir = workdir / "config"
    config_dir.mkdir()
    # Only our extension: the bench measures our proxy, not other extensions' start-up work. Enabled
    # here too, for a checkout on PYTHONPATH that pip never installed (the GPU machine).
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"jupyter_lsp": False, "jupyter_server_terminals": False,
                                               "lightllm_nb.server_ext": True}}}))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"), "JUPYTER_CONFIG_DIR": str(config_dir)}
    command = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
               "--ServerApp.log_level=WARN"]
    if args.stub_url:
        command += [f"--LightLLM.engine_url={args.stub_url}", "--LightLLM.engine_token=stub"]
    else:
        command += [f"--LightLLM.model={args.model}", f"--LightLLM.device={args.device}"]
    log = open(workdir / "jupyter.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}", token


def wait_ready(url: str, token: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """The extension's status once its engine host is up. The log goes with the temporary directory,
    so a failure prints its end (on the GPU machine nothing else is left to read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"jupyter server exited:\n{log.read_text()[-4000:]}")
        try:
            status = httpx.get(f"{url}/lightllm/status", headers={"Authorization": f"token {token}"}).json()
            if status["state"] in ("ready", "external"):  # (external: the stub engine host)
                return status
            if status["state"] == "crashed":  # the supervisor would retry for ever; a bench should not
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"the engine host did not become ready:\n{log.read_text()[-4000:]}")


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """TTFT, tokens, and the time to the response head: the engine host sends it when it has taken the
    request, so through the proxy it is also how long the request waited in the Jupyter server."""
    body = {"prompt": prompt, "sampling": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
            "stream": True}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        head = time.perf_counter() - start
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("token_ids"):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                tokens += len(event["token_ids"])
    return ttft, tokens, head


async def run_batch(url: str, headers: dict, streams: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens)
                                         for i in range(streams)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"head_p50_ms": 1000 * statistics.median(r[2] for r in results),
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "tok_s": sum(r[1] for r in results) / wall}


def random_model_folder(shape: str, tokenizer: str, workdir: Path) -> str:
    """A Hugging Face folder of random bf16 weights of `shape`, made the way bench/serving.py makes it."""
    from serving import write_random_model

    folder = workdir / f"random-{shape}"
    folder.mkdir()
    write_random_model(shape, tokenizer, folder)
    return str(folder)


def spread(rounds: list[dict], key: str) -> str:
    values = [r[key] for r in rounds]
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux), not counting its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def direct_path(url: str, token: str, process: subprocess.Popen, workdir: Path, args) -> tuple[str, dict]:
    """Where and how the bench calls the engine host without the extension."""
    status = wait_ready(url, token, process, workdir / "jupyter.log")
    if args.stub_url:
        return f"{args.stub_url}/api/generate", {}
    tokens_file = next((workdir / "runtime").glob("lightllm-tokens-*.json"))
    proxy_token = next(iter(json.loads(tokens_file.read_text())))
    user = httpx.get(f"{url}/lightllm/api/stats", headers={"Authorization": f"token {token}"}).json()["user"]
    # The same engine user both ways, so both see the same prefix-cache scope and limits.
    return (f"{status['engine_url']}/api/generate",
            {"Authorization": f"Bearer {proxy_token}", "X-LightLLM-User": user["name"]})


def timed_batch(path: tuple[str, dict], args, jupyter_pid: int) -> dict:
    """One batch of streams, plus the Jupyter server's CPU time per stream: a cost of the proxy that
    a loaded machine does not blur (its wall-clock share of the cores is what it cannot control)."""
    before = cpu_seconds(jupyter_pid)
    result = asyncio.run(run_batch(*path, args.streams, args.max_tokens))
    return {**result, "jupyter_cpu_ms_per_stream": 1000 * (cpu_seconds(jupyter_pid) - before) / args.streams}


def latency_probes(paths: dict, probes: int) -> dict[str, list[float]]:
    """TTFT (ms) of `probes` lone streams per path, sent one after another, the paths alternating."""
    ttfts = {name: [] for name in paths}
    for _ in range(probes):
        for name, (target, headers) in paths.items():
            ttfts[name].append(asyncio.run(run_batch(target, headers, 1, 2))["ttft_p50_ms"])
    return ttfts


def overhead(direct: dict, proxied: dict) -> str:
    return (f"{proxied['head_p50_ms'] - direct['head_p50_ms']:+.1f} ms head p50, "
            f"{proxied['ttft_p50_ms'] - direct['ttft_p50_ms']:+.1f} ms TTFT p50, "
            f"{proxied['ttft_p99_ms'] - direct['ttft_p99_ms']:+.1f} ms p99, "
            f"{100 * (proxied['tok_s'] / direct['tok_s'] - 1):+.1f}% tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="what `serve --model` takes (ignored with --shape)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="random bf16 weights of this shape instead of --model (needs CUDA)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=16, help="lone streams per path for the per-request latency")
    parser.add_argument("--stub-step-ms", type=float, default=None, metavar="MS",
                        help="a stub engine host that writes every stream's next event each MS ms, instead of a model")
    args = parser.parse_args()
    args.stub_url = None
    if args.shape and (not args.tokenizer or args.device == "cpu"):
        parser.error("--shape needs --tokenizer DIR and a CUDA device (its random weights are made on the GPU)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            args.model = random_model_folder(args.shape, args.tokenizer, Path(tmp))
        stub = None
        if args.stub_step_ms is not None:
            stub, args.stub_url = start_stub_engine_host(args.stub_step_ms)
        process, url, token = start_jupyter(Path(tmp), args)
        try:
            paths = {"direct": direct_path(url, token, process, Path(tmp), args),
                     "extension": (f"{url}/lightllm/api/generate", {"Authorization": f"token {token}"})}
            for target, headers in paths.values():  # warm-up: first-call costs, caches, connection pools
                asyncio.run(run_batch(target, headers, args.streams, 4))
            runs = {name: [] for name in paths}
            for i in range(args.rounds):
                # ABBA order: a load that drifts during a round (other processes, caches) hits both paths alike.
                for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
                    runs[name].append(timed_batch(paths[name], args, process.pid))
                print(f"round {i + 1}: proxy adds {overhead(runs['direct'][-1], runs['extension'][-1])}", flush=True)
            probes = latency_probes(paths, args.probes)
        finally:
            process.terminate()
            process.wait(60)
            if stub is not None:
                stub.terminate()
    engine = (f"a stub engine host, one event per stream every {args.stub_step_ms} ms" if stub is not None
              else f"model {args.shape or args.model} on {args.device}")
    print(f"{args.streams} concurrent streams x {args.max_tokens} tokens, {engine}, {args.rounds} rounds each, "
          "interleaved (median [min-max] of rounds)")
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, rs in runs.items():
        print(f"  {name:9s}  head p50 {spread(rs, 'head_p50_ms')} ms  TTFT p50 {spread(rs, 'ttft_p50_ms')} ms  "
              f"p99 {spread(rs, 'ttft_p99_ms')} ms  {spread(rs, 'tok_s')} tok/s  "
              f"Jupyter server CPU {spread(rs, 'jupyter_cpu_ms_per_stream')} ms/stream")
    paired = [e["ttft_p50_ms"] - d["ttft_p50_ms"] for d, e in zip(runs["direct"], runs["extension"])]
    print(f"  proxy adds {overhead(summary['direct'], summary['extension'])} (medians); "
          f"TTFT p50 paired by round: median {statistics.median(paired):+.1f} ms")
    if args.probes:
        alone = [e - d for d, e in zip(probes["direct"], probes["extension"])]
        print(f"  1 stream at a time, {args.probes} each: direct TTFT {statistics.median(probes['direct']):.1f} ms, "
              f"extension {statistics.median(probes['extension']):.1f} ms: proxy adds "
              f"{statistics.median(alone):+.1f} ms per request (median of pairs)")


if __name__ == "__main__":
    main()
