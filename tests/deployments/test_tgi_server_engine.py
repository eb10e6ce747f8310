"""TGIServer over the real embedded engine: launcher flags from the model config reach the
engine, and the client's credentials and bodies reach it unchanged (no Ray: the plain class)."""

import asyncio
import json

import pytest

from deployments.errors import TGIError
from deployments.tgi_server import TGIServer
from serve_app.config import ModelConfig

pytestmark = pytest.mark.slow


def test_api_key_and_payload_limit_are_enforced_by_the_engine(default_model_dir):
    cfg = ModelConfig(
        name="smollm2",
        model_id=str(default_model_dir),
        launcher_args={
            "api_key": "s3cret",
            "payload_limit": 400,
            "max_input_tokens": 64,
            "max_total_tokens": 128,
            "max_batch_total_tokens": 1024,
        },  # fmt: skip
    )
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    key = {"authorization": "Bearer s3cret"}

    async def scenario():
        server = TGIServer.__new__(TGIServer)
        await server.__init__(cfg)
        try:
            await server.check_health()  # /health needs no key
            reply = await server.call("POST", "/generate", body, key)
            assert json.loads(reply.body)["generated_text"]
            with pytest.raises(TGIError) as error:
                await server.call("POST", "/generate", body)
            assert (error.value.status_code, error.value.error_type) == (401, "unauthorized")
            with pytest.raises(TGIError) as error:
                await server.call("POST", "/generate", {"inputs": "x" * 500}, key)
            assert error.value.status_code == 413
            events = [e async for e in server.stream("/generate_stream", body, key)]
            assert events[-1].startswith("data:") and '"generated_text"' in events[-1]
        finally:
            server.__del__()

    asyncio.run(scenario())
