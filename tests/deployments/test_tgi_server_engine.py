"""TGIServer over the real embedded engine: launcher flags from the model config reach the
engine, and the client's credentials and bodies reach it unchanged (no Ray: the plain class)."""

import asyncio
import itertools
import json
import time

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


def test_stream_sse_gives_the_same_events_at_most_every_interval(default_model_dir):
    cfg = ModelConfig(
        name="smollm2",
        model_id=str(default_model_dir),
        launcher_args={
            "max_input_tokens": 64,
            "max_total_tokens": 128,
            "max_batch_total_tokens": 1024,
        },
        # One stream open: its messages 0.1 s apart at least.
        deployment={"stream_messages_per_s": 10},
    )
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 12}}

    async def scenario():
        server = TGIServer.__new__(TGIServer)
        await server.__init__(cfg)
        try:
            events = [e async for e in server.stream("/generate_stream", body)]
            items, arrived_at = [], []
            async for item in server.stream_sse("/generate_stream", body):
                items.append(item)
                arrived_at.append(time.monotonic())
        finally:
            server.__del__()
        return events, items, arrived_at

    events, items, arrived_at = asyncio.run(scenario())
    assert isinstance(items[0], dict)  # the launcher's x-* headers come first, alone
    assert len(events) == 1 + 12  # headers, 12 token events (the last with generated_text)
    assert "".join(items[1:]) == "".join(events[1:])  # greedy: the same events, in order
    assert 2 <= len(items[1:]) <= 12  # the first token at once, alone
    # Text follows text 0.1 s apart at least, except the last message (sent when the
    # stream ends). How many messages that makes depends on how fast this machine decodes.
    text_arrivals = arrived_at[1:-1]
    gaps = [b - a for a, b in itertools.pairwise(text_arrivals)]
    assert all(gap >= 0.1 - 0.005 for gap in gaps), gaps
