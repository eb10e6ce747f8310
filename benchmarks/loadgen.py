"""Load generator for TGI- and OpenAI-compatible servers (`ray-tgi bench`).

Closed loop (`--concurrency C`: C streams, each sends its next request when the last ends) or
open loop (`--rate R`: Poisson arrivals, R requests/s on average). Every request streams, so
time to first token (TTFT), inter-token latency (ITL) and end-to-end latency are measured
per token as the client sees them. Writes a JSON report and, with `--plot`, a PNG.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.report import plot_results, summarize
from benchmarks.workload import BenchRequest, LengthDist, make_requests

DEFAULT_TOKENIZER = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class RequestResult:
    num_prompt_tokens: int
    max_new_tokens: int
    start: float  # seconds since the run started
    token_times: list[float] = field(default_factory=list)  # arrival of each token, same clock
    end: float | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    url: str
    protocol: str  # "tgi": POST /generate_stream; "openai": POST /v1/completions, streaming
    model: str = "default"
    # False: a new connection per request, for servers that close idle keep-alive connections
    # while the client reuses them (llama-server does: "Server disconnected without sending
    # a response").
    keepalive: bool = True

    def request(self, req: BenchRequest) -> tuple[str, dict]:
        if self.protocol == "tgi":
            params = {"max_new_tokens": req.max_new_tokens, "do_sample": False}
            return "/generate_stream", {"inputs": req.prompt, "parameters": params}
        body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.max_new_tokens,
                "temperature": 0, "stream": True}  # fmt: skip
        return "/v1/completions", body


def _tokens_in_event(protocol: str, data: str) -> int:
    """Tokens one SSE `data:` payload carries; raises on an error event."""
    if data == "[DONE]":
        return 0
    payload = json.loads(data)
    if "error" in payload:
        raise RuntimeError(f"error event: {payload['error']}")
    if protocol == "tgi":
        return 1
    return sum(1 for choice in payload.get("choices", []) if choice.get("text"))


async def send(
    client: httpx.AsyncClient, target: Target, req: BenchRequest, t0: float
) -> RequestResult:
    """Send one streaming request and time every token."""
    path, body = target.request(req)
    result = RequestResult(req.num_prompt_tokens, req.max_new_tokens, time.perf_counter() - t0)
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    num_tokens = _tokens_in_event(target.protocol, line[5:].strip())
                    now = time.perf_counter() - t0
                    result.token_times.extend([now] * num_tokens)
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        result.error = f"{type(e).__name__}: {e}"
    result.end = time.perf_counter() - t0
    return result


async def run_load(
    target: Target,
    requests: list[BenchRequest],
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    timeout_s: float = 600,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Run the workload closed-loop (`concurrency`) or open-loop (`rate`); (results, wall s)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    limits = httpx.Limits(
        max_connections=None, max_keepalive_connections=None if target.keepalive else 0
    )
    bar = tqdm(total=len(requests), unit="req", disable=not progress, file=sys.stderr)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(
        base_url=target.url, timeout=httpx.Timeout(timeout_s), limits=limits
    ) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> None:
            results.append(await send(client, target, req, t0))
            bar.update()

        if concurrency is not None:
            pending = iter(requests)

            async def worker() -> None:
                for req in pending:  # shared iterator: each request is taken once
                    await one(req)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            # Each request starts as a task at its arrival time, whatever is still running.
            tasks = [asyncio.create_task(one(req)) async for req in _poisson(requests, rate, seed)]
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    bar.close()
    return sorted(results, key=lambda r: r.start), wall


async def _poisson(requests: Iterable[BenchRequest], rate: float, seed: int):
    rng = random.Random(seed)
    for req in requests:
        yield req
        await asyncio.sleep(rng.expovariate(rate))


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    from engine.weights import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-tgi bench", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--protocol", choices=["tgi", "openai"], default="tgi")
    p.add_argument("--model", default="default", help="`model` field of OpenAI requests")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: streams in flight")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=LengthDist.parse, default=LengthDist.parse("chat:96:512"),
                   help="fixed:N | uniform:LO:HI | chat:MEDIAN:MAX (tokens)")  # fmt: skip
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("chat:64:256"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub id, local dir or .gguf")
    p.add_argument("--timeout", type=float, default=600, help="per-request timeout, seconds")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON report")
    p.add_argument("--plot", type=Path, help="PNG of the latency distributions and throughput")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency is None and args.rate is None:
        args.concurrency = 1
    requests = make_requests(
        load_tokenizer(args.tokenizer), args.num_requests, args.input_len, args.output_len,
        args.seed,
    )  # fmt: skip
    target = Target(args.url, args.protocol, args.model)
    results, wall = asyncio.run(
        run_load(target, requests, args.concurrency, args.rate, args.seed, args.timeout)
    )
    summary = summarize(results, wall)
    config = {k: str(v) if isinstance(v, LengthDist | Path) else v for k, v in vars(args).items()}
    report = {"config": config, "summary": summary, "requests": [asdict(r) for r in results]}
    args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_results({"run": results}, args.plot)
    print(json.dumps(summary, indent=1))
    return 1 if summary["num_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
