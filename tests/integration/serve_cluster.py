"""A real local Ray cluster with Serve on a free port, and a two-model ray-tgi app on it.

The two models are the same weights under two names with different limits, so a request's
model shows in what it is allowed: `smollm2` (the first, the default) takes prompts up to
512 tokens, `smollm2-tiny` only 64 (and /info reports each one's max_total_tokens).
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray import serve

from deployments.launcher import free_port
from serve_app.app import build_app

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "ray-tgi"
FIRST, TINY = "smollm2", "smollm2-tiny"
MAX_TOTAL_TOKENS = {FIRST: 1024, TINY: 128}
QUESTION = "What is the capital of France?"
CHAT_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
# About 100 tokens: over smollm2-tiny's max_input_tokens (64), well within smollm2's (512).
MID_PROMPT = "one two three four five " * 20


TWO_MODELS_CONFIG = REPO_ROOT / "examples" / "serve_config_two_models.yaml"


def two_model_args() -> dict[str, Any]:
    """`args` of the two-model example config (`smollm2` first), as `serve run` reads them."""
    config = yaml.safe_load(TWO_MODELS_CONFIG.read_text())
    return config["applications"][0]["args"]


@contextmanager
def serve_cluster(num_cpus: int = 2, environ: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh local Ray cluster and Serve's HTTP proxy on a free port; yields its URL.

    `address="local"`: never join a cluster another test or engineer left running. No
    dashboard: nothing here reads it, and it costs a process and a fixed port. `environ` is
    set in this process before Ray starts, so Ray's processes (and the replicas) inherit it,
    as they inherit the environment of whoever starts a cluster.
    """
    saved = {k: os.environ.get(k) for k in environ or {}}
    os.environ.update(environ or {})
    # The engines share two cores with everything else: one thread each.
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": env})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def deploy_two_models() -> None:
    """Deploy the two-model example app and wait (bounded by Serve) until both answer."""
    (application,) = yaml.safe_load(TWO_MODELS_CONFIG.read_text())["applications"]
    serve.run(build_app(application["args"]), name=APP_NAME, route_prefix="/",
              logging_config=application.get("logging_config"))  # fmt: skip


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, period_s: float = 0.2
) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(period_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def model_stats(url: str) -> dict[str, dict[str, Any]]:
    """GET /stats, by model name."""
    answer = httpx.get(f"{url}/stats", timeout=30)
    answer.raise_for_status()
    return {entry["name"]: entry for entry in answer.json()["models"]}


def engines_idle(url: str) -> bool:
    """True when no model's engine has a request queued or running."""
    stats = model_stats(url).values()
    return all(s.get("queued_requests") == 0 and s.get("running_requests") == 0 for s in stats)
