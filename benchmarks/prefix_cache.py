"""Prefix caching: TTFT of requests that share a long system prompt, with and without the
engine's prefix cache, in one run (the same requests, the engine started each way).

    python -m benchmarks.prefix_cache --system-tokens 512 --num-requests 32
"""

import argparse
import asyncio
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, engine_process, write_report
from benchmarks.loadgen import Target, load_tokenizer, run_load
from benchmarks.workload import BenchRequest, LengthDist, make_requests
from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir


def shared_prefix_requests(tokenizer, args) -> list[BenchRequest]:
    """One system prompt of --system-tokens tokens, then a different question each time."""
    one, outputs = LengthDist("fixed", 1), LengthDist("fixed", args.output_tokens)
    (system,) = make_requests(tokenizer, 1, LengthDist("fixed", args.system_tokens), one,
                              seed=args.seed)  # fmt: skip
    questions = make_requests(tokenizer, args.num_requests, LengthDist("uniform", 8, 32),
                              outputs, seed=args.seed + 1)  # fmt: skip
    return [
        # num_prompt_tokens is approximate here (the join may merge a token or two).
        BenchRequest(
            f"{system.prompt}\n{q.prompt}",
            system.num_prompt_tokens + 1 + q.num_prompt_tokens,
            q.max_new_tokens,
        )  # fmt: skip
        for q in questions
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    command = "python -m benchmarks.prefix_cache " + " ".join(argv or sys.argv[1:])

    model_dir = resolve_model_dir(DEFAULT_MODEL_ID)
    requests = shared_prefix_requests(load_tokenizer(str(model_dir)), args)
    sides = {}
    for side, switch in (("cached", "true"), ("uncached", "false")):
        flags = ["--model-id", str(model_dir), "--prefix-caching", switch]
        with engine_process(flags) as url:
            sides[side] = asyncio.run(run_load(Target(url, "tgi"), requests, args.concurrency))
    workload = {"system_tokens": args.system_tokens, "num_requests": args.num_requests,
                "question_tokens": "uniform:8:32", "output_tokens": args.output_tokens,
                "concurrency": args.concurrency, "seed": args.seed}  # fmt: skip
    write_report(
        "prefix_cache", command, sides, {"workload": workload},
        ratios=lambda s: {"ttft_p50_uncached_over_cached": s["uncached"]["ttft_ms"]["p50"]
                          / s["cached"]["ttft_ms"]["p50"]},
        results_dir=args.results_dir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
