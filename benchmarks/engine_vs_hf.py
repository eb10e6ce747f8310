"""Side by side (a): the embedded engine vs HF transformers `generate` with static batching.

Same model (fp32 on CPU), same seeded mixed-length requests, same machine, one run:
  1. the engine process (`python -m engine`), driven over HTTP by the load generator with
     `--concurrency` streams in flight (continuous batching);
  2. `model.generate` on batches of `--concurrency` requests, left-padded, each batch running
     until its longest request is done (static batching); a request's tokens past its own
     max_new_tokens or its EOS are not counted.
Output tok/s of both and their ratio go to results/engine_vs_hf.json (+ .png).

    python -m benchmarks.engine_vs_hf --concurrency 16 --num-requests 48
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, engine_process, write_report
from benchmarks.loadgen import RequestResult, Target, load_tokenizer, run_load
from benchmarks.workload import BenchRequest, LengthDist, make_requests
from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir


def run_hf_static(model_dir, tokenizer, requests: list[BenchRequest], batch_size: int):
    """HF `generate` over consecutive batches; per-token times from a logits-processor hook."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad_id = min(eos_ids)  # masked out; any id will do

    class StepClock(LogitsProcessor):
        """Called once per decoding step, when that step's logits are ready."""

        def __init__(self, t0: float):
            self.t0, self.times = t0, []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter() - self.t0)
            return scores

    results: list[RequestResult] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(requests), batch_size):
            batch = requests[first : first + batch_size]
            ids = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in batch]
            inputs = left_pad(ids, pad_id)
            clock = StepClock(t0)
            start = time.perf_counter() - t0
            out = model.generate(
                **inputs,
                max_new_tokens=max(r.max_new_tokens for r in batch),
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
            for req, tokens in zip(batch, new_tokens, strict=True):
                useful = _until_eos(tokens[: req.max_new_tokens], eos_ids)
                results.append(
                    RequestResult(req.num_prompt_tokens, req.max_new_tokens, start,
                                  token_times=clock.times[: len(useful)],
                                  end=clock.times[len(useful) - 1])
                )  # fmt: skip
    return results, time.perf_counter() - t0


def left_pad(ids: list[list[int]], pad_id: int) -> dict:
    """input_ids and attention_mask [b, longest], padded on the left as generate wants."""
    import torch

    longest = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (longest - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--input-len", type=LengthDist.parse, default=LengthDist.parse("chat:96:512"))
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("chat:64:256"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    model_dir = resolve_model_dir(args.model_id)
    tokenizer = load_tokenizer(str(model_dir))
    requests = make_requests(tokenizer, args.num_requests, args.input_len, args.output_len,
                             args.seed)  # fmt: skip
    with engine_process(["--model-id", str(model_dir)]) as url:
        engine = asyncio.run(run_load(Target(url, "tgi"), requests, args.concurrency))
    hf = run_hf_static(model_dir, tokenizer, requests, args.concurrency)

    command = "python -m benchmarks.engine_vs_hf " + " ".join(argv or sys.argv[1:])
    workload = {"num_requests": args.num_requests, "concurrency": args.concurrency,
                "input_len": str(args.input_len), "output_len": str(args.output_len),
                "seed": args.seed}  # fmt: skip
    write_report(
        "engine_vs_hf", command, {"engine": engine, "hf_static": hf}, {"workload": workload},
        ratios=lambda s: {"output_tok_s": s["engine"]["output_tok_s"]
                          / s["hf_static"]["output_tok_s"]},
        results_dir=args.results_dir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
