"""The engine's HTTP API: TGI's routes (this file) and OpenAI's (openai_routes.py)."""

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine import openai_routes
from engine.async_engine import EngineDeadError
from engine.disconnect import CancelOnDisconnect
from engine.errors import RequestError, ValidationError
from engine.http_guards import install_guards
from engine.schemas import CompatGenerateRequest, GenerateRequest
from engine.service import TextGenerationService
from engine.sse import sse_response
from engine.tgi_generate import generate_response, stream_events, validate_generate


def create_app(service: TextGenerationService, info: dict, args) -> FastAPI:
    app = FastAPI(
        title="ray-tgi embedded engine",
        version=info["version"],
        openapi_url="/api-doc/openapi.json",  # TGI's path; Swagger UI at /docs
    )
    app.state.service = service
    app.add_middleware(CancelOnDisconnect)  # inside the guards, which read no body
    install_guards(app, args.api_key, args.payload_limit, args.cors_allow_origin)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, error: RequestError) -> JSONResponse:
        if not getattr(error, "counted", False):
            service.metrics.request_failure.labels(err=error.error_type).inc()
        return error.to_response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        service.metrics.request_count.inc()  # never reached validation, which counts the rest
        service.metrics.request_failure.labels(err="validation").inc()
        return ValidationError(f"`{where}`: {first['msg']}").to_response()

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, m = service.engine.stats, service.metrics
        m.queue_size.set(stats.num_waiting)
        m.batch_current_size.set(stats.num_running)
        m.batch_current_max_tokens.set(stats.num_batch_max_tokens)
        m.kv_blocks_free.set(stats.num_free_blocks)
        m.kv_blocks_total.set(stats.num_total_blocks)
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.engine.is_alive:
            return JSONResponse(None, status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    @app.get("/scheduler")
    async def scheduler() -> JSONResponse:
        """ray-tgi's own route, not TGI's: the scheduler's state between two steps, which
        the request router forecasts from (engine/forecast.py)."""
        try:
            snapshot = await asyncio.wait_for(service.engine.snapshot(), timeout=10)
        except (EngineDeadError, TimeoutError) as e:
            body = {"error": f"no scheduler snapshot: {e!r}", "error_type": "unhealthy"}
            return JSONResponse(body, status_code=503)
        return JSONResponse(snapshot.to_dict())

    @app.get("/info")
    async def get_info() -> dict:
        return info

    @app.post("/tokenize")
    async def tokenize(body: GenerateRequest) -> list[dict]:
        """The tokens /generate would see for these inputs (before truncation)."""
        return service.simple_tokens(body.inputs, body.add_special_tokens)

    @app.post("/")
    async def compat_generate(body: CompatGenerateRequest) -> Response:
        """TGI's compat route: a one-element list, or the event stream when `stream` is set."""
        if body.stream:
            return start_stream(body)
        response, headers = await generate_response(service, body)
        return JSONResponse([response], headers=headers)

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> JSONResponse:
        response, headers = await generate_response(service, body)
        return JSONResponse(response, headers=headers)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest) -> StreamingResponse:
        return start_stream(body)

    def start_stream(body: GenerateRequest) -> StreamingResponse:
        request = validate_generate(service, body, stream=True)
        service.admit()
        events = stream_events(service, body, request)
        response = sse_response(events, on_close=service.release)
        response.headers["x-compute-type"] = service.compute_type
        # Not sent by TGI on streams; lets the ray-tgi ingress count a stream's prompt tokens.
        response.headers["x-prompt-tokens"] = str(len(request.prompt_ids))
        return response

    openai_routes.register(app, service, model_id=info["model_id"])
    return app
