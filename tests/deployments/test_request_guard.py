"""The ingress's RequestGuard middleware on a small Starlette app, over httpx's ASGI
transport (no Ray): body size, keys, per-key limits released when requests end, and the
request timeout for plain and streaming responses; plus the strict JSON body parser."""

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from deployments.errors import TGIError
from deployments.request_body import parse_json_object
from deployments.request_guard import GuardPolicy, RequestGuard
from serve_app.config import IngressOptions

KEY = "k" * 20


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("s", "5")))
    return JSONResponse({"done": True})


async def stream(_: Request) -> StreamingResponse:
    async def events():
        for i in range(100):
            yield f"data:{i}\n\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(events(), media_type="text/event-stream")


def _client(**ingress) -> httpx.AsyncClient:
    policy = GuardPolicy.from_options(IngressOptions.model_validate(ingress), environ={})
    routes = [Route("/generate", echo, methods=["POST"]), Route("/slow", slow),
              Route("/generate_stream", stream, methods=["POST"]), Route("/health", echo),
              Route("/models/{name}/health", echo), Route("/", echo)]  # fmt: skip
    app = RequestGuard(Starlette(routes=routes), policy=lambda: policy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def _run(scenario):
    return asyncio.run(scenario())


def test_bodies_over_the_limit_are_413_whether_declared_or_chunked():
    async def scenario():
        async with _client(max_body_bytes=100) as client:
            assert (await client.post("/generate", content=b"x" * 100)).json() == {"size": 100}
            reply = await client.post("/generate", content=b"x" * 101)
            assert reply.status_code == 413
            assert reply.json()["error_type"] == "payload_too_large"

            async def chunks(n: int):
                for _ in range(n):
                    yield b"x" * 30

            assert (await client.post("/generate", content=chunks(3))).json() == {"size": 90}
            assert (await client.post("/generate", content=chunks(4))).status_code == 413

    _run(scenario)


def test_keys_open_paths_and_limits():
    auth = {"api_keys": [{"name": "a", "key": KEY, "max_concurrent_requests": 1}]}

    async def scenario():
        async with _client(auth=auth) as client:
            reply = await client.post("/generate", content=b"{}")
            assert reply.status_code == 401 and reply.json() == {
                "error": "Unauthorized", "error_type": "unauthorized"}  # fmt: skip
            assert reply.headers["www-authenticate"] == "Bearer"
            for path in ("/health", "/models/m/health", "/"):
                assert (await client.get(path)).status_code == 200, path
            assert (await client.post("/")).status_code == 401  # POST / is TGI's generate
            headers = {"Authorization": f"Bearer {KEY}"}
            running = asyncio.create_task(client.get("/slow?s=0.5", headers=headers))
            await asyncio.sleep(0.1)
            refused = await client.post("/generate", headers=headers)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error_type"] == "rate_limited"
            assert (await running).status_code == 200
            # The slot was released when the first request ended.
            assert (await client.post("/generate", headers=headers)).status_code == 200

    _run(scenario)


def test_the_timeout_is_a_504_before_the_response_and_an_error_event_in_a_stream():
    async def scenario():
        async with _client(request_timeout_s=0.3) as client:
            reply = await client.get("/slow?s=5")
            assert reply.status_code == 504
            assert reply.json() == {
                "error": "Request timed out after 0.3 s (ingress.request_timeout_s)",
                "error_type": "timeout"}  # fmt: skip
            assert (await client.get("/slow?s=0.05")).status_code == 200
            reply = await client.post("/generate_stream")
            events = [e for e in reply.text.split("\n\n") if e]
            assert reply.status_code == 200 and events[0] == "data:0" and 2 < len(events) < 100
            assert json.loads(events[-1][len("data:") :])["error_type"] == "timeout"

    _run(scenario)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b'{"a": NaN}', "NaN"), (b'{"a": 1e999}', "out of range"), (b'{"a": "\\udc00"}', "surrogate"),
     (b"\xff", "utf-8"), (b"[" * 50_000, "nested too deeply"), (b"[1]", "must be a JSON object"),
     (b'{"a": 1', "Expecting")],
)  # fmt: skip
def test_the_body_parser_is_as_strict_as_tgis(raw, reason):
    with pytest.raises(TGIError) as error:
        parse_json_object(raw)
    assert (error.value.status_code, error.value.error_type) == (422, "validation")
    assert reason in error.value.message


def test_the_body_parser_reads_valid_json():
    assert parse_json_object(b'{"a": "\\ud83d\\ude00", "b": [1.5]}') == {
        "a": "\U0001f600", "b": [1.5]}  # fmt: skip
