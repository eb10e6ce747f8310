"""The HTTP ingress: TGI and OpenAI routes in front of the TGIServer deployments.

Bodies are passed to the TGIServer as parsed JSON objects and validated by the engine, which
owns TGI's rules. Every failure becomes a TGI error through deployments/errors.py: raised
before a response starts, by the exception handlers below; inside a started stream, as a
`data:{"error":..,"error_type":..}` event. The one exception is an OpenAI request for a model
the app does not serve, answered in OpenAI's shape (`OpenAIError`).

Each request goes to one model, chosen as deployments/model_choice.py says: route prefix
`/models/{name}/...`, then the `x-model` header, then the OpenAI body's `model`, then the
first model. Other Ray apps can call the same models through this deployment's handle
(`call` / `stream`, with `model=`) or through a TGIServer's own handle.

Every inference request is observed (metrics, a span, a log line) by the middleware of
deployments/request_observer.py; GET /metrics is deployments/app_metrics.py's.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.app_metrics import AppMetrics
from deployments.app_stats import AppStats
from deployments.chat_page import ChatPage
from deployments.errors import (
    OpenAIError,
    TGIError,
    error_event,
    error_response,
    http_error_response,
    openai_error_response,
    serve_refusals_as_tgi_errors,
)
from deployments.ingress_metrics import IngressMetrics
from deployments.model_choice import MODEL_HEADER, choose_model, requested_model
from deployments.openapi_bodies import request_body, with_body_schemas
from deployments.request_body import parse_json_object
from deployments.request_guard import GuardPolicy, RequestGuard
from deployments.request_observer import (
    ObservabilityMiddleware,
    RequestObserver,
    install_observer,
    note_model,
)
from deployments.tgi_server import LauncherReply
from deployments.token_budget import TokenBudgets
from deployments.tracing import TRACE_HEADERS, Tracing, current_trace_headers
from engine.schemas import ChatRequest, CompatGenerateRequest, CompletionRequest, GenerateRequest
from serve_app.config import IngressOptions, TracingOptions

app = FastAPI(title="ray-tgi", openapi_url="/api-doc/openapi.json")  # TGI's path
app.openapi = with_body_schemas(app.openapi)  # the engine's body models, documented


async def _handle_error(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def _handle_openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
    return openai_error_response(exc)


# Starlette picks the handler by the exception's MRO; a replica's TGIError arrives as
# RayTaskError(TGIError), which both of the first two match. `Exception` catches the rest
# (Starlette answers those with this handler, then re-raises them to be logged).
for _exc_type in (TGIError, RayError, BackPressureError, Exception):
    app.add_exception_handler(_exc_type, _handle_error)
app.add_exception_handler(OpenAIError, _handle_openai_error)
app.add_exception_handler(StarletteHTTPException, lambda _r, e: http_error_response(e))
# Body size, API keys, per-key limits and the request timeout (deployments/request_guard.py).
app.add_middleware(RequestGuard)
# Metrics, a span and a log line per inference request (deployments/request_observer.py).
# Added last, so it is the outermost middleware and sees every answer, RequestGuard's 401,
# 413 and 429 included.
app.add_middleware(ObservabilityMiddleware)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_PASSED_ON_HEADERS = frozenset({"authorization", *TRACE_HEADERS})


# The helpers come before the class: `serve.ingress` pickles the app's routes when it
# decorates the class, by value, with the module globals defined at that moment.


def _route(method: str, path: str, body: type | None = None) -> Callable:
    """Register an endpoint at `path` and under every model's prefix, `/models/{model}`;
    `body` documents its JSON body (the engine validates it)."""
    prefixed = "/models/{model}" + path.rstrip("/")
    paths = [path, prefixed] + ([prefixed + "/"] if path == "/" else [])
    extra = request_body(body) if body is not None else None

    def register(endpoint: Callable) -> Callable:
        for route_path in paths:
            app.api_route(route_path, methods=[method], openapi_extra=extra)(endpoint)
        return endpoint

    return register


async def _json_object(request: Request) -> dict[str, Any]:
    return parse_json_object(await request.body())


async def _result(response: DeploymentResponse) -> Any:
    """Await a handle call; if this request is cancelled (its deadline passed), cancel the
    call too, so the engine stops generating for nobody."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


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
        async for text in stream:  # one or more whole events (TGIServer.stream_sse)
            yield text
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
    """Serve deployment class; bound with `{model name: TGIServer handle}` (first = default)
    and the ingress options (API keys, limits)."""

    @classmethod
    def get_deployment_options(cls, options: IngressOptions) -> dict[str, Any]:
        """Serve options for the ingress (pure: tests assert it without Ray)."""
        rollout = {
            key: value
            for key in ("graceful_shutdown_timeout_s", "max_surge_percent")
            if (value := getattr(options, key)) is not None
        }  # unset: Serve's defaults
        return {
            "name": "Ingress",
            "num_replicas": options.num_replicas,
            "max_ongoing_requests": options.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": options.num_cpus},
            **rollout,
        }

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        options: IngressOptions | None = None,
        tracing: TracingOptions | None = None,
        model_facts: dict[str, dict[str, str]] | None = None,
    ):
        """`options`: API keys and limits; `model_facts`: `{name: {"model_id": ..,
        "backend": ..}}`, for the spans."""
        if not models:
            raise ValueError("the ingress needs at least one model")
        options = options or IngressOptions()
        # Read by RequestGuard for every request; API keys are resolved here, at start.
        self.guard_policy = GuardPolicy.from_options(options)
        self._token_budgets = TokenBudgets() if options.check_prompt_tokens else None
        self._models = models
        self._names = list(models)
        self._created = int(time.time())
        self._chat_page = ChatPage()
        self._stats = AppStats(models)
        metrics = IngressMetrics()
        self._metrics = AppMetrics(models, metrics)
        self._tracing = Tracing(tracing, component="Ingress")
        install_observer(RequestObserver(metrics, self._tracing, model_facts or {}))

    def __del__(self) -> None:
        install_observer(None)
        tracing = getattr(self, "_tracing", None)
        if tracing is not None:
            tracing.shutdown()  # export the last spans

    # --- which model ------------------------------------------------------------------

    def _server_for(
        self, request: Request, body: dict[str, Any] | None = None, openai: bool = False
    ) -> DeploymentHandle:
        """The TGIServer for an HTTP request; an unknown model is a 404 in the route's
        protocol (OpenAI's shape on the OpenAI routes, TGI's elsewhere)."""
        body_model = body.get("model") if openai and body is not None else None
        name = requested_model(
            request.path_params.get("model"), request.headers.get(MODEL_HEADER), body_model
        )
        chosen = self._chosen(name, openai)
        note_model(request, chosen)
        return self._models[chosen]

    def _server_named(self, model: str | None, openai: bool = False) -> DeploymentHandle:
        return self._models[self._chosen(model, openai)]

    def _chosen(self, model: str | None, openai: bool) -> str:
        chosen = choose_model(self._names, model)
        if chosen is None:
            if openai:
                raise OpenAIError.model_not_found(str(model))
            served = ", ".join(self._names)
            raise TGIError(
                f"model {str(model)!r} is not served here (served: {served})", 404, "not_found"
            )
        return chosen

    # --- routes forwarded to a launcher, unchanged -----------------------------------

    @_route("POST", "/", CompatGenerateRequest)
    async def compat_generate(self, request: Request) -> Response:
        """TGI's compat route (the one `text_generation.Client` uses)."""
        return await self._forward("/", request)

    @_route("POST", "/generate", GenerateRequest)
    async def generate(self, request: Request) -> Response:
        return await self._forward("/generate", request)

    @_route("POST", "/generate_stream", GenerateRequest)
    async def generate_stream(self, request: Request) -> Response:
        return await self._forward("/generate_stream", request)

    @_route("POST", "/tokenize", GenerateRequest)
    async def tokenize(self, request: Request) -> Response:
        return await self._forward("/tokenize", request)

    @_route("POST", "/chat_tokenize", ChatRequest)
    async def chat_tokenize(self, request: Request) -> Response:
        return await self._forward("/chat_tokenize", request)

    @_route("POST", "/v1/chat/completions", ChatRequest)
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward("/v1/chat/completions", request)

    @_route("POST", "/v1/completions", CompletionRequest)
    async def completions(self, request: Request) -> Response:
        return await self._forward("/v1/completions", request)

    @_route("GET", "/info")
    async def info(self, request: Request) -> Response:
        with serve_refusals_as_tgi_errors():
            return _reply(await self._server_for(request).call.remote("GET", "/info"))

    @_route("GET", "/metrics")
    async def metrics(self, request: Request) -> Response:
        """The app's metrics: the ingress's own and every replica's engine metrics, with
        `model` and `replica` labels; one model's under its prefix or x-model header."""
        only = None
        if "model" in request.path_params or MODEL_HEADER in request.headers:
            name = requested_model(
                request.path_params.get("model"), request.headers.get(MODEL_HEADER)
            )
            only = self._chosen(name, openai=False)
        return Response(await self._metrics.render(only), media_type=CONTENT_TYPE_LATEST)

    async def _forward(self, path: str, request: Request) -> Response:
        body = await _json_object(request)
        server = self._server_for(request, body, openai=path.startswith("/v1/"))
        if self._token_budgets is not None:  # TGI's token limits, before dispatch
            await self._token_budgets.check(server, path, body)
        # The launcher checks the API key (--api-key), so the client's credentials go along,
        # and the trace context (this request's span; the caller's if tracing is off).
        headers = {k: v for k, v in request.headers.items() if k in _PASSED_ON_HEADERS}
        headers = current_trace_headers(headers)
        with serve_refusals_as_tgi_errors():
            if path == "/generate_stream" or (path in STREAMABLE and body.get("stream")):
                stream = server.options(stream=True).stream_sse.remote(path, body, headers)
                return await _sse_response(stream)
            return _reply(await _result(server.call.remote("POST", path, body, headers)))

    @_route("GET", "/health")
    async def health(self, request: Request) -> Response:
        """Every model's health, or the named one's (prefix or x-model header)."""
        named = "model" in request.path_params or MODEL_HEADER in request.headers
        servers = [self._server_for(request)] if named else self._models.values()
        with serve_refusals_as_tgi_errors():
            for server in servers:
                await server.health.remote()  # raises a 503 TGIError when unhealthy
        return Response(status_code=200)

    # --- the app's own routes ------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        """The served models, first (default) first."""
        data = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "ray-tgi"}
            for name in self._names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/stats")
    async def stats(self) -> JSONResponse:
        """Per model: model id, replicas by state, the engine's queued and running requests."""
        return JSONResponse(await self._stats.collect())

    @app.get("/", include_in_schema=False)
    async def chat_page(self) -> Response:
        """The chat page (TGI's own `POST /` is the compat generate route above)."""
        return self._chat_page.response()

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(self, name: str) -> Response:
        return self._chat_page.response(name)

    # --- calls from other Ray apps, through this deployment's handle ------------------

    async def call(
        self,
        method: str,
        path: str,
        request: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        model: str | None = None,
    ) -> LauncherReply:
        """TGIServer.call on the named model (None or "tgi": the first); for
        `serve.get_app_handle(app).call.remote("POST", "/generate", body, model=...)`."""
        return await self._server_named(model).call.remote(method, path, request, headers)

    async def stream(
        self,
        path: str,
        request: dict[str, Any],
        headers: dict[str, str] | None = None,
        model: str | None = None,
    ) -> AsyncIterator[dict[str, str] | str]:
        """TGIServer.stream on the named model: the launcher's x-* headers, then each SSE
        event; for `handle.options(stream=True).stream.remote(path, body, model=...)`."""
        stream = (
            self._server_named(model).options(stream=True).stream.remote(path, request, headers)
        )
        finished = False
        try:
            async for item in stream:
                yield item
            finished = True
        finally:
            if not finished:  # the caller stopped early: stop the generation too
                stream.cancel()
