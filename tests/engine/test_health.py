"""GET /health answers 503 in TGI's shape once the engine loop has died."""

import os

import pytest
from fastapi.testclient import TestClient

from engine.__main__ import build
from engine.args import parse_launcher_args

pytestmark = pytest.mark.slow


def test_health_is_503_when_the_engine_loop_is_dead(default_model_dir):
    args = parse_launcher_args(["--model-id", str(default_model_dir), "--max-total-tokens",
                                "128", "--max-batch-total-tokens", "256"], os.environ)  # fmt: skip
    app, async_engine = build(args)
    try:
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            async_engine.error = RuntimeError("the loop died")  # what its except clause sets
            answer = client.get("/health")
            assert answer.status_code == 503
            assert answer.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            generate = client.post("/generate", json={"inputs": "Hi", "parameters": {}})
            assert generate.status_code == 424
            assert generate.json()["error_type"] == "generation"
    finally:
        async_engine.shutdown()
