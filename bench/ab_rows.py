"""A few of throughput.py's rows from one engine, in a few seconds: for A/B runs of two checkouts
in one device call, alternated (new, old, new, old), where the full bench takes a minute a run.

    python bench/ab_rows.py --tokenizer DIR [--shape llama-1b]

Decode-step latency (ms) at batch x context 1 x 512, 8 x 512, 32 x 2048, 128 x 512 and prefill
tok/s at 512 and 2048 tokens (median of 5), same measurements as throughput.py; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_timing import decode_latency, random_checkpoint  # noqa: E402
from roofline import SHAPES  # noqa: E402
from throughput import prefill_rate  # noqa: E402

from lightllm_nb import Engine  # noqa: E402

ROWS = ((1, 512), (8, 512), (32, 2048), (128, 512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    checkpoint, _ = random_checkpoint(dict(SHAPES[args.shape], _shape=args.shape),
                                      AutoTokenizer.from_pretrained(args.tokenizer))
    engine = Engine(checkpoint, dtype="bfloat16", progress=False)
    row = {"checkout": str(Path.cwd()), "shape": args.shape}
    for batch, context in ROWS:
        row[f"{batch}x{context}_ms"] = round(decode_latency(engine, batch, context) * 1e3, 4)
    for length in (512, 2048):
        row[f"prefill{length}_tok_s"] = round(prefill_rate(engine, length, repeats=5))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
