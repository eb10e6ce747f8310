"""Faults on a real cluster with the real engine and real HTTP clients: clients that leave at
any point, a `kill -9` of a replica's launcher, a dead shard, and a rolling update under load.

One Ray cluster for the module. The app `faults` (one replica, health-checked every second)
serves the first tests; the dead-shard test deploys a two-shard app of its own; the rolling
update runs last, on `faults`, as it replaces its replica.
"""

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from ray import serve
from rel_cluster import (
    CHAT_PROMPT,
    app_at,
    engine_drained,
    engine_metrics,
    model_args,
    placements,
    sse_data,
    wait_until,
)
from serve_cluster import serve_cluster

from serve_app.app import build_app

pytestmark = pytest.mark.slow

APP = "faults"
LAUNCHER_ARGS = {"max_input_tokens": 1200, "max_total_tokens": 2048, "max_batch_size": 2,
                 "max_batch_prefill_tokens": 2048, "max_batch_total_tokens": 8192}  # fmt: skip
DEPLOYMENT = {"health_check_period_s": 1, "health_check_timeout_s": 10,
              "graceful_shutdown_timeout_s": 120}  # fmt: skip
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500}}
RECOVERY_BOUND_S = 180  # a new replica: a new engine process loads the model


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with serve_cluster() as base:
        yield base


@pytest.fixture(scope="module")
def faults_app(cluster, default_model_dir) -> Iterator[str]:
    with app_at(cluster, APP, _faults_args(default_model_dir, LAUNCHER_ARGS)) as url:
        yield url


def _faults_args(model_dir: Path, launcher_args: dict) -> dict:
    # A redeploy replaces the ingress replica too: it drains its streams as long as the
    # model's replica does.
    ingress = {"graceful_shutdown_timeout_s": DEPLOYMENT["graceful_shutdown_timeout_s"]}
    return model_args(model_dir, launcher_args, DEPLOYMENT, ingress)


def _engine() -> dict:
    (placement,) = placements(APP)
    return placement


