"""What the ingress's per-request observation costs (deployments/request_observer.py).

1. In this process, no Ray: one streamed answer of N token events through a FastAPI app as
   the ingress builds it, with the observer installed and without; the difference over N is
   the cost per token (an SSE event parsed, a histogram observed, the outcome kept), and
   the same for a non-streamed answer per request.
2. In a Ray worker: one `ray.serve.metrics` Histogram.observe / Counter.inc, the mirror of
   each prometheus-client record that sends the metrics to Ray's export.
Writes results/observer_overhead.json.

    python -m benchmarks.observer_overhead
"""

import asyncio
import json
import statistics
import time

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.common import RESULTS_DIR, machine
from deployments.ingress_metrics import IngressMetrics
from deployments.request_observer import (
    ObservabilityMiddleware,
    RequestObserver,
    install_observer,
    note_model,
)
from deployments.tracing import Tracing

NUM_TOKENS = 2000
NUM_REQUESTS = 300
REPEATS = 11
EVENT = {"index": 0, "token": {"id": 1, "text": " word", "logprob": -0.5, "special": False},
         "generated_text": None, "details": None}  # fmt: skip


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(ObservabilityMiddleware)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        note_model(request, "m")
        line = f"data:{json.dumps(EVENT)}\n\n"

        async def events():
            for _ in range(NUM_TOKENS):
                yield line

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(request: Request):
        note_model(request, "m")
        return JSONResponse({"generated_text": "x"}, headers={"x-generated-tokens": "8"})

    return app


async def _seconds(app: FastAPI, path: str, num: int) -> float:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
        start = time.perf_counter()
        for _ in range(num):
            (await client.post(path, json={"inputs": "hi"})).raise_for_status()
        return time.perf_counter() - start


def _median_cost(path: str, num: int) -> tuple[float, float, float]:
    """(seconds without the observer, with it, the difference), medians of REPEATS runs."""
    app = _app()
    off, on = [], []
    for _ in range(REPEATS):
        install_observer(None)
        off.append(asyncio.run(_seconds(app, path, num)))
        install_observer(RequestObserver(IngressMetrics(to_ray=False), Tracing(None, "x"), {}))
        on.append(asyncio.run(_seconds(app, path, num)))
    install_observer(None)
    return (
        statistics.median(off),
        statistics.median(on),
        statistics.median(on) - statistics.median(off),
    )


@ray.remote
def _ray_metric_costs(num: int) -> dict[str, float]:
    from ray.serve import metrics

    histogram = metrics.Histogram("tgi_bench_probe_seconds", boundaries=[0.01, 0.1, 1.0],
                                  tag_keys=("model", "route"))  # fmt: skip
    counter = metrics.Counter("tgi_bench_probe", tag_keys=("model", "route"))
    tags = {"model": "m", "route": "/generate_stream"}
    start = time.perf_counter()
    for _ in range(num):
        histogram.observe(0.05, tags=tags)
    observe_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num):
        counter.inc(1.0, tags=tags)
    return {"histogram_observe_us": observe_s / num * 1e6,
            "counter_inc_us": (time.perf_counter() - start) / num * 1e6}  # fmt: skip


def main() -> int:
    stream_off, stream_on, stream_cost = _median_cost("/generate_stream", 1)
    plain_off, plain_on, plain_cost = _median_cost("/generate", NUM_REQUESTS)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        ray_costs = ray.get(_ray_metric_costs.remote(20000))
    finally:
        ray.shutdown()
    report = {
        "machine": machine(),
        "command": "python -m benchmarks.observer_overhead",
        "stream": {"num_tokens": NUM_TOKENS, "seconds_without": stream_off,
                   "seconds_with": stream_on, "cost_per_token_us": stream_cost / NUM_TOKENS * 1e6},
        "non_streamed": {"num_requests": NUM_REQUESTS, "seconds_without": plain_off,
                         "seconds_with": plain_on,
                         "cost_per_request_us": plain_cost / NUM_REQUESTS * 1e6},
        "ray_serve_metrics": ray_costs,
    }  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "observer_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
