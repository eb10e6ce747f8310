"""Batching-aware routing vs Serve's default router: one skewed workload through 2 replicas.

A local Ray cluster in this process runs the app (build_app, as serve_config.yaml builds
it) twice, side by side, each with 2 TGIServer replicas: one with `request_router:
batching_aware`, one with `power_of_two` (Serve's default router). Both get the same
requests at the same Poisson arrival times, at once, so both see the same machine: on a
shared 2-core box, measuring one after the other measured whoever else ran at the time.
  - a skewed workload: short (16-token) and long (512-token) generations mixed; TTFT and
    end-to-end latency percentiles as the client sees them;
  - a prefix workload: distinct long system prompts each asked several questions, one at a
    time; the engines' prefix-cache hits over the prompts' full KV blocks.
Writes results/routing.json and routing.png. The defaults are the workload of issue 7's
target (docs/benchmarks.md): 60 requests at 0.07/s, a quarter of them long, each engine's
KV cache 768 tokens, which one long generation nearly fills; ~15 min on 2 cores.

    python -m benchmarks.routing [--seed S]
"""

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ray
from ray import serve

from benchmarks.common import RESULTS_DIR, write_report
from benchmarks.loadgen import Target, load_tokenizer, run_load
from benchmarks.workload import WORDS, BenchRequest, LengthDist, make_requests
from deployments.launcher import embedded_env, free_port
from engine.weights import DEFAULT_MODEL_ID, resolve_model_dir
from serve_app.app import build_app

MODEL = "smollm2"
SERVER = f"TGIServer:{MODEL}"
BLOCK_SIZE = 16  # the engine's KV block (engine/config.py): prefix hits count full blocks
ROUTERS = ("batching_aware", "power_of_two")


# --- the cluster and the app ----------------------------------------------------------------


@contextlib.contextmanager
def local_serve(num_cpus: int = 2, **init_kwargs) -> Iterator[str]:
    """A fresh local Ray cluster with Serve's proxy on a free port; yields its base URL."""
    # Every engine gets one thread: two replicas share this machine's two cores. Replicas
    # import the project from its root, and what the driver's PYTHONPATH holds after it.
    env = {"PYTHONPATH": embedded_env()["PYTHONPATH"], "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, **init_kwargs)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def app_args(
    model_id: str, deployment: dict, launcher_args: dict, num_cpus: float = 0.25,
    num_gpus: float = 0,
) -> dict:  # fmt: skip
    """build_app's args: one model with the given deployment options and launcher flags."""
    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    model = {"name": MODEL, "model_id": model_id, "resources": resources,
             "deployment": deployment, "launcher_args": launcher_args}  # fmt: skip
    return {"models": [model], "ingress": {"num_cpus": 0.1}}


@contextlib.contextmanager
def deployed(base_url: str, name: str, args: dict, timeout_s: float = 300) -> Iterator[str]:
    """Deploy the app at /NAME and wait until it runs; yield its URL; delete it."""
    # serve.run would wait without a bound; _run(_blocking=False) returns at once.
    serve._run(build_app(args), _blocking=False, name=name, route_prefix=f"/{name}")
    try:
        deadline = time.monotonic() + timeout_s
        while (status := serve.status().applications.get(name)) is None or (
            status.status != "RUNNING"
        ):  # fmt: skip
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"{name} failed to deploy: {status.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not running after {timeout_s} s: {status}")
            time.sleep(1)
        yield f"{base_url}/{name}"
    finally:
        serve.delete(name)


def engine_urls(app: str, num_replicas: int, timeout_s: float = 60) -> list[str]:
    """The launcher URL of each running replica (placement calls spread until all seen)."""
    handle = serve.get_deployment_handle(SERVER, app)

    async def gather() -> list[str]:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(seen) < num_replicas and time.monotonic() < deadline:
            replies = await asyncio.gather(*(handle.placement.remote() for _ in range(8)))
            seen.update((p["replica_id"], p["launcher_url"]) for p in replies)
        if len(seen) != num_replicas:
            raise TimeoutError(f"saw {len(seen)} of {num_replicas} replicas of {app}")
        return sorted(seen.values())

    return asyncio.run(gather())


async def engine_metrics(client: httpx.AsyncClient, engine_url: str) -> dict[str, float]:
    """An engine's unlabelled Prometheus samples (gauges and counters), by name."""
    response = await client.get(f"{engine_url}/metrics", timeout=10)
    response.raise_for_status()
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            values[name] = float(value)
    return values


