"""CPU each Serve process spends per streamed request: the proxy, the ingress, the TGIServer
and the engine, under `serve run serve_config.yaml`, from their CPU time before and after a
bounded closed loop of /generate_stream requests. Latency benchmarks show how long a hop
takes; this shows which process runs out of CPU first at many streams.

    python -m benchmarks.serve_cpu [--num-requests 80 --concurrency 4 --max-new-tokens 8]
"""

import argparse
import asyncio
import sys

import httpx
import psutil

from benchmarks.serve_vs_direct import (
    add_app_arguments,
    running_app,
    serve_url,
    wait_for_engine,
)

# A process of each kind, by what its command line (a Ray actor's title) holds.
PROCESSES = {"proxy": "ProxyActor", "ingress": "Ingress", "TGIServer": "TGIServer",
             "engine": " -m engine "}  # fmt: skip


def serve_processes(serve_run: psutil.Process) -> dict[str, psutil.Process]:
    found = {}
    for proc in serve_run.children(recursive=True):
        command = " ".join(proc.cmdline())
        for name, mark in PROCESSES.items():
            if mark in command:
                found.setdefault(name, proc)
    return found


async def stream_requests(
    url: str, num_requests: int, concurrency: int, max_new_tokens: int
) -> int:
    """Closed loop of streamed requests through Serve at `url`; the number of events received."""
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> int:
            # A chat turn asking for a long answer: it runs to max_new_tokens.
            prompt = f"<|im_start|>user\nTell me long story number {i} about the sea.<|im_end|>\n"
            body = {"inputs": f"{prompt}<|im_start|>assistant\n",
                    "parameters": {"max_new_tokens": max_new_tokens}}  # fmt: skip
            async with (
                slots,
                client.stream("POST", "/generate_stream", json=body) as reply,
            ):
                return sum([line.startswith("data:") async for line in reply.aiter_lines()])

        return sum(await asyncio.gather(*(one(i) for i in range(num_requests))))


def cpu_ms_per_request(
    args: argparse.Namespace, serve_run: psutil.Process, url: str
) -> tuple[dict[str, float], float]:
    """CPU ms per request of each process, and the events (tokens) a request got."""
    processes = serve_processes(serve_run)
    asyncio.run(stream_requests(url, 8, args.concurrency, args.max_new_tokens))  # warm-up
    before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    num_events = asyncio.run(
        stream_requests(url, args.num_requests, args.concurrency, args.max_new_tokens)
    )
    per_request = {
        name: (sum(p.cpu_times()[:2]) - before[name]) * 1000 / args.num_requests
        for name, p in processes.items()
    }
    return per_request, num_events / args.num_requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_app_arguments(p)
    p.add_argument("--num-requests", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    with running_app(args) as serve_run:
        wait_for_engine(serve_run)
        url = serve_url(serve_run, args.direct_ingress)
        per_request, tokens = cpu_ms_per_request(args, psutil.Process(serve_run.pid), url)
    print(f"{args.num_requests} streamed requests, {tokens:.1f} tokens each, "
          f"{args.concurrency} at once; CPU per request:")  # fmt: skip
    for name, ms in per_request.items():
        print(f"  {name:10s} {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
