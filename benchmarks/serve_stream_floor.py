"""What Ray Serve itself costs a call between two deployments, unary vs streamed, with no
ray-tgi code: the floor under the ingress → TGIServer hop of benchmarks.serve_hops.

A FastAPI ingress deployment answers POST /unary and /stream by calling a second deployment
through its handle, and reports how long after the call the callee's method started, and
when the answer (the stream's first item) was back. Medians over --requests HTTP requests,
one at a time. Run it with and without Serve's throughput-optimized mode, which also makes
the ingress replica serve HTTP itself on port 30000 (README "Lowest latency"):

    [RAY_SERVE_THROUGHPUT_OPTIMIZED=1] python -m benchmarks.serve_stream_floor
"""

import argparse
import os
import statistics
import sys
import time

import httpx
import ray
from fastapi import FastAPI
from ray import serve

from deployments.launcher import free_port

app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Callee:
    async def unary(self, called_at: float) -> float:
        return time.time() - called_at

    async def stream(self, called_at: float, request: dict, headers: dict):
        yield time.time() - called_at  # the same shape of call as TGIServer.stream_sse
        yield "data: {}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Caller:
    def __init__(self, callee) -> None:
        self._callee = callee

    @app.post("/unary")
    async def unary(self) -> dict[str, float]:
        called_at = time.time()
        started_after = await self._callee.unary.remote(called_at)
        return {"started_ms": 1000 * started_after, "back_ms": 1000 * (time.time() - called_at)}

    @app.post("/stream")
    async def stream(self) -> dict[str, float]:
        called_at = time.time()
        items = self._callee.options(stream=True).stream.remote(called_at, {"inputs": "Hi"}, {})
        started_after = await items.__anext__()
        back_after = time.time() - called_at
        async for _ in items:
            pass
        return {"started_ms": 1000 * started_after, "back_ms": 1000 * back_after}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--gap-s", type=float, default=0.0, help="idle time between two calls")
    args = p.parse_args(argv)
    optimized = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        proxy_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        serve.run(Caller.bind(Callee.bind()), name="serve_stream_floor", route_prefix="/")
        url = f"http://127.0.0.1:{30000 if optimized else proxy_port}"
        times: dict[str, list[dict]] = {"unary": [], "stream": []}
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(args.requests):
                for kind, rows in times.items():
                    rows.append(client.post(f"/{kind}").json())
                    time.sleep(args.gap_s)
        print(f"throughput-optimized: {optimized}, {url}, medians of {args.requests} calls "
              f"{args.gap_s} s apart")  # fmt: skip
        for kind, rows in times.items():
            started, back = (statistics.median(r[key] for r in rows[5:]) for key in rows[0])
            print(f"{kind:7s} callee started {started:6.2f} ms after the call, "
                  f"answer back after {back:6.2f} ms")  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
