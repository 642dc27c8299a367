"""`lightllm-nb generate` streams one answer; `lightllm-nb demo` shows continuous batching at work."""

from __future__ import annotations

import argparse
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
                  page_size=args.page_size, scheduler=args.scheduler)


def _sampling(args):
    from .sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)


def cmd_generate(args) -> int:
    with _engine(args) as engine:
        sampling = _sampling(args)
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
    with _engine(args) as engine:
        steps = []
        engine.subscribe(steps.append)
        prompts = [engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
        results = engine.generate(prompt_token_ids=prompts, sampling=_sampling(args), progress=False)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightllm-nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("generate", "stream the answer to one prompt"),
                           ("demo", "run concurrent requests on the demo model and show each step")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default="demo", help="'demo', a .gguf file or a Hugging Face model folder")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--kv-tokens", type=int, default=None)
        p.add_argument("--page-size", type=int, default=1)
        p.add_argument("--scheduler", default="past_future",
                       choices=["past_future", "conservative", "aggressive"])
        p.add_argument("--max-tokens", type=int, default=64 if name == "demo" else 256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
    gen = sub.choices["generate"]
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sampling_params import InvalidRequestError

    try:
        return {"generate": cmd_generate, "demo": cmd_demo}[args.command](args)
    except (InvalidRequestError, FileNotFoundError, ValueError) as err:
        print(f"lightllm-nb: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
