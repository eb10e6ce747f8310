"""Helpers of the reliability tests (auth and limits, faults, bad input, soak): a real local
Ray cluster, apps deployed with build_app as serve_config.yaml would, and the engine read
directly on the launcher URL its replica reports (TGIServer.placement)."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
from ray import serve

from benchmarks.routing import deployed

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
SERVER = f"TGIServer:{MODEL}"
DEPLOY_TIMEOUT_S = 240
QUESTION = "What is the capital of France?"
CHAT_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def model_args(
    model_dir: Path,
    launcher_args: dict[str, Any],
    deployment: dict[str, Any] | None = None,
    ingress: dict[str, Any] | None = None,
    num_cpus: float = 0.5,
) -> dict[str, Any]:
    """build_app's args: the default model under MODEL, these options."""
    deployment = {"startup_timeout_s": DEPLOY_TIMEOUT_S, **(deployment or {})}
    model = {"name": MODEL, "model_id": str(model_dir), "resources": {"num_cpus": num_cpus},
             "deployment": deployment, "launcher_args": launcher_args}  # fmt: skip
    return {"models": [model], "ingress": {"num_cpus": 0.1, **(ingress or {})}}


@contextmanager
def app_at(base_url: str, name: str, args: dict[str, Any]) -> Iterator[str]:
    """The app deployed at /NAME, running; yields its URL; deleted after."""
    with deployed(base_url, name, args, DEPLOY_TIMEOUT_S) as url:
        yield url


def placements(app: str, num_replicas: int = 1, timeout_s: float = 60) -> list[dict[str, Any]]:
    """TGIServer.placement of each running replica (launcher pid and URL)."""
    handle = serve.get_deployment_handle(SERVER, app)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < num_replicas and time.monotonic() < deadline:
        placement = handle.placement.remote().result(timeout_s=timeout_s)
        seen[placement["replica_id"]] = placement
    assert len(seen) == num_replicas, seen
    return list(seen.values())


def engine_metrics(engine_url: str) -> dict[str, float]:
    """The engine's unlabelled samples (`name value` lines) of GET /metrics."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def kv_blocks(engine_url: str) -> tuple[int, int]:
    """(free, total) KV blocks of the engine."""
    m = engine_metrics(engine_url)
    return int(m["ray_tgi_kv_blocks_free"]), int(m["ray_tgi_kv_blocks_total"])


def engine_drained(engine_url: str) -> bool:
    """No request queued or running, and every KV block free (prefix-cached blocks count as
    free: they are reused or evicted on demand)."""
    m = engine_metrics(engine_url)
    return (
        m["tgi_queue_size"] == 0
        and m["tgi_batch_current_size"] == 0
        and m["ray_tgi_kv_blocks_free"] == m["ray_tgi_kv_blocks_total"]
    )


def wait_until(predicate, timeout_s: float, what: str, period_s: float = 0.2) -> float:
    """Poll `predicate` until it holds; the seconds it took; AssertionError after timeout_s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(period_s)
    return time.monotonic() - started


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the launcher and its shards), MiB."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20


def sse_data(lines: list[str]) -> list[str]:
    """The `data:` payloads of SSE lines (keep-alive comments and blanks dropped)."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]
