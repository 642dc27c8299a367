"""What isolating users in the prefix cache costs, and what it buys (issue 15).

Workload (default): a class of `--users` users share one system prompt of `--system-tokens`
tokens; each asks `--rounds` questions of `--question-tokens` tokens, one after the other (a closed
loop: the next question goes in when the answer is back), answers `--output-tokens` long. Run
three times on a fresh engine each: scope "user", "user" with the system prompt declared shared, and
"shared". Prints TTFT p50/p90, output tokens/s and the prompt tokens actually computed.

    python bench/prefix_isolation.py                        # CPU, demo model, sizes scaled down
    python bench/prefix_isolation.py --shape llama-1b --tokenizer DIR \\
        --users 64 --system-tokens 1024 --question-tokens 200 --output-tokens 64   # GPU, random weights

`--serve` measures the side channel instead, through a real `lightllm-nb serve` with two API keys:
alice caches a secret prompt, then bob sends the same prompt (a correct guess) and a fresh prompt
of the same length; bob's TTFT on each, medians over `--probes`, under --prefix-cache-scope user
and shared. Prompts are random token ids, so lengths are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lightllm_nb import Engine, SamplingParams

SCOPES = {"user": dict(prefix_cache_scope="user"),
          "user+declared": dict(prefix_cache_scope="user", declare=True),
          "shared": dict(prefix_cache_scope="shared")}


def make_engine(args, scope: str, system: list[int]) -> Engine:
    settings = dict(SCOPES[scope])
    declared = [system] if settings.pop("declare", False) else None
    if args.shape:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from roofline import SHAPES
        from engine_timing import random_checkpoint
        from transformers import AutoTokenizer

        ckpt, _ = random_checkpoint(dict(SHAPES[args.shape], _shape=args.shape),
                                    AutoTokenizer.from_pretrained(args.tokenizer))
        return Engine(ckpt, dtype="bfloat16", shared_prefixes=declared, progress=False, **settings)
    return Engine("demo", device=args.device, kv_tokens=args.kv_tokens, shared_prefixes=declared,
                  progress=False, **settings)


def run_class(engine: Engine, args, system: list[int]) -> dict:
    """The closed-loop class on one engine; figures of the measured run (after a warm-up)."""
    rng = random.Random(args.seed)
    vocab = min(engine.config.vocab_size, 30000)
    sampling = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    # Driven step by step from this thread (no driver loop), so the closed loop reacts at once.
    engine.add_request(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(64)], sampling=sampling,
                       user="warm-up")
    while engine.has_unfinished():
        engine.step()
    engine.clear_prefix_cache()
    prefill = []
    unsubscribe = engine.subscribe(lambda e: prefill.append(e.prefill_tokens))

    def ask(user: int) -> str:
        question = [rng.randrange(3, vocab) for _ in range(args.question_tokens)]
        return engine.add_request(prompt_token_ids=system + question, sampling=sampling, user=f"student-{user}")

    left = {user: args.rounds - 1 for user in range(args.users)}
    owner = {ask(user): user for user in range(args.users)}
    done = []
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done.append(out.completion)
                user = owner.pop(out.request_id)
                if left[user]:
                    left[user] -= 1
                    owner[ask(user)] = user
    wall = time.perf_counter() - start
    unsubscribe()
    ttft = sorted(c.metrics["time_to_first_token"] for c in done)
    return {"requests": len(done), "wall_s": wall, "output_tok_s": sum(len(c.token_ids) for c in done) / wall,
            "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2], "ttft_p90_ms": 1e3 * ttft[int(len(ttft) * 0.9)],
            "prompt_tokens": sum(c.prompt_tokens for c in done), "computed_prompt_tokens": sum(prefill),
            "cached_tokens": sum(c.metrics["cached_tokens"] for c in done)}


def workload(args) -> dict:
    system = [random.Random(args.seed + 1).randrange(3, 30000) for _ in range(args.system_tokens)]
    log = {"date": time.strftime("%Y-%m-%d"), "users": args.users, "rounds": args.rounds, "repeats": args.repeats,
           "system_tokens": args.system_tokens, "question_tokens": args.question_tokens,
           "output_tokens": args.output_tokens, "runs": {}}
    for scope in SCOPES:
        with make_engine(args, scope, system) as engine:
            log["model"], log["device"] = engine.model_name, str(engine.device)
            # The run of median wall time: a loaded machine's noise, not the scope, moves the others.
            runs = sorted((run_class(engine, args, system) for _ in range(args.repeats)), key=lambda r: r["wall_s"])
            log["runs"][scope] = runs[len(runs) // 2]
        print(json.dumps({scope: log["runs"][scope]}), flush=True)
    shared = log["runs"]["shared"]["output_tok_s"]
    print(f"\n{log['model']} on {log['device']}: {args.users} users x {args.rounds} questions, system prompt "
          f"{args.system_tokens} tokens, questions {args.question_tokens}, answers {args.output_tokens}\n")
    print("| scope | TTFT p50 ms | TTFT p90 ms | output tok/s | of shared | prompt tokens computed | reused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scope, r in log["runs"].items():
        print(f"| {scope} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['output_tok_s']:.1f} | "
              f"{r['output_tok_s'] / shared:.2f} | {r['computed_prompt_tokens']} of {r['prompt_tokens']} | "
              f"{r['cached_tokens']} |")
    return log


# ---- the side channel through a real server ----------------------------------------------------
ALICE, BOB = "alice-key-0001", "bob-key-00002"
def start_server(args, scope: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({ALICE: {"user": "alice"}, BOB: {"user": "bob"}}))
    cmd = [sys.executable, "-m", "lightllm_nb.cli", "serve", "--model", "demo", "--device", args.device, "--port",
           "0", "--api-key", "operator-key", "--tokens-file", str(tokens), "--prefix-cache-scope", scope,
           "--log-level", "warning"] + (["--kv-tokens", str(args.kv_tokens)] if args.kv_tokens else [])
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    said = []
    for line in server.stdout:
        said.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return server, found.group(1)
    raise RuntimeError(f"lightllm-nb serve exited with {server.wait()} before listening:\n" + "".join(said))


def timed_generate(url: str, key: str, prompt: list[int]) -> tuple[float, int]:
    """Client-side seconds to the one-token answer (what a probing user sees), and cached tokens."""
    body = json.dumps({"prompt_token_ids": prompt, "stream": False, "sampling": {"max_tokens": 1}}).encode()
    req = urllib.request.Request(url + "/api/generate", body, {"Authorization": f"Bearer {key}",
                                                                "Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as response:
        completion = json.loads(response.read())
    return time.perf_counter() - start, completion["metrics"]["cached_tokens"]


def side_channel(args) -> dict:
    rng = random.Random(args.seed)
    log = {"date": time.strftime("%Y-%m-%d"), "prompt_tokens": args.probe_tokens, "probes": args.probes}
    for scope in ("user", "shared"):
        with tempfile.TemporaryDirectory() as tmp:
            server, url = start_server(args, scope, Path(tmp))
            try:
                rows = {"guessed": [], "fresh": [], "guessed_cached": [], "fresh_cached": []}
                timed_generate(url, BOB, [rng.randrange(3, 30000) for _ in range(32)])  # warm-up
                for _ in range(args.probes):
                    secret, fresh = ([rng.randrange(3, 30000) for _ in range(args.probe_tokens)] for _ in range(2))
                    timed_generate(url, ALICE, secret)
                    for name, prompt in (("guessed", secret), ("fresh", fresh)):
                        seconds, cached = timed_generate(url, BOB, prompt)
                        rows[name].append(seconds)
                        rows[name + "_cached"].append(cached)
            finally:
                server.terminate()
                server.wait(60)
        log[scope] = {"guessed_ms": 1e3 * statistics.median(rows["guessed"]),
                      "fresh_ms": 1e3 * statistics.median(rows["fresh"]),
                      "guessed_cached_tokens": max(rows["guessed_cached"]),
                      "fresh_cached_tokens": max(rows["fresh_cached"])}
        print(json.dumps({scope: log[scope]}), flush=True)
    print(f"\nbob's time to a one-token answer, median of {args.probes}, prompts of {args.probe_tokens} tokens\n")
    print("| scope | alice's prompt (guessed) ms | fresh prompt ms | guessed / fresh | cached tokens (guessed) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for scope in ("user", "shared"):
        r = log[scope]
        print(f"| {scope} | {r['guessed_ms']:.1f} | {r['fresh_ms']:.1f} | {r['guessed_ms'] / r['fresh_ms']:.2f} | "
              f"{r['guessed_cached_tokens']} |")
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None, help="random weights of this shape on the GPU (see roofline.py)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shape")
    parser.add_argument("--device", default="cpu", help="for the demo model")
    parser.add_argument("--kv-tokens", type=int, default=None, help="KV pool size (default: the engine's)")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="questions per user, one after the other")
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--serve", action="store_true", help="measure the side channel through lightllm-nb serve")
    parser.add_argument("--probe-tokens", type=int, default=512)
    parser.add_argument("--probes", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=1, help="runs per scope (the median is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.shape and not args.tokenizer:
        parser.error("--shape needs --tokenizer DIR (random weights come without one)")
    log = side_channel(args) if args.serve else workload(args)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
