"""The HTTP ingress: TGI and OpenAI routes in front of the TGIServer deployments.

Bodies are passed to the TGIServer as parsed JSON objects and validated by the engine, which
owns TGI's rules. Every failure becomes a TGI error through deployments/errors.py: raised
before a response starts, by the exception handlers below; inside a started stream, as a
`data:{"error":..,"error_type":..}` event.
"""

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.errors import TGIError, error_event, error_response
from deployments.tgi_server import LauncherReply
from serve_app.config import IngressOptions

app = FastAPI(title="ray-tgi", openapi_url="/api-doc/openapi.json")  # TGI's path


async def _handle_error(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


# Starlette picks the handler by the exception's MRO; a replica's TGIError arrives as
# RayTaskError(TGIError), which both of the first two match. `Exception` catches the rest
# (Starlette answers those with this handler, then re-raises them to be logged).
for _exc_type in (TGIError, RayError, BackPressureError, Exception):
    app.add_exception_handler(_exc_type, _handle_error)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# The helpers come before the class: `serve.ingress` pickles the app's routes when it
# decorates the class, by value, with the module globals defined at that moment.


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise TGIError(f"request body is not valid JSON: {exc}", 422, "validation") from None
    if not isinstance(body, dict):
        raise TGIError("request body must be a JSON object", 422, "validation")
    return body


def _reply(reply: LauncherReply) -> Response:
    return Response(reply.body, media_type=reply.content_type, headers=reply.headers)


# Routes that stream when the body says `"stream": true`.
STREAMABLE = frozenset({"/", "/v1/chat/completions", "/v1/completions"})


async def _sse_response(stream: DeploymentResponseGenerator) -> Response:
    """Wait for the launcher's answer (its x-* headers come first), so that an error before
    the stream starts is an HTTP error status; then stream the events as they arrive."""
    try:
        launcher_headers = await stream.__anext__()
    except BaseException:
        stream.cancel()  # the client went away, or the call failed: stop the generation
        raise
    headers = {**_SSE_HEADERS, **launcher_headers}
    return StreamingResponse(_sse_events(stream), media_type="text/event-stream", headers=headers)


async def _sse_events(stream: DeploymentResponseGenerator) -> AsyncIterator[str]:
    finished = False
    try:
        async for event in stream:
            yield event
        finished = True
    except Exception as exc:
        finished = True
        yield error_event(exc)
    finally:
        if not finished:
            # The client disconnected (this generator was cancelled or closed): cancel the
            # TGIServer call, whose cleanup closes its HTTP stream to the engine.
            stream.cancel()


@serve.ingress(app)
class Ingress:
    """Serve deployment class; bound with `{model name: TGIServer handle}`."""

    @classmethod
    def get_deployment_options(cls, options: IngressOptions) -> dict[str, Any]:
        """Serve options for the ingress (pure: tests assert it without Ray)."""
        return {
            "name": "Ingress",
            "num_replicas": options.num_replicas,
            "max_ongoing_requests": options.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": options.num_cpus},
        }

    def __init__(self, models: dict[str, DeploymentHandle]):
        if not models:
            raise ValueError("the ingress needs at least one model")
        self._models = models
        self._created = int(time.time())

    def _server(self, model: object = None) -> DeploymentHandle:
        # TGI routes name no model, and TGI itself ignores the OpenAI `model` field: an
        # unknown or missing name goes to the first model.
        if isinstance(model, str) and model in self._models:
            return self._models[model]
        return next(iter(self._models.values()))

    # --- routes forwarded to a launcher, unchanged -----------------------------------

    @app.post("/")
    async def compat_generate(self, request: Request) -> Response:
        """TGI's compat route (the one `text_generation.Client` uses)."""
        return await self._forward("/", request)

    @app.post("/generate")
    async def generate(self, request: Request) -> Response:
        return await self._forward("/generate", request)

    @app.post("/generate_stream")
    async def generate_stream(self, request: Request) -> Response:
        return await self._forward("/generate_stream", request)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._forward("/tokenize", request)

    @app.post("/chat_tokenize")
    async def chat_tokenize(self, request: Request) -> Response:
        return await self._forward("/chat_tokenize", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward("/v1/completions", request)

    @app.get("/info")
    async def info(self) -> Response:
        return _reply(await self._server().call.remote("GET", "/info"))

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """The first model's engine metrics (scrape each engine for all of them)."""
        return _reply(await self._server().call.remote("GET", "/metrics"))

    async def _forward(self, path: str, request: Request) -> Response:
        body = await _json_object(request)
        server = self._server(body.get("model"))
        # The launcher checks the API key (--api-key), so the client's credentials go along.
        headers = {k: v for k, v in request.headers.items() if k == "authorization"}
        if path == "/generate_stream" or (path in STREAMABLE and body.get("stream")):
            stream = server.options(stream=True).stream.remote(path, body, headers)
            return await _sse_response(stream)
        return _reply(await server.call.remote("POST", path, body, headers))

    @app.get("/health")
    async def health(self) -> Response:
        for server in self._models.values():
            await server.health.remote()  # raises a 503 TGIError when unhealthy
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        data = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "ray-tgi"}
            for name in self._models
        ]
        return JSONResponse({"object": "list", "data": data})
