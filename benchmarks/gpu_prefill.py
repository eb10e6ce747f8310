"""Time to first token as the engine sees it: one prompt's prefill step on a GPU, through the
decode graphs (a row per new token) and eager, taking turns in the same engine; reported as
ms and as eager / graphed, with whether the engine's default limits would graph that step.

Each request asks for one token, so a step is the whole prefill plus the pick of the first
token. Its new tokens are fresh random ids; with a cached prefix, every request starts with
the same prefix, prefilled once before the timed requests (a shared system prompt). Random
weights of the given shape, bf16.

    python -m benchmarks.gpu_prefill --shape llama3-8b --out results/gpu_prefill.json
"""

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import LLAMA3_8B, SMOLLM2, random_model_dir
from benchmarks.gpu_speed import new_engine
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

SHAPES = {"llama3-8b": LLAMA3_8B, "smollm2": SMOLLM2}
# (cached prefix, new tokens) per row
DEFAULT_CASES = "0+16,0+64,0+128,0+192,0+256,0+512,1024+64,4096+64,4096+256"
_request_ids = itertools.count()


def prefill_ms(engine: LLMEngine, prompt: list[int]) -> float:
    """Wall time of the step that prefills `prompt` and picks its first token."""
    engine.add_request(str(next(_request_ids)), prompt, SamplingParams(max_new_tokens=1))
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()  # returns once the token is on the host
    elapsed = time.perf_counter() - start
    assert not engine.has_unfinished_requests()
    return elapsed * 1000


def compare(engine: LLMEngine, case: str, reps: int, gen: torch.Generator) -> dict:
    """Median step ms graphed and eager, the two taking turns request by request."""
    num_cached, num_new = (int(n) for n in case.split("+"))
    prefix = torch.randint(3, 10_000, (num_cached,), generator=gen).tolist()
    if prefix:
        prefill_ms(engine, prefix)  # its full blocks are now in the prefix cache
    runner = engine.model_runner
    default_limit = runner.max_graphed_prefill_tokens
    times: dict[str, list[float]] = {"graphed": [], "eager": []}
    for rep in range(reps + 2):  # the first two of each warm up
        for side, limit in (("graphed", runner.graphs.batch_sizes[-1]), ("eager", 0)):
            runner.max_graphed_prefill_tokens = limit
            new = torch.randint(3, 10_000, (num_new,), generator=gen).tolist()
            ms = prefill_ms(engine, prefix + new)
            if rep >= 2:
                times[side].append(ms)
    runner.max_graphed_prefill_tokens = default_limit
    graphed, eager = statistics.median(times["graphed"]), statistics.median(times["eager"])
    return {"cached_tokens": num_cached, "new_tokens": num_new,
            "graphed_by_default": num_new <= default_limit,
            "graphed_ms": round(graphed, 3), "eager_ms": round(eager, 3),
            "eager_over_graphed": round(eager / graphed, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--cases", default=DEFAULT_CASES, help="CACHED+NEW tokens, comma-separated")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ray-tgi-gpu"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model_dir, _ = random_model_dir(SHAPES[args.shape], args.work_dir / args.shape, torch.bfloat16)
    engine = new_engine(model_dir, cuda_graphs=None)  # gpu_speed's engine: default buckets
    gen = torch.Generator().manual_seed(0)
    rows = [compare(engine, case, args.reps, gen) for case in args.cases.split(",")]
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape,
              "max_graphed_prefill_tokens": engine.model_runner.max_graphed_prefill_tokens,
              "reps": args.reps, "prefill_step": rows}  # fmt: skip
    engine.shutdown()
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
