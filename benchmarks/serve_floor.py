"""What ray-tgi adds to one stream's TTFT through Serve, set beside what DESIGN.md's request
path adds by its shape alone: issue 3 (b)'s "TTFT added at p50" and the floor under it.

The floor: both sides stream `POST /generate_stream` from a stub engine
(benchmarks/stub_engine.py), a process of its own like the launcher, that sends its headers
at once and one SSE event `--stub-first-token-ms` later. Straight, the client asks the stub;
through Serve, it asks a FastAPI ingress deployment on its own port, which calls a second
deployment through a streaming handle, which streams from the stub with aiohttp and yields
the headers, then each event, as TGIServer.stream_sse does; the ingress answers once the
headers are back. No ray-tgi code.

ray-tgi: the same client and requests (1 new token for "Hello") against the app of
benchmarks.serve_vs_direct (`serve run`, its options) and its engine.

The sides alternate request by request on one keep-alive connection each; the report gives
TTFT medians, the paired differences and ray-tgi's paired p50 over the floor's:

    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 python -m benchmarks.serve_floor [--model-id DIR --num-gpus 1]
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from benchmarks.common import machine
from benchmarks.host_latency import cpu_wakeup_latency_held
from benchmarks.loadgen import Target, send
from benchmarks.serve_vs_direct import add_app_arguments, running_app, serve_url, wait_for_engine
from benchmarks.workload import BenchRequest
from deployments.launcher import Launcher, free_port


@serve.deployment(ray_actor_options={"num_cpus": 0})
class StubServer:
    def __init__(self, engine_url: str) -> None:
        self._session = aiohttp.ClientSession(base_url=engine_url)

    async def stream_sse(self, path: str, request: dict, headers: dict):
        async with self._session.post(path, json=request, headers=headers) as reply:
            yield dict(reply.headers)
            async for raw in reply.content:
                if line := raw.decode().rstrip("\r\n"):
                    yield f"{line}\n\n"


ingress = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress)
class StubIngress:
    def __init__(self, server) -> None:
        self._server = server

    @ingress.post("/generate_stream")
    async def generate_stream(self, request: Request) -> StreamingResponse:
        body = await request.json()
        stream = self._server.options(stream=True).stream_sse.remote("/generate_stream", body, {})
        await stream.__anext__()  # the engine's headers: it has answered
        return StreamingResponse(stream, media_type="text/event-stream")


async def alternate(urls: dict[str, str], num_requests: int, gap_s: float) -> dict[str, list]:
    """Each side's TTFT in ms, request by request, the sides taking turns."""
    req = BenchRequest(prompt="Hello", num_prompt_tokens=1, max_new_tokens=1)
    clients = {side: httpx.AsyncClient(base_url=url, timeout=30) for side, url in urls.items()}
    ttft_ms: dict[str, list] = {side: [] for side in urls}
    try:
        for _ in range(num_requests):
            for side, client in clients.items():
                result = await send(client, Target(urls[side], "tgi"), req, time.perf_counter())
                if result.error or not result.token_times:
                    raise RuntimeError(f"{side}: {result.error}")
                ttft_ms[side].append(1000 * (result.token_times[0] - result.start))
                await asyncio.sleep(gap_s)
    finally:
        for client in clients.values():
            await client.aclose()
    return ttft_ms


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict:
    """TTFT medians per side and the paired differences, in ms, after 10 warm-ups."""
    ttft_ms = asyncio.run(alternate(urls, 10 + args.requests, args.gap_s))
    direct, through = ttft_ms["direct"][10:], ttft_ms["serve"][10:]
    added = sorted(s - d for d, s in zip(direct, through, strict=True))
    return {
        "ttft_p50_ms": {side: round(statistics.median(ms), 3)
                        for side, ms in (("direct", direct), ("serve", through))},
        "added_ms_paired": {f"p{q}": round(added[len(added) * q // 100], 3)
                            for q in (10, 50, 90)},
    }  # fmt: skip


def floor(args: argparse.Namespace) -> dict:
    """`measure` of the stub engine, straight and through the stub Serve app."""
    stub = Launcher(
        [sys.executable, "-m", "benchmarks.stub_engine",
         "--first-token-ms", str(args.stub_first_token_ms)]
    )  # fmt: skip
    stub.start()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        stub.wait_until_healthy(timeout_s=60)
        proxy_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        serve.run(StubIngress.bind(StubServer.bind(stub.url)), name="floor", route_prefix="/")
        port = 30000 if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else proxy_port
        with cpu_wakeup_latency_held(args.cpu_wakeup_latency_us):
            return measure({"direct": stub.url, "serve": f"http://127.0.0.1:{port}"}, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        stub.stop()


def ray_tgi(args: argparse.Namespace) -> dict:
    """`measure` of ray-tgi's app (`serve run`, as benchmarks.serve_vs_direct starts it,
    holding the CPU wake-up latency as asked) and its engine, with the same requests."""
    with running_app(args) as serve_run:
        engine_url = wait_for_engine(serve_run)
        return measure({"direct": engine_url, "serve": serve_url(serve_run, True)}, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="per side, after 10 warm-ups")
    p.add_argument("--gap-s", type=float, default=0.0, help="idle time after each request")
    p.add_argument("--stub-first-token-ms", type=float, default=0.0,
                   help="the stub engine's time from its headers to its event")  # fmt: skip
    p.add_argument("--out", type=Path, help="also write the report here (JSON)")
    add_app_arguments(p)
    args = p.parse_args(argv)
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1":
        p.error("run it with RAY_SERVE_THROUGHPUT_OPTIMIZED=1: the app side needs its direct "
                "ingress (README \"Lowest latency\")")  # fmt: skip
    args.direct_ingress = True
    report = {"command": "python -m benchmarks.serve_floor " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "floor": floor(args), "ray_tgi": ray_tgi(args)}  # fmt: skip
    report["ray_tgi_over_floor_ms"] = round(
        report["ray_tgi"]["added_ms_paired"]["p50"] - report["floor"]["added_ms_paired"]["p50"], 3
    )
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
