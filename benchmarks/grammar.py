"""Throughput with a grammar vs without, on one engine process, in one run.

Three workloads of the same chat questions (benchmarks/grammar_cases.py), closed loop:

- `plain`: no grammar, each question asked for as a long essay, so (nearly) every request
  generates max_new_tokens tokens;
- `json_long`: the same prompts, constrained by a JSON schema whose one string is longer than
  max_new_tokens, so each request generates exactly max_new_tokens tokens: the same work as
  `plain`, plus the grammar's masks;
- `json_schemas`: each request with its own schema of the 22 test schemas (flat to nested),
  cycled, which finish early with EOS: grammar compiles (cache misses then hits) and short
  requests coming and going.

    python -m benchmarks.grammar --num-requests 64 --concurrency 16 --max-new-tokens 64

The ratio that answers "what does a grammar cost" is json_long / plain output tok/s.
"""

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass

from transformers import AutoTokenizer

from benchmarks.common import engine_process, write_report
from benchmarks.grammar_cases import JSON_CASES
from benchmarks.loadgen import Target, run_load
from benchmarks.workload import BenchRequest
from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir

LONG_STRING = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 4000}},
               "required": ["answer"]}  # fmt: skip


@dataclass(frozen=True)
class GrammarTarget(Target):
    """TGI's /generate_stream with each request's grammar (by prompt), greedy."""

    grammars: tuple[tuple[str, dict], ...] = ()  # (prompt, grammar)

    def request(self, req: BenchRequest) -> tuple[str, dict]:
        path, body = super().request(req)
        grammar = dict(self.grammars).get(req.prompt)
        if grammar is not None:
            body["parameters"]["grammar"] = grammar
        return path, body


def workloads(tokenizer, num_requests: int, max_new_tokens: int) -> dict[str, tuple]:
    """Per side: (requests, grammar by prompt). The same questions on every side; prompts
    differ by their request number, so no two requests share a whole prompt."""
    sides: dict[str, tuple] = {}
    for side in ("plain", "json_long", "json_schemas"):
        requests, grammars = [], []
        for i in range(num_requests):
            question, schema = JSON_CASES[i % len(JSON_CASES)]
            if side != "json_schemas":
                question = f"Write a long essay about this question: {question}"
            messages = [{"role": "user", "content": f"Request {i}. {question}"}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False)  # fmt: skip
            num_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
            requests.append(BenchRequest(prompt, num_tokens, max_new_tokens))
            if side == "json_long":
                grammars.append((prompt, {"type": "json", "value": LONG_STRING}))
            elif side == "json_schemas":
                grammars.append((prompt, {"type": "json", "value": schema}))
        sides[side] = (requests, tuple(grammars))
    return sides


def grammar_costs(tokenizer, vocab_size: int, num_rows: int) -> dict:
    """In this process, no model: ms to compile each test schema (cold, then from the cache)
    and to compute one step's masks for `num_rows` constrained rows at once."""
    import time

    import torch

    from engine.grammar import GrammarCompiler, GrammarSpec
    from engine.grammar_mask import allowed_tokens

    compiler = GrammarCompiler(tokenizer, vocab_size, frozenset({tokenizer.eos_token_id}))
    specs = [GrammarSpec.json_schema(schema) for _, schema in JSON_CASES]

    def ms(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000

    cold = [ms(lambda s=s: compiler.compile(s)) for s in specs]
    cached = [ms(lambda s=s: compiler.compile(s)) for s in specs]
    states = [compiler.compile(specs[i % len(specs)]).new_state() for i in range(num_rows)]
    device = torch.device("cpu")
    allowed_tokens(states, vocab_size, device)  # the first mask of a state builds its lexer
    masks = sorted(ms(lambda: allowed_tokens(states, vocab_size, device)) for _ in range(20))
    return {
        "compile_cold_ms": {"median": round(sorted(cold)[len(cold) // 2], 3),
                            "max": round(max(cold), 3)},
        "compile_cached_ms": {"median": round(sorted(cached)[len(cached) // 2], 4)},
        f"mask_{num_rows}_rows_ms": {"median": round(masks[len(masks) // 2], 3),
                                     "max": round(masks[-1], 3)},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the sides in turn this many times (ABCABC)"
    )
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument("--name", default="grammar", help="results/NAME.json and NAME.png")
    args = parser.parse_args(argv)
    model_dir = resolve_model_dir(args.model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    flags = ["--model-id", str(model_dir), "--max-total-tokens", "1024",
             "--max-batch-total-tokens", "16384", "--max-concurrent-requests", "256"]  # fmt: skip
    sides = workloads(tokenizer, args.num_requests, args.max_new_tokens)
    runs: dict[str, tuple[list, float]] = {side: ([], 0.0) for side in sides}
    with engine_process(flags) as url:
        warmup = sides["plain"][0][: args.concurrency]
        asyncio.run(run_load(Target(url, "tgi"), warmup, args.concurrency, progress=False))
        # Sides in turn, so a slow spell of this shared machine does not land on one side only.
        for _ in range(args.repeats):
            for side, (requests, grammars) in sides.items():
                target = GrammarTarget(url, "tgi", grammars=grammars)
                results, wall = asyncio.run(run_load(target, requests, args.concurrency))
                runs[side] = (runs[side][0] + results, runs[side][1] + wall)
    command = " ".join(["python -m benchmarks.grammar", *(sys.argv[1:] if argv is None else argv)])

    def ratios(summaries: dict) -> dict[str, float]:
        plain = summaries["plain"]
        return {
            "json_long_over_plain_tok_s": summaries["json_long"]["output_tok_s"]
            / plain["output_tok_s"],
            "json_schemas_over_plain_tok_s": summaries["json_schemas"]["output_tok_s"]
            / plain["output_tok_s"],
            "json_long_over_plain_itl_p50": summaries["json_long"]["itl_ms"]["p50"]
            / plain["itl_ms"]["p50"],
        }

    costs = grammar_costs(tokenizer, len(tokenizer), args.concurrency)
    extra = {"args": vars(args), "long_string_schema": LONG_STRING, "grammar_costs": costs}
    report = write_report(args.name, command, runs, extra, ratios)
    print(json.dumps(report["ratios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
