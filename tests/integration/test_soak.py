"""Soak, over loopback only and bounded: 2,000 requests at 16 concurrency through the whole
path (real cluster, real engine, real HTTP), 10% of them cancelled mid-stream by their
client. No error but the cancellations; the engine's memory is reported at the start and
the end; every KV block is free at the end. Generations are short, so it fits CI (~5 min).
"""

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rel_cluster import (
    app_at,
    engine_drained,
    engine_metrics,
    model_args,
    placements,
    rss_mib,
    wait_until,
)
from serve_cluster import serve_cluster

from benchmarks.workload import WORDS

pytestmark = pytest.mark.slow

APP = "soak"
ARTIFACTS = Path(__file__).parent / "artifacts"  # ignored by git
NUM_REQUESTS, CONCURRENCY, CANCEL_EVERY = 2000, 16, 10
WALL_BOUND_S = 900  # a hard stop: the loop never runs longer
LAUNCHER_ARGS = {"max_input_tokens": 128, "max_total_tokens": 256,
                 "max_batch_prefill_tokens": 1024, "max_batch_total_tokens": 8192}  # fmt: skip


@pytest.fixture(scope="module")
def app(default_model_dir: Path) -> Iterator[tuple[str, dict]]:
    with serve_cluster() as base, app_at(base, APP, model_args(default_model_dir,
                                                               LAUNCHER_ARGS)) as url:  # fmt: skip
        (placement,) = placements(APP)
        yield url, placement


def _request(i: int) -> tuple[str, dict, bool]:
    """(path, body, cancel mid-stream?) of request i: mostly TGI streams, some OpenAI chat
    streams and non-streaming requests; every CANCEL_EVERY-th a longer stream to cancel."""
    prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4 + i % 9))
    if i % CANCEL_EVERY == 0:
        return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": 64}}, True
    if i % 5 == 1:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                "stream": True}  # fmt: skip
        return "/v1/chat/completions", body, False
    if i % 5 == 2:
        return "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 6}}, False
    return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": 6}}, False


async def _one(client: httpx.AsyncClient, url: str, i: int) -> str:
    """Run request i; its outcome: "ok", "cancelled", or an error description."""
    path, body, cancel = _request(i)
    if path == "/generate":
        reply = await client.post(f"{url}{path}", json=body)
        ok = reply.status_code == 200 and "generated_text" in reply.json()
        return "ok" if ok else f"{path} {reply.status_code} {reply.text[:200]}"
    async with client.stream("POST", f"{url}{path}", json=body) as reply:
        if reply.status_code != 200:
            return f"{path} {reply.status_code} {(await reply.aread())[:200]!r}"
        events = []
        async for line in reply.aiter_lines():
            if line.startswith("data:"):
                events.append(line[len("data:") :].strip())
                if cancel and len(events) == 2:
                    return "cancelled"  # leaving the `async with` closes the connection
    # An error event is an object with an "error" key; a chunk whose text is the token
    # "error" also holds the characters "error" in quotes (`"content": "error"`).
    failed = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
    if not events or failed:
        return f"{path} events {(failed or events)[:1]} ... {events[-1:]}"
    if path == "/generate_stream":
        done = json.loads(events[-1]).get("generated_text") is not None
    else:
        done = events[-1] == "[DONE]"
    return "ok" if done else f"{path} unfinished {events[-1][:200]}"


def test_soak_2000_requests_at_16_concurrency_with_10_percent_cancelled(app):
    url, placement = app
    engine, pid = placement["launcher_url"], placement["launcher_pid"]

    async def soak() -> tuple[Counter, list[str], float, float]:
        outcomes: Counter = Counter()
        errors: list[str] = []
        next_index = iter(range(NUM_REQUESTS))
        deadline = time.monotonic() + WALL_BOUND_S

        async def worker(client: httpx.AsyncClient) -> None:
            for i in next_index:
                if time.monotonic() > deadline:
                    errors.append("wall-time bound reached")
                    return
                try:
                    outcome = await _one(client, url, i)
                except httpx.HTTPError as exc:
                    outcome = f"request {i}: {type(exc).__name__}: {exc}"
                outcomes["ok" if outcome == "ok" else outcome if outcome == "cancelled"
                         else "error"] += 1  # fmt: skip
                if outcome not in ("ok", "cancelled"):
                    errors.append(outcome)

        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(_one(client, url, 1) for _ in range(CONCURRENCY)))  # warm
            rss_start = rss_mib(pid)
            started = time.monotonic()
            await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
            return outcomes, errors, time.monotonic() - started, rss_start

    outcomes, errors, wall_s, rss_start = asyncio.run(soak())
    wait_until(lambda: engine_drained(engine), 30, "the engine drained")
    rss_end = rss_mib(pid)
    free, total = (engine_metrics(engine)[k] for k in ("ray_tgi_kv_blocks_free",
                                                        "ray_tgi_kv_blocks_total"))  # fmt: skip
    figures = {
        "requests": sum(outcomes.values()),
        "concurrency": CONCURRENCY,
        "ok": outcomes["ok"],
        "cancelled": outcomes["cancelled"],
        "errors": len(errors),
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "wall_s": round(wall_s, 1),
        "kv_blocks_free": free,
        "kv_blocks_total": total,
    }
    ARTIFACTS.mkdir(exist_ok=True)  # the figures, also when pytest captures the print
    (ARTIFACTS / "soak.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"\nsoak: {sum(outcomes.values())} requests at {CONCURRENCY} concurrency in "
          f"{wall_s:.1f} s ({sum(outcomes.values()) / wall_s:.1f} req/s): {outcomes['ok']} ok, "
          f"{outcomes['cancelled']} cancelled mid-stream, {len(errors)} errors; engine RSS "
          f"{rss_start:.0f} MiB at the start, {rss_end:.0f} MiB at the end; KV blocks free "
          f"{free:.0f}/{total:.0f}")  # fmt: skip
    assert errors == []
    assert outcomes == {"ok": NUM_REQUESTS - NUM_REQUESTS // CANCEL_EVERY,
                        "cancelled": NUM_REQUESTS // CANCEL_EVERY}  # fmt: skip
    assert free == total
    assert rss_end < rss_start * 1.25, (rss_start, rss_end)  # no per-request leak