def _raw_post(url: str, path: str, body: dict, declared_length: int | None = None) -> socket.socket:
    """A POST over a plain socket, so the test decides when the client goes."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    length = len(payload) if declared_length is None else declared_length
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = (f"POST {parts.path}{path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + (payload if declared_length is None else payload[:10]))
    return sock


def _received(sock: socket.socket) -> bytes:
    sock.settimeout(0)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


def test_clients_leaving_at_any_point_free_the_engines_blocks(faults_app):
    url, engine = faults_app, _engine()["launcher_url"]
    free_total = engine_metrics(engine)["ray_tgi_kv_blocks_total"]
    took = {}

    # Before its body is complete: never dispatched.
    before = engine_metrics(engine)["tgi_request_count"]
    _raw_post(url, "/generate", LONG, declared_length=500).close()
    time.sleep(0.5)
    assert engine_metrics(engine)["tgi_request_count"] == before

    # During prefill: a ~1,100-token prompt, the client gone as soon as the engine has
    # validated it (its counter moves), before its first token.
    long_prompt = {"inputs": "one two three four five " * 220, "parameters": {"max_new_tokens": 50}}
    sock = _raw_post(url, "/generate_stream", long_prompt)
    wait_until(lambda: engine_metrics(engine)["tgi_request_count"] == before + 1, 30,
               "the engine has the request", period_s=0.01)  # fmt: skip
    assert b"data:" not in _received(sock)  # no token yet
    sock.close()
    took["during prefill"] = wait_until(lambda: engine_drained(engine), 20, "prefill dropped")

    # Non-streaming, mid-generation: no response byte yet (headers come at the end).
    sock = _raw_post(url, "/generate", LONG)
    wait_until(lambda: engine_metrics(engine)["tgi_batch_current_size"] == 1, 30, "running")
    time.sleep(1.0)
    assert _received(sock) == b""
    sock.close()
    took["before headers"] = wait_until(lambda: engine_drained(engine), 20, "generate dropped")

    # Mid-stream, after some tokens.
    with httpx.stream("POST", f"{url}/generate_stream", json=LONG, timeout=60) as stream:
        lines = stream.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines, strict=False) if line) >= 3
    took["mid-stream"] = wait_until(lambda: engine_drained(engine), 20, "stream dropped")

    # Waiting in the engine's queue (max_batch_size 2 are running), then the runners too.
    runners = [_raw_post(url, "/generate_stream", LONG) for _ in range(2)]
    wait_until(lambda: engine_metrics(engine)["tgi_batch_current_size"] == 2, 30, "2 running")
    waiter = _raw_post(url, "/generate_stream", LONG)
    wait_until(lambda: engine_metrics(engine)["tgi_queue_size"] == 1, 30, "1 queued")
    waiter.close()
    wait_until(lambda: engine_metrics(engine)["tgi_queue_size"] == 0, 20, "queued one dropped")
    assert engine_metrics(engine)["tgi_batch_current_size"] == 2
    for sock in runners:
        sock.close()
    took["queued, then running"] = wait_until(lambda: engine_drained(engine), 20, "all dropped")

    assert engine_metrics(engine)["ray_tgi_kv_blocks_free"] == free_total
    assert engine_metrics(engine)["tgi_request_success"] == 0  # none was run to its end
    drained = ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
    print(f"\nclient left -> engine drained: {drained}")
    reply = httpx.post(f"{url}/generate", json={"inputs": CHAT_PROMPT,
                       "parameters": {"max_new_tokens": 8}}, timeout=60)  # fmt: skip
    assert "Paris" in reply.json()["generated_text"]


async def _stream_events(client: httpx.AsyncClient, url: str, body: dict) -> list[str]:
    async with client.stream("POST", f"{url}/generate_stream", json=body) as response:
        assert response.status_code == 200, await response.aread()
        return sse_data([line async for line in response.aiter_lines()])


def test_kill_9_of_the_launcher_ends_requests_in_flight_and_serve_replaces_the_replica(
    faults_app,
):
    url, old = faults_app, _engine()
    launcher = psutil.Process(old["launcher_pid"])

    async def scenario() -> tuple[list, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            in_flight = [asyncio.create_task(_stream_events(client, url, LONG)) for _ in range(2)]
            in_flight.append(asyncio.create_task(client.post(f"{url}/generate", json=LONG)))
            engine = old["launcher_url"]
            while engine_metrics(engine)["tgi_batch_current_size"] < 2:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            os.kill(launcher.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # Every request in flight ends (no hang), with an error that says why.
            results = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=30)
            # New requests: each answered (an error while the replica is replaced), until
            # one succeeds on the new replica.
            outcomes = []
            while time.monotonic() - killed_at < RECOVERY_BOUND_S:
                body = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 8}}
                reply = await client.post(f"{url}/generate", json=body)
                outcomes.append(reply.status_code)
                if reply.status_code == 200:
                    assert "Paris" in reply.json()["generated_text"]
                    break
                assert set(reply.json()) == {"error", "error_type"}, reply.text
                await asyncio.sleep(1.0)
            return [*results, outcomes], time.monotonic() - killed_at

    (stream1, stream2, plain, outcomes), recovered_s = asyncio.run(scenario())
    for events in (stream1, stream2):  # tokens (none if it was still queued), then the error
        assert all('"token"' in event for event in events[:-1])
        error = json.loads(events[-1])
        assert error["error_type"] == "unavailable", error
        assert "the engine of this replica exited with status -9" in error["error"]
    assert plain.status_code == 503 and plain.json()["error_type"] == "unavailable"
    assert "exited with status -9" in plain.json()["error"]
    assert outcomes[-1] == 200, outcomes
    print(f"\nkill -9: new requests succeed {recovered_s:.1f} s later "
          f"({len(outcomes) - 1} refused meanwhile, statuses {sorted(set(outcomes))})")  # fmt: skip
    new = _engine()
    assert new["replica_id"] != old["replica_id"]  # Serve replaced the replica
    assert new["launcher_pid"] != old["launcher_pid"]
    assert not launcher.is_running() or launcher.status() == psutil.STATUS_ZOMBIE


def test_a_dead_shard_ends_the_launcher_and_serve_replaces_the_replica(
    cluster, faults_app, default_model_dir
):
    app = "sharded"
    args = model_args(default_model_dir, {"max_total_tokens": 1024,
                      "max_batch_total_tokens": 2048}, DEPLOYMENT, num_cpus=0.4)  # fmt: skip
    args["models"][0]["num_shard"] = 2
    with app_at(cluster, app, args) as url:
        (old,) = placements(app)
        launcher = psutil.Process(old["launcher_pid"])
        (shard,) = [c for c in launcher.children() if "engine.shard" in " ".join(c.cmdline())]

        async def scenario() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 900}}
                stream = asyncio.create_task(_stream_events(client, url, body))
                await asyncio.sleep(3.0)
                shard.send_signal(signal.SIGKILL)
                return await asyncio.wait_for(stream, timeout=60)

        events = asyncio.run(scenario())
        # The stream ends with an error event: the engine's own (its loop lost the shard's
        # connection) or the replica's (the launcher was gone before the engine said so).
        error = json.loads(events[-1])
        assert set(error) == {"error", "error_type"}, error
        assert error["error_type"] in ("generation", "unavailable"), error
        # The launcher exited on its own, saying which shard died.
        wait_until(lambda: not launcher.is_running() or launcher.status() == "zombie", 30,
                   "the launcher exited")  # fmt: skip
        log = Path(old["launcher_log"]).read_text()
        assert "shard 1 exited with code -9; stopping" in log
        # Serve's health check saw it and replaced the replica, which serves again.
        wait_until(lambda: placements(app)[0]["replica_id"] != old["replica_id"],
                   RECOVERY_BOUND_S, "a new replica")  # fmt: skip
        body = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 8}}
        deadline = time.monotonic() + RECOVERY_BOUND_S
        while (reply := httpx.post(f"{url}/generate", json=body, timeout=60)).status_code != 200:
            assert time.monotonic() < deadline, reply.text
            time.sleep(1)
        assert "Paris" in reply.json()["generated_text"]


def test_a_rolling_update_with_16_streams_in_flight_completes_all_16(faults_app, default_model_dir):
    url, old = faults_app, _engine()
    num_streams, max_new_tokens = 16, 40
    # A launcher flag changes: Serve must replace the replica (a new engine process).
    launcher_args = {**LAUNCHER_ARGS, "max_batch_size": 16, "max_concurrent_requests": 100}
    updated = _faults_args(default_model_dir, launcher_args)

    async def scenario() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=300) as client:
            prompts = [f"Story {i}: once upon a time" for i in range(num_streams)]
            bodies = [{"inputs": p, "parameters": {"max_new_tokens": max_new_tokens,
                       "details": True}} for p in prompts]  # fmt: skip
            streams = [asyncio.create_task(_stream_events(client, url, b)) for b in bodies]
            engine = old["launcher_url"]
            while engine_metrics(engine)["tgi_request_count"] < num_streams:
                await asyncio.sleep(0.1)
            serve._run(build_app(updated), _blocking=False, name=APP, route_prefix=f"/{APP}")
            return await asyncio.wait_for(asyncio.gather(*streams), timeout=300)

    results = asyncio.run(scenario())
    for events in results:
        last = json.loads(events[-1])
        assert "error" not in last, last
        assert last["details"]["generated_tokens"] == max_new_tokens or (
            last["details"]["finish_reason"] == "eos_token"
        )
    print(f"\nrolling update: {len(results)} of {num_streams} streams completed")

    def updated_and_serving() -> bool:
        status = serve.status().applications[APP]
        return status.status == "RUNNING" and _engine()["launcher_pid"] != old["launcher_pid"]

    wait_until(updated_and_serving, RECOVERY_BOUND_S, "the new replica runs")
    assert httpx.get(f"{url}/info", timeout=30).json()["max_concurrent_requests"] == 100
    reply = httpx.post(f"{url}/generate", json={"inputs": CHAT_PROMPT,
                       "parameters": {"max_new_tokens": 8}}, timeout=60)  # fmt: skip
    assert "Paris" in reply.json()["generated_text"]
