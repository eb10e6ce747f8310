"""Swapping a served model blue/green with `serve deploy`, as README tells it: the model keeps
its name, the config's `model_id` (and here its quantization) changes, and with
`max_surge_percent: 100` Serve starts the green replica before it drains the blue one.

A real local cluster with its dashboard (the address `serve deploy` talks to), the real CLI,
the real engine. While the swap runs, a long stream started on blue must end complete, and
short requests sent every 0.5 s must all succeed; afterwards only green answers and blue's
engine process is gone.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import ray
import yaml
from ray import serve

from deployments.launcher import free_port

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = Path(sys.executable).with_name("serve")
APP, SERVER = "ray-tgi", "TGIServer:chat"
STREAM_TOKENS = 400  # ~30 s on blue: still streaming when green takes over
STORY = (
    "<|im_start|>user\nWrite a long story about a dragon named Ember.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SWAP_TIMEOUT_S = 240


def config(model_dir: Path, port: int, quantize: str | None) -> dict:
    launcher_args = {"max_input_tokens": 256, "max_total_tokens": 512,
                     "max_batch_prefill_tokens": 512, "max_batch_total_tokens": 2048}  # fmt: skip
    if quantize:
        launcher_args["quantize"] = quantize
    model = {
        "name": "chat",
        "model_id": str(model_dir),
        "resources": {"num_cpus": 0.5},
        "deployment": {
            "num_replicas": 1,
            "max_surge_percent": 100,
            "graceful_shutdown_timeout_s": 120,
        },  # fmt: skip
        "launcher_args": launcher_args,
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "runtime_env": {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}},
            "args": {"models": [model], "ingress": {"num_cpus": 0.1, "max_surge_percent": 100,
                                                    "graceful_shutdown_timeout_s": 120}},
        }],
    }  # fmt: skip


def serve_deploy(path: Path, dashboard: str) -> None:
    subprocess.run([str(SERVE), "deploy", str(path), "-a", dashboard], check=True,
                   cwd=REPO_ROOT, timeout=120, capture_output=True)  # fmt: skip


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, ValueError, KeyError):  # not up yet: no route, no JSON
            pass
        time.sleep(1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def model_id(url: str) -> str:
    return httpx.get(f"{url}/info", timeout=30).json()["model_id"]


def launcher_pids() -> set[int]:
    return {
        child.pid
        for replica in psutil.process_iter(["pid"])
        for child in _children(replica)
        if _is_engine(child)
    }


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children()
    except psutil.Error:
        return []


def _is_engine(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return any(a == "-m" and b == "engine" for a, b in zip(cmdline, cmdline[1:], strict=False))


@pytest.fixture(scope="module")
def cluster():
    dashboard_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_blue_green_swap_drops_no_stream_and_no_request(cluster, default_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    blue_dir, green_dir = default_model_dir, tmp_path / "green"
    green_dir.symlink_to(default_model_dir, target_is_directory=True)  # a new model_id
    blue, green = tmp_path / "blue.yaml", tmp_path / "green.yaml"
    blue.write_text(yaml.safe_dump(config(blue_dir, port, quantize=None)))
    green.write_text(yaml.safe_dump(config(green_dir, port, quantize="eetq")))

    serve_deploy(blue, cluster)
    wait_until(lambda: model_id(url) == str(blue_dir), SWAP_TIMEOUT_S, "blue answers")
    blue_pids = launcher_pids()
    assert len(blue_pids) == 1

    stream_events: list[tuple[float, dict]] = []  # (when, event)
    started = threading.Event()

    def stream() -> None:
        body = {"inputs": STORY, "parameters": {"max_new_tokens": STREAM_TOKENS, "details": True}}
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    stream_events.append((time.monotonic(), json.loads(line[5:])))
                    started.set()

    polls: list[tuple[float, int, str]] = []  # (when, status, model id that answered)
    stop_polling = threading.Event()

    def poll() -> None:
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        while not stop_polling.is_set():
            try:
                reply = httpx.post(f"{url}/generate", json=body, timeout=60)
                info = httpx.get(f"{url}/info", timeout=60).json().get("model_id", "")
                polls.append((time.monotonic(), reply.status_code, info))
            except httpx.HTTPError as exc:
                polls.append((time.monotonic(), 0, type(exc).__name__))
            time.sleep(0.5)

    streamer = threading.Thread(target=stream)
    poller = threading.Thread(target=poll)
    streamer.start()
    assert started.wait(60), "the stream did not start"
    poller.start()
    serve_deploy(green, cluster)
    try:
        wait_until(lambda: serve.status().applications[APP].deployments[SERVER]
                   .replica_states == {"RUNNING": 1} and model_id(url) == str(green_dir),
                   SWAP_TIMEOUT_S, "green alone serves")  # fmt: skip
        streamer.join(timeout=300)
    finally:
        stop_polling.set()
        poller.join(timeout=120)

    # Every request during the swap succeeded; blue answered, then green.
    assert polls and all(status == 200 for _, status, _ in polls), polls
    answered_by = [model for _, _, model in polls]
    assert answered_by[0] == str(blue_dir) and answered_by[-1] == str(green_dir)
    green_serving_at = next(when for when, _, model in polls if model == str(green_dir))
    # The stream begun on blue was still running when green took over, and ran to its end.
    last_at, last = stream_events[-1]
    assert last_at > green_serving_at, "the stream ended before the swap: nothing was tested"
    assert "error" not in last and last["generated_text"]
    assert len(stream_events) == last["details"]["generated_tokens"]
    assert last["details"]["finish_reason"] in ("length", "eos_token")
    # Blue's engine is gone; green's is the one left.
    assert not any(psutil.pid_exists(pid) for pid in blue_pids)
    assert len(launcher_pids() - blue_pids) == 1