async def sum_metric(client: httpx.AsyncClient, engines: list[str], name: str) -> float:
    return sum([(await engine_metrics(client, url))[name] for url in engines])


# --- workloads ------------------------------------------------------------------------------


def skewed_requests(
    tokenizer, num_requests: int, input_len: LengthDist, short_tokens: int,
    long_tokens: int, long_share: float, seed: int,
) -> list[BenchRequest]:  # fmt: skip
    """Prompts of `input_len` tokens; `long_share` of them (rounded), at seeded positions,
    generate `long_tokens`, the rest `short_tokens`."""
    short = make_requests(tokenizer, num_requests, input_len, LengthDist("fixed", short_tokens),
                          seed)  # fmt: skip
    long_ids = set(random.Random(seed + 1).sample(range(num_requests),
                                                  round(long_share * num_requests)))  # fmt: skip
    return [BenchRequest(r.prompt, r.num_prompt_tokens,
                         long_tokens if i in long_ids else short_tokens)
            for i, r in enumerate(short)]  # fmt: skip


def prefix_workload(
    num_system_prompts: int = 8, num_questions: int = 3, system_words: int = 250
) -> list[str]:
    """Distinct long system prompts (~1 token a word), each asked `num_questions`
    questions; round-robin order, so each system prompt comes back after the others."""
    rng = random.Random(0)
    systems = [" ".join(rng.choice(WORDS) for _ in range(system_words))
               for _ in range(num_system_prompts)]  # fmt: skip
    return [f"{system}\nQuestion {q}: what is the {WORDS[q]} of the {WORDS[q + 1]}?"
            for q in range(num_questions) for system in systems]  # fmt: skip


async def prefix_cache_hits(app_url: str, engines: list[str], prompts: list[str]) -> dict:
    """Send the prompts one at a time through the app (1 new token each); the engines'
    prefix-cache hits over their lookups, and over the prompts' full KV blocks."""
    async with httpx.AsyncClient(timeout=120) as client:
        hits = -await sum_metric(client, engines, "ray_tgi_prefix_cache_hits")
        lookups = -await sum_metric(client, engines, "ray_tgi_prefix_cache_lookups")
        num_blocks = 0
        for prompt in prompts:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 1}}
            answer = await client.post(f"{app_url}/generate", json=body)
            answer.raise_for_status()
            tokens = await client.post(f"{app_url}/tokenize", json={"inputs": prompt})
            num_blocks += (len(tokens.json()) - 1) // BLOCK_SIZE  # as the engine looks up
        hits += await sum_metric(client, engines, "ray_tgi_prefix_cache_hits")
        lookups += await sum_metric(client, engines, "ray_tgi_prefix_cache_lookups")
    return {"hits": hits, "lookups": lookups, "prompt_blocks": num_blocks,
            "hits_per_lookup": round(hits / lookups, 4),
            "hits_per_prompt_block": round(hits / num_blocks, 4)}  # fmt: skip


# --- the comparison -------------------------------------------------------------------------


async def measure(apps: dict[str, tuple[str, list[str]]], requests, prompts, args) -> dict:
    """Run the skewed workload through every app at once, same arrival times, then the
    prefix workload; by app: ((results, wall_s), what its engines saw)."""

    async def request_counts(engines: list[str]) -> list[float]:
        async with httpx.AsyncClient() as client:
            return [(await engine_metrics(client, u))["tgi_request_count"] for u in engines]

    async def one(app_url: str, engines: list[str]) -> tuple[tuple, dict]:
        target = Target(app_url, "tgi")
        warm_up = [BenchRequest("Hello", 1, 4)] * 4  # the ingress's handle and router start
        await run_load(target, warm_up, concurrency=2, progress=False)
        before = await request_counts(engines)
        side = await run_load(target, requests, rate=args.rate, seed=args.seed,
                              timeout_s=900, progress=False)  # fmt: skip
        after = await request_counts(engines)
        return side, {"requests_per_replica": [a - b for a, b in zip(after, before, strict=True)],
                      "requests": [_timings(r) for r in side[0]]}  # fmt: skip

    sides = dict(zip(apps, await asyncio.gather(*(one(*app) for app in apps.values())),
                     strict=True))  # fmt: skip
    hits = await asyncio.gather(*(prefix_cache_hits(*app, prompts) for app in apps.values()))
    for (_, seen), prefix in zip(sides.values(), hits, strict=True):
        seen["prefix_cache"] = prefix
    return sides


