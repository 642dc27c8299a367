"""`lightllm-nb generate` streams one answer; `lightllm-nb demo` shows continuous batching at work;
`lightllm-nb serve` is the engine host (HTTP: native, OpenAI-compatible, /metrics)."""

from __future__ import annotations

import argparse
import os
import sys

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Explain in one sentence what a GPU is.",
    "Give me a tip for learning Python.",
]


def _engine(args):
    from .engine.engine import Engine

    return Engine(args.model, device=args.device, dtype=args.dtype, kv_tokens=args.kv_tokens,
                  page_size=args.page_size, scheduler=args.scheduler, tp=args.tp)


def _sampling(args):
    from .sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)


def cmd_generate(args) -> int:
    sampling = _sampling(args)  # a bad --max-tokens is reported before the slow model load
    with _engine(args) as engine:
        if args.raw or not getattr(engine.tokenizer, "chat_template", None):
            stream = engine.stream(args.prompt, sampling)
        else:
            ids = engine.chat_prompt_ids([{"role": "user", "content": args.prompt}])
            stream = engine.stream(prompt_token_ids=ids, sampling=sampling)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
    return 0


def cmd_demo(args) -> int:
    sampling = _sampling(args)
    with _engine(args) as engine:
        steps = []
        engine.subscribe(steps.append)
        prompts = [engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
        results = engine.generate(prompt_token_ids=prompts, sampling=sampling, progress=False)
        for question, result in zip(DEMO_QUESTIONS, results):
            m = result.metrics
            print(f"\n>>> {question}\n{result.text.strip()}\n    [{result.completion_tokens} tokens, "
                  f"{result.finish_reason}, first token after {m['time_to_first_token'] * 1000:.0f} ms, "
                  f"{m['time_per_output_token'] * 1000 if m['time_per_output_token'] else 0:.0f} ms/token]")
        print(f"\nPer step ({len(steps)} steps; KV is token-level, page_size={engine.pool.page_size}):")
        shown = steps if len(steps) <= 12 else steps[:6] + steps[-6:]
        for i, event in enumerate(shown):
            if len(steps) > 12 and i == 6:
                print(f"  ... {len(steps) - 12} more steps ...")
            print("  " + event.summary())
        tokens = sum(r.completion_tokens for r in results)
        wall = sum(e.duration for e in steps)
        peak = max(len(e.rows) for e in steps)
        print(f"\n{len(results)} requests, {tokens} output tokens in {wall:.1f} s ({tokens / wall:.1f} tok/s), "
              f"up to {peak} requests per step. Engine: {engine.stats()['kernels']} kernels on "
              f"{engine.stats()['device']}, {engine.stats()['dtype']}.")
    return 0


# What the engine's batch-limit errors call its arguments, on each command line.
ENGINE_FLAGS = {
    "serve": {"max_running": "--max-num-seqs", "max_batch_tokens": "--max-num-batched-tokens",
              "kv_tokens": "--kv-tokens", "page_size": "--block-size"},
    "generate": {"kv_tokens": "--kv-tokens", "page_size": "--page-size"},
    "demo": {"kv_tokens": "--kv-tokens", "page_size": "--page-size"},
}


def cmd_serve(args) -> int:
    from .engine.arguments import check_batch_limits
    from .serving.host import api_server_count, configure_logging, run_host

    # Before keys, sockets and the model: what the pool's size cannot tell is refused at once.
    check_batch_limits(args.max_num_seqs, args.max_num_batched_tokens, kv_tokens=args.kv_tokens,
                       page_size=args.block_size)
    configure_logging(args.log_level)
    args.api_server_count = api_server_count(args.api_server_count)
    return run_host(args, lambda: _serving_engine(args))


def _serving_engine(args):
    from .engine.engine import Engine
    from .kv.cache_scope import read_shared_prefixes

    # Batch limits left unset are the engine's to choose from the device and the model.
    limits = {name: value for name, value in (("max_running", args.max_num_seqs),
                                              ("max_batch_tokens", args.max_num_batched_tokens)) if value}
    return Engine(args.model, device=args.device, dtype=args.dtype, kv_tokens=args.kv_tokens,
                  page_size=args.block_size, scheduler=args.scheduler, prefix_cache=args.enable_prefix_caching,
                  max_running_per_user=args.max_running_per_user, seed=args.seed,
                  kv_memory_fraction=args.gpu_memory_utilization, cuda_graphs=not args.enforce_eager, **limits,
                  prefix_cache_scope=args.prefix_cache_scope, tp=args.tp,
                  shared_prefixes=read_shared_prefixes(args.shared_prefixes) if args.shared_prefixes else None)


def _checked(kind, low=None, high=None, low_open=False):
    """An argparse type that rejects out-of-range values at parse time, before any model loads."""
    def parse(text: str):
        value = kind(text)
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is too small: it must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is too large: it must be <= {high}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _api_server_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _checked(int, 0)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give 'auto' or a number >= 0") from None


def _existing_file(text: str) -> str:
    if not os.path.isfile(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file: check the path")
    return text


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo', a .gguf file or a Hugging Face model folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "float64"],
                   help="weight and KV dtype (auto: float32 on CPU, the checkpoint's half type on GPU)")
    p.add_argument("--kv-tokens", type=_checked(int, 1), default=None,
                   help="KV cache size in tokens (default: a share of free GPU memory, 1 GiB on CPU)")
    p.add_argument("--scheduler", default="past_future", choices=["past_future", "conservative", "aggressive"],
                   help="admission policy")
    p.add_argument("--tp", type=_checked(int, 1), default=1,
                   help="tensor parallelism: spread the model over this many GPUs (CPU processes on the CPU)")


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=_checked(int, 1), default=max_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=_checked(float, 0), default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=_checked(float, 0, 1, low_open=True), default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=_checked(int, 0), default=None, help="sampling seed (default: random)")


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_checked(int, 0, 65535), default=8000, help="TCP port (0 picks a free one)")
    p.add_argument("--uds", default=None, help="listen on this Unix socket instead of TCP")
    p.add_argument("--api-key", default=None,
                   help="the operator's bearer token (sees every user); also from $LIGHTLLM_API_KEY. Without "
                        "any key or tokens file one is generated and written, mode 0600, to a file whose path "
                        "is printed")
    p.add_argument("--api-key-file", type=_existing_file, default=None, help="read the operator's key from this file")
    p.add_argument("--tokens-file", type=_existing_file, default=None,
                   help='JSON {"<token>": {"user": "alice"}, "<token>": {"user": "hub", "role": "proxy"}}')
    p.add_argument("--hub", action="store_true",
                   help="run as a JupyterHub service: callers are Hub users, known by their Hub token "
                        "(needs JUPYTERHUB_API_URL and JUPYTERHUB_SERVICE_NAME)")
    p.add_argument("--served-model-name", default=None, help="the model name the API reports (default: --model)")
    p.add_argument("--block-size", type=_checked(int, 1), default=1, help="KV page size in tokens (1: token-level)")
    p.add_argument("--max-num-seqs", type=_checked(int, 1), default=None,
                   help="most requests in a batch, at most 65536 and the KV cache's pages (default: on a GPU "
                        "the KV tokens / 1024, a power of two in [8, 256]; on the CPU --max-num-batched-tokens / "
                        "8, at most the KV tokens / 256, in [4, 128]; /api/stats shows the value)")
    p.add_argument("--max-num-batched-tokens", type=_checked(int, 1), default=None,
                   help="most tokens in a step, at least --max-num-seqs (default: on a GPU 32 per running request "
                        "in [2048, 16384]; on the CPU what its cores prefill in about a second, so that a long "
                        "prompt stalls other streams briefly: 256 for the demo model on 2 cores, in [16, 2048])")
    p.add_argument("--gpu-memory-utilization", type=_checked(float, 0, 1, low_open=True), default=0.85,
                   help="share of free GPU memory the KV cache may take")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of shared prompt prefixes")
    p.add_argument("--prefix-cache-scope", default="user", choices=["user", "shared"],
                   help="whose cached prefixes a request may reuse: 'user' (its own user's only, so no user can "
                        "time what another sent) or 'shared' (everyone's: faster, but a user can tell whether "
                        "someone sent a guessed prompt)")
    p.add_argument("--shared-prefixes", type=_existing_file, default=None,
                   help='JSON list of prefixes all users reuse under the "user" scope (a course\'s system '
                        'prompt): text, token ids or {"messages": [...]}')
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=_checked(int, 0), default=None, help="engine sampling seed (default: random)")
    p.add_argument("--max-running-per-user", type=_checked(int, 1), default=None,
                   help="most running requests of one user (default: no cap)")
    p.add_argument("--max-waiting", type=_checked(int, 1), default=4096, help="most queued requests in all")
    p.add_argument("--max-waiting-per-user", type=_checked(int, 1), default=1024, help="most queued requests per user")
    p.add_argument("--api-server-count", type=_api_server_count, default="auto",
                   help="HTTP front-end processes joined to the engine's process by zmq; 0: the front end runs in "
                        "the engine's process; auto: 2 on a host with 8+ cores (on an H200 host 2 served 1.35x the "
                        "embedded engine's tok/s, 0 only 0.72x: one process's GIL), else 0 (on 2 cores the extra "
                        "processes take the step's CPU)")
    p.add_argument("--shutdown-timeout", type=_checked(float, 0), default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (info: one line per request)")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightllm-nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _DefaultsHelp
    gen = sub.add_parser("generate", help="stream the answer to one prompt", formatter_class=fmt)
    gen.add_argument("prompt", help="the question or text to continue")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    demo = sub.add_parser("demo", help="run concurrent requests on the demo model and show each step",
                          formatter_class=fmt)
    for p, max_tokens in ((gen, 256), (demo, 64)):
        _add_engine_options(p)
        p.add_argument("--page-size", type=_checked(int, 1), default=1, help="KV page size in tokens")
        _add_sampling_options(p, max_tokens)
    serve = sub.add_parser("serve", help="the engine host: native, OpenAI-compatible and /metrics HTTP API",
                           formatter_class=fmt)
    _add_engine_options(serve)
    _add_serve_options(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sampling_params import InvalidRequestError
    from .serving.auth import AuthSetupError
    from .serving.hub_auth import HubAuthError

    try:
        return {"generate": cmd_generate, "demo": cmd_demo, "serve": cmd_serve}[args.command](args)
    except (InvalidRequestError, AuthSetupError, HubAuthError, FileNotFoundError, ValueError, OSError) as err:
        print(f"lightllm-nb: error: {_in_flags(err, args.command)}", file=sys.stderr)
        return 2


def _in_flags(err: Exception, command: str) -> str:
    """The error, with the engine's arguments called by this command's flags."""
    from .engine.arguments import BatchLimitError

    return err.naming(ENGINE_FLAGS[command]) if isinstance(err, BatchLimitError) else str(err)


if __name__ == "__main__":
    sys.exit(main())
