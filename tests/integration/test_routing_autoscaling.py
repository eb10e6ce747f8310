"""Routing and autoscaling on a real local cluster: real Ray Serve, real engines, HTTP clients.

One Ray cluster for the module; each test deploys the app it needs (build_app, as
serve_config.yaml does) under its own route prefix and deletes it when done, so at most two
apps' engines share this machine's cores at once. Every engine is read directly on the
launcher URL its replica reports (`TGIServer.placement`), to see where requests landed.
The cluster, deploy and measuring helpers are benchmarks/routing.py's, which compares the
two routers at a larger scale.
"""

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from benchmarks.routing import (
    SERVER,
    app_args,
    deployed,
    engine_metrics,
    engine_urls,
    local_serve,
    prefix_cache_hits,
    prefix_workload,
)
from benchmarks.workload import WORDS

pytestmark = pytest.mark.slow

ROUTING_STATS_PERIOD_S = 0.5
DEPLOY_TIMEOUT_S = 240
# Long generations fit the per-request limit; a 3-deep batch of them fits the KV budget.
LAUNCHER_ARGS = {
    "max_input_tokens": 512,
    "max_total_tokens": 1536,
    "max_batch_prefill_tokens": 1536,
    "max_batch_total_tokens": 4096,
}


def _args(model_dir: Path, deployment: dict, launcher_args: dict = LAUNCHER_ARGS) -> dict:
    deployment = {"routing_stats_period_s": ROUTING_STATS_PERIOD_S,
                  "startup_timeout_s": DEPLOY_TIMEOUT_S, **deployment}  # fmt: skip
    return app_args(str(model_dir), deployment, launcher_args)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The Serve HTTP address of a fresh local cluster (2 CPUs; up to four engines of one
    thread each share them)."""
    with local_serve(num_cpus=2) as base_url:
        yield base_url


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.2)


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> None:
    """Read a streaming generation to its end; cancelling the task closes the connection,
    which stops the generation in the engine."""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for _ in response.aiter_lines():
            pass


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _generate(text: str, max_new_tokens: int) -> dict:
    return {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens}}


# --- the batching-aware router ------------------------------------------------------------


class TestBatchingAwareRouter:
    """Two replicas behind TGIRequestRouter, shared by the tests of this class."""

    @pytest.fixture(scope="class")
    def routed(self, cluster, default_model_dir) -> Iterator[tuple[str, list[str]]]:
        args = _args(default_model_dir, {"num_replicas": 2, "request_router": "batching_aware"})
        with deployed(cluster, "routed", args, DEPLOY_TIMEOUT_S) as url:
            yield url, engine_urls("routed", 2)

    def test_new_requests_go_to_the_replica_whose_engine_batch_has_room(self, routed):
        app_url, (busy, idle) = routed
        num_requests, num_long = 16, 3

        async def scenario() -> dict[str, float]:
            async with httpx.AsyncClient(timeout=120) as client:
                # Long generations straight into one engine, past Serve: only the load its
                # engine reports (record_routing_stats) can tell the router about them.
                long_body = _generate("Once upon a time", 1000)
                long_streams = [
                    asyncio.create_task(_stream(client, f"{busy}/generate_stream", long_body))
                    for _ in range(num_long)
                ]
                try:

                    async def busy_batch_full() -> bool:
                        metrics = await engine_metrics(client, busy)
                        return metrics["tgi_batch_current_size"] == num_long

                    await _until(busy_batch_full, 60, f"{num_long} long generations running")
                    await asyncio.sleep(4 * ROUTING_STATS_PERIOD_S)  # reported to the router
                    before = {u: (await engine_metrics(client, u))["tgi_request_count"]
                              for u in (busy, idle)}  # fmt: skip
                    limit = asyncio.Semaphore(2)

                    async def short(i: int) -> None:
                        async with limit:
                            body = _generate(f"Question {i}: what is {i} plus {i}?", 4)
                            answer = await client.post(f"{app_url}/generate", json=body)
                            assert answer.status_code == 200, answer.text

                    await asyncio.gather(*(short(i) for i in range(num_requests)))
                    after = {u: (await engine_metrics(client, u))["tgi_request_count"]
                             for u in (busy, idle)}  # fmt: skip
                    assert not any(t.done() for t in long_streams), "a long generation ended"
                finally:
                    await _cancel(long_streams)

                async def busy_drained() -> bool:
                    return (await engine_metrics(client, busy))["tgi_batch_current_size"] == 0

                await _until(busy_drained, 30, "the long generations stopped")
            return {u: after[u] - before[u] for u in after}

        landed = asyncio.run(scenario())
        print(f"\n{num_requests} short requests: {landed[idle]:.0f} to the idle replica, "
              f"{landed[busy]:.0f} to the busy one")  # fmt: skip
        assert landed[busy] + landed[idle] == num_requests, landed
        assert landed[idle] >= 0.8 * num_requests, f"idle {landed[idle]}, busy {landed[busy]}"

    def test_prefix_affinity_raises_the_prefix_cache_hit_rate(
        self, cluster, routed, default_model_dir
    ):
        prompts = prefix_workload()
        app_url, engines = routed
        ours = asyncio.run(prefix_cache_hits(app_url, engines, prompts))
        args = _args(default_model_dir, {"num_replicas": 2, "request_router": "power_of_two"})
        with deployed(cluster, "p2c", args, DEPLOY_TIMEOUT_S) as p2c_url:
            theirs = asyncio.run(prefix_cache_hits(p2c_url, engine_urls("p2c", 2), prompts))
        print(f"\nprefix cache, batching_aware: {ours}\nprefix cache, power_of_two:   {theirs}")
        # Ideal affinity reuses every repeat's system prompt: 2 of 3 prompts' blocks; a
        # random choice of two replicas reuses 1.25 of 3 on average.
        assert ours["hits_per_prompt_block"] >= 0.55
        assert ours["hits_per_prompt_block"] >= theirs["hits_per_prompt_block"] + 0.1
        assert ours["hits_per_lookup"] > theirs["hits_per_lookup"]


# --- autoscaling on the engines' queues ---------------------------------------------------


def _replica_states(app: str) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None or SERVER not in status.deployments:
        return {}
    return {k: v for k, v in status.deployments[SERVER].replica_states.items() if v}


def test_autoscaling_from_zero_up_on_a_queue_and_down_when_idle(cluster, default_model_dir):
    app = "scaled"
    autoscaling = {"min_replicas": 0, "max_replicas": 2, "target_queued_per_replica": 2,
                   "target_batch_token_usage": 1.0, "upscale_delay_s": 1,
                   "downscale_delay_s": 5, "downscale_to_zero_delay_s": 20,
                   "metrics_interval_s": 0.5, "look_back_period_s": 2}  # fmt: skip
    # A small KV budget (128 blocks of 16 tokens), which four long prompts fill.
    launcher_args = {**LAUNCHER_ARGS, "max_total_tokens": 1024, "max_batch_total_tokens": 2048}
    args = _args(default_model_dir, {"autoscaling": autoscaling}, launcher_args)

    async def until_replicas(running: int, timeout_s: float) -> float:
        started = time.monotonic()

        async def reached() -> bool:
            return _replica_states(app) == ({"RUNNING": running} if running else {})

        await _until(reached, timeout_s, f"{running} running replicas ({_replica_states(app)})")
        return time.monotonic() - started

    async def scenario(app_url: str) -> dict[str, float]:
        took = {}
        handle = serve.get_deployment_handle(SERVER, app)
        async with httpx.AsyncClient(timeout=240) as client:
            # 0 -> 1: the first request waits for the cold start, and succeeds.
            assert _replica_states(app) == {}
            started = time.monotonic()
            answer = await client.post(f"{app_url}/generate", json=_generate("Hello", 4))
            assert answer.status_code == 200, answer.text
            took["0->1, first answer"] = time.monotonic() - started
            assert _replica_states(app) == {"RUNNING": 1}

            # Requests the batch absorbs (no engine queue) do not add a replica, though
            # Serve's default policy would (4 ongoing > target_ongoing_requests 2).
            async def closed_loop(i: int, until: float) -> None:
                while time.monotonic() < until:
                    body = _generate(f"Count from {i} to {i + 20}:", 24)
                    answer = await client.post(f"{app_url}/generate", json=body)
                    assert answer.status_code == 200, answer.text

            until = time.monotonic() + 8
            absorbed = [asyncio.create_task(closed_loop(i, until)) for i in range(4)]
            try:
                while time.monotonic() < until:
                    assert _replica_states(app) == {"RUNNING": 1}, "scaled up without a queue"
                    await asyncio.sleep(0.5)
                await asyncio.gather(*absorbed)
            finally:
                await _cancel(absorbed)

            # 1 -> 2: distinct ~450-token prompts; four of them take the KV blocks, so the
            # other clients' requests wait in the engine's queue while the batch reserves
            # less than target_batch_token_usage: only the queue can add the replica.
            placement = await handle.placement.remote()
            rng = random.Random(0)

            async def long_prompts() -> None:
                while True:
                    prompt = " ".join(rng.choice(WORDS) for _ in range(450))
                    await _stream(client, f"{app_url}/generate_stream", _generate(prompt, 16))

            async def engine_queue_formed() -> bool:
                metrics = await engine_metrics(client, placement["launcher_url"])
                return metrics["tgi_queue_size"] >= 4

            load = [asyncio.create_task(long_prompts()) for _ in range(14)]
            try:
                await _until(engine_queue_formed, 60, "4 requests queued in the engine")
                took["1->2 under a queue"] = await until_replicas(2, 120)
            finally:
                await _cancel(load)
            # 2 -> 1 once idle for downscale_delay_s, and 1 -> 0 after the longer
            # downscale_to_zero_delay_s (so the step through 1 is seen).
            took["2->1 idle"] = await until_replicas(1, 60)
            took["1->0 idle"] = await until_replicas(0, 60)
        return took

    with deployed(cluster, app, args, DEPLOY_TIMEOUT_S) as app_url:
        took = asyncio.run(scenario(app_url))
    print("\nautoscaling: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