def _timings(result) -> dict:
    """One request's arrival and latencies, in ms (None when it failed)."""
    ttft = result.token_times[0] - result.start if result.token_times else None
    return {
        "start_s": round(result.start, 3), "max_new_tokens": result.max_new_tokens,
        "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
        "e2e_ms": round((result.end - result.start) * 1000, 1), "error": result.error,
    }  # fmt: skip


def router_ratios(s: dict) -> dict[str, float]:
    """Default router's latency over ours (> 1: ours lower)."""
    ours, theirs = s["batching_aware"], s["power_of_two"]
    return {f"{metric}_{p}_default_over_ours": theirs[metric][p] / ours[metric][p]
            for metric in ("ttft_ms", "e2e_ms") for p in ("p50", "p99")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=0.07, help="Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--input-len", type=LengthDist.parse, default=LengthDist.parse("uniform:32:128"))
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=512)
    p.add_argument("--long-share", type=float, default=0.25)
    p.add_argument("--max-batch-total-tokens", type=int, default=768,
                   help="each engine's KV budget: one long generation nearly fills it")  # fmt: skip
    p.add_argument(
        "--routing-stats-period-s",
        type=float,
        default=2.0,
        help="how often each engine's load reaches the router (the app's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    p.add_argument("--num-cpus", type=int, default=2, help="the local Ray cluster's CPUs")
    p.add_argument("--num-gpus", type=float, default=0,
                   help="GPUs per replica; 0.25 puts all four engines on one GPU")  # fmt: skip
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    command = "python -m benchmarks.routing " + " ".join(argv or sys.argv[1:])

    model_dir = resolve_model_dir(args.model_id)
    requests = skewed_requests(
        load_tokenizer(str(model_dir)), args.num_requests, args.input_len, args.short_tokens,
        args.long_tokens, args.long_share, args.seed,
    )  # fmt: skip
    prompts = prefix_workload()
    # A request, and a prefill step, may hold at most the whole KV budget.
    max_total_tokens = min(1024, args.max_batch_total_tokens)
    launcher_args = {"max_input_tokens": min(512, max_total_tokens - 1),
                     "max_total_tokens": max_total_tokens,
                     "max_batch_prefill_tokens": max_total_tokens,
                     "max_batch_total_tokens": args.max_batch_total_tokens}  # fmt: skip
    cluster = local_serve(args.num_cpus, log_to_driver=False)
    with cluster as base_url, contextlib.ExitStack() as apps:
        app_urls = {}
        for router in ROUTERS:
            deployment = {"num_replicas": 2, "request_router": router,
                          "routing_stats_period_s": args.routing_stats_period_s}  # fmt: skip
            args_ = app_args(str(model_dir), deployment, launcher_args, num_gpus=args.num_gpus)
            app_urls[router] = apps.enter_context(deployed(base_url, router, args_))
        engines = {router: (url, engine_urls(router, 2)) for router, url in app_urls.items()}
        measured = asyncio.run(measure(engines, requests, prompts, args))
    sides = {router: side for router, (side, _) in measured.items()}
    seen = {router: engines_saw for router, (_, engines_saw) in measured.items()}
    workload = {
        "rate": args.rate, "num_requests": args.num_requests,
        "num_long": sum(r.max_new_tokens == args.long_tokens for r in requests),
        "input_len": str(args.input_len), "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens, "long_share": args.long_share,
        "launcher_args": launcher_args, "seed": args.seed,
        "routing_stats_period_s": args.routing_stats_period_s,
        "model_id": args.model_id, "num_gpus_per_replica": args.num_gpus,
        "prefix_workload": "8 system prompts of 250 words x 3 questions, one at a time",
    }  # fmt: skip
    report = write_report("routing", command, sides, {"workload": workload, "engines": seen},
                          ratios=router_ratios, results_dir=args.results_dir)  # fmt: skip
    print(json.dumps({r: {k: v for k, v in e.items() if k != "requests"} for r, e in seen.items()},
                     indent=1))  # fmt: skip
    return 1 if any(s["num_errors"] for s in report["summaries"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
