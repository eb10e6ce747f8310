"""examples/handle_client.py: another Serve app calls ray-tgi's models through handles (the
app's, which routes by model name, and a model's own deployment handle), on a real cluster
with the real engine."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from serve_cluster import FIRST, MID_PROMPT, QUESTION, TINY

from deployments.errors import TGIError
from examples.handle_client import APP_NAME
from examples.handle_client import app as handle_client_app

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client(two_model_app):
    serve.run(handle_client_app, name=APP_NAME, route_prefix=f"/{APP_NAME}")
    return serve.get_app_handle(APP_NAME)


@pytest.mark.parametrize("via", ["app", "deployment"])
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_generate_and_generate_stream_through_either_handle(client, via, method):
    answer = getattr(client, method).remote(QUESTION, model=TINY, via=via)
    assert "Paris" in answer.result(timeout_s=TIMEOUT_S)


def test_the_app_handle_picks_the_model_by_name(client):
    # About 100 tokens: smollm2 takes them, smollm2-tiny (64 at most) refuses them.
    assert client.generate.remote(MID_PROMPT, max_new_tokens=2).result(timeout_s=TIMEOUT_S)
    with pytest.raises(TGIError) as refused:
        client.generate.remote(MID_PROMPT, max_new_tokens=2, model=TINY).result(timeout_s=TIMEOUT_S)
    assert "validation" in str(refused.value)
    with pytest.raises(TGIError) as unknown:
        client.generate.remote(QUESTION, model="nope").result(timeout_s=TIMEOUT_S)
    assert "not_found" in str(unknown.value)


def test_the_client_app_over_http(client, two_model_app):
    body = {"question": QUESTION, "model": FIRST, "via": "deployment", "stream": True}
    answer = httpx.post(f"{two_model_app}/{APP_NAME}", json=body, timeout=TIMEOUT_S)
    assert answer.status_code == 200 and "Paris" in answer.json()["generated_text"]


def test_the_example_runs_as_documented(client):
    """`python examples/handle_client.py QUESTION` against a running cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "examples/handle_client.py", QUESTION],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "handle, /generate" in line]
    assert len(lines) == 2 and all("Paris" in line for line in lines), done.stdout
