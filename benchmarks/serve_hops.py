"""Where Serve's added latency goes: median latency of four kinds of request straight to the
engine and through `serve run serve_config.yaml` (proxy -> ingress -> TGIServer -> engine;
GET /v1/models is answered by the ingress, so through Serve it is proxy -> ingress only);
then /tokenize through Serve's handles from a driver, hop by hop. With --direct-ingress the
HTTP requests go to the ingress replica's own port instead (no proxy).

    [RAY_SERVE_THROUGHPUT_OPTIMIZED=1] python -m benchmarks.serve_hops [--model-id DIR
        --num-gpus 1] [--direct-ingress]
"""

import argparse
import asyncio
import statistics
import sys
import time

import httpx
import ray
from ray import serve

from benchmarks.serve_vs_direct import (
    add_app_arguments,
    running_app,
    serve_url,
    wait_for_engine,
)

CASES = [  # (name, path, body, stream); GET when body is None
    # Answered by the ingress itself through Serve: the proxy -> ingress hop alone.
    ("list models", "/v1/models", None, False),
    ("tokenize", "/tokenize", {"inputs": "Hello world"}, False),
    ("generate 1 token", "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 1}},
     False),
    ("first streamed token", "/generate_stream",
     {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}, True),
]  # fmt: skip


def median_ms(url: str, path: str, body: dict, stream: bool, n: int = 40) -> float:
    """Median over n requests (after 5 warm-up ones) until the answer, or its first event."""
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n + 5):
            start = time.perf_counter()
            if stream:
                with client.stream("POST", url + path, json=body) as response:
                    next(line for line in response.iter_lines() if line.startswith("data:"))
            elif body is None:
                client.get(url + path)
            else:
                client.post(url + path, json=body)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[5:])


def handle_hops_ms(n: int = 40) -> dict[str, float]:
    """Medians of the same /tokenize through Serve's handles, from a driver attached to the
    running cluster: one handle round trip alone, then each deployment's share."""
    ray.init(address="auto", log_to_driver=False)
    server = serve.get_deployment_handle("TGIServer:smollm2", "ray-tgi")
    ingress = serve.get_app_handle("ray-tgi")
    body = {"inputs": "Hello world"}
    cases = {
        "TGIServer handle, no engine call (placement)": lambda: server.placement.remote(),
        "TGIServer handle, /tokenize": lambda: server.call.remote("POST", "/tokenize", body),
        "ingress handle, /tokenize": lambda: ingress.call.remote("POST", "/tokenize", body),
    }

    async def timed(call) -> float:
        times = []
        for _ in range(n + 5):
            start = time.perf_counter()
            await call()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times[5:])

    async def run_all() -> dict[str, float]:
        return {name: await timed(call) for name, call in cases.items()}

    try:
        return asyncio.run(run_all())
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_app_arguments(p)
    args = p.parse_args(argv)
    with running_app(args) as serve_run:
        direct = wait_for_engine(serve_run)
        through_serve = serve_url(serve_run, args.direct_ingress)
        for name, path, body, stream in CASES:
            d = median_ms(direct, path, body, stream)
            s = median_ms(through_serve, path, body, stream)
            print(f"{name:22s} direct {d:7.2f} ms  serve {s:7.2f} ms  added {s - d:6.2f} ms")
        for name, ms in handle_hops_ms().items():
            print(f"{name:46s} {ms:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
