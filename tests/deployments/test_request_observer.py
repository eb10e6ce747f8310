"""The ingress's request observer: metrics, spans and log lines of inference requests.

A small FastAPI app stands in for the ingress's routes (the real ingress runs in
tests/integration/test_observability.py): it names the model with `note_model`, forwards
the current trace context the way the ingress does, and answers as TGI does. The spans go
to an in-memory exporter.
"""

import asyncio
import json
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from deployments.errors import TGIError, error_response
from deployments.ingress_metrics import IngressMetrics
from deployments.request_observer import (
    NO_MODEL,
    ObservabilityMiddleware,
    RequestObserver,
    install_observer,
    note_model,
    observed_route,
)
from deployments.tracing import Tracing, current_trace_headers
from serve_app.config import TracingOptions

SECRET = "sk-observer-test-secret"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TOKENS = ["The", " capital", " is", " Paris"]


def _token_event(i: int, last: bool) -> str:
    event = {"index": i, "token": {"id": i, "text": TOKENS[i], "logprob": 0.0, "special": False},
             "generated_text": None, "details": None}  # fmt: skip
    if last:
        event["generated_text"] = "".join(TOKENS)
        event["details"] = {"finish_reason": "length", "generated_tokens": len(TOKENS),
                            "seed": None, "input_length": 6}  # fmt: skip
    return f"data:{json.dumps(event)}\n\n"


def _app(gate: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(TGIError, lambda _r, exc: error_response(exc))
    app.add_middleware(ObservabilityMiddleware)

    @app.post("/models/{model}/generate")
    @app.post("/generate")
    async def generate(request: Request):
        model = request.path_params.get("model", "smollm2")
        if model not in ("smollm2", "tiny"):
            raise TGIError(f"model {model!r} is not served here", 404, "not_found")
        note_model(request, model)
        body = await request.json()
        if body["inputs"] == "too long":
            raise TGIError("Input validation error: too long", 422, "validation")
        if body["inputs"] == "crash":
            raise RuntimeError("a bug")
        forwarded = current_trace_headers({"authorization": request.headers["authorization"]})
        headers = {"x-prompt-tokens": "6", "x-generated-tokens": "4"}
        return JSONResponse({"generated_text": "x", "forwarded": forwarded}, headers=headers)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        note_model(request, "smollm2")
        body = await request.json()

        async def events():
            for i in range(len(TOKENS)):
                if gate is not None and i == 1:
                    await gate.wait()
                if body["inputs"] == "fail" and i == 2:
                    yield 'data:{"error":"oom","error_type":"generation"}\n\n'
                    return
                yield _token_event(i, last=i == len(TOKENS) - 1)
                await asyncio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-prompt-tokens": "6"})  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return JSONResponse({})

    return app


@pytest.fixture
def observed():
    metrics = IngressMetrics(to_ray=False)
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingOptions(otlp_endpoint="http://127.0.0.1:1"), "Ingress", exporter)
    facts = {"smollm2": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "backend": "embedded"}}
    install_observer(RequestObserver(metrics, tracing, facts))
    try:
        yield metrics, tracing, exporter
    finally:
        install_observer(None)
        tracing.shutdown()


def _value(metrics: IngressMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(f"ray_tgi_ingress_{name}", labels)
    return 0.0 if value is None else value


async def _post(app: FastAPI, path: str, inputs: str, **headers) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
        return await client.post(path, json={"inputs": inputs}, headers=headers)


def _outcome_lines(caplog) -> list[dict]:
    fields = [getattr(r, "ray_serve_extra_fields", {}) for r in caplog.records]
    return [f for f in fields if f.get("event") == "request_outcome"]


def test_routes_observed_are_the_inference_posts():
    def scope(method: str, path: str, root: str = "") -> dict:
        return {"type": "http", "method": method, "path": path, "root_path": root}

    assert observed_route(scope("POST", "/generate")) == "/generate"
    assert observed_route(scope("POST", "/models/tiny/v1/chat/completions")) == (
        "/v1/chat/completions")  # fmt: skip
    assert observed_route(scope("POST", "/models/tiny")) == "/"  # TGI's compat route
    assert observed_route(scope("POST", "/models/tiny/")) == "/"
    assert observed_route(scope("POST", "/app/generate_stream", root="/app")) == "/generate_stream"
    assert observed_route(scope("GET", "/")) is None  # the chat page
    assert observed_route(scope("GET", "/metrics")) is None
    assert observed_route(scope("POST", "/shutdown")) is None


def test_a_generation_counts_tokens_and_latency_and_leaves_one_log_line(observed, caplog):
    metrics, tracing, exporter = observed
    caplog.set_level(logging.INFO, logger="ray.serve")
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
    answer = asyncio.run(_post(_app(), "/generate", "hi", authorization=f"Bearer {SECRET}",
                               traceparent=traceparent))  # fmt: skip
    assert answer.status_code == 200
    labels = {"model": "smollm2", "route": "/generate"}
    assert _value(metrics, "requests_total", **labels, status="200") == 1
    assert _value(metrics, "input_tokens_total", **labels) == 6
    assert _value(metrics, "output_tokens_total", **labels) == 4
    assert _value(metrics, "request_duration_seconds_count", **labels) == 1
    assert _value(metrics, "time_to_first_token_seconds_count", **labels) == 0  # not streamed
    assert _value(metrics, "requests_in_flight", **labels) == 0
    assert _value(metrics, "requests_queued", **labels) == 0

    tracing.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /generate" and span.kind == SpanKind.SERVER
    assert format_trace_id(span.context.trace_id) == TRACE_ID  # joined the caller's trace
    assert format_span_id(span.parent.span_id) == CALLER_SPAN_ID
    assert span.attributes["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert span.attributes["inference.backend"] == "embedded"
    assert span.attributes["gen_ai.request.model"] == "smollm2"
    assert span.attributes["gen_ai.usage.input_tokens"] == 6
    assert span.attributes["gen_ai.usage.output_tokens"] == 4
    assert span.attributes["http.response.status_code"] == 200
    # The route passed on this span's context (and the caller's credentials) to the next hop.
    forwarded = answer.json()["forwarded"]
    assert forwarded["traceparent"] == f"00-{TRACE_ID}-{format_span_id(span.context.span_id)}-01"
    assert forwarded["authorization"] == f"Bearer {SECRET}"

    (line,) = _outcome_lines(caplog)
    assert line == {"event": "request_outcome", "model": "smollm2", "path": "/generate",
                    "status": 200, "outcome": "ok", "streamed": False,
                    "duration_s": line["duration_s"], "ttft_s": None, "input_tokens": 6,
                    "output_tokens": 4, "finish_reason": None, "error_type": None,
                    "trace_id": TRACE_ID}  # fmt: skip
    assert line["duration_s"] > 0
    assert SECRET not in caplog.text and all(SECRET not in str(r.__dict__) for r in caplog.records)


def test_a_stream_times_its_tokens(observed, caplog):
    metrics, tracing, exporter = observed
    caplog.set_level(logging.INFO, logger="ray.serve")
    answer = asyncio.run(_post(_app(), "/generate_stream", "hi"))
    assert answer.text.count("data:") == len(TOKENS)
    labels = {"model": "smollm2", "route": "/generate_stream"}
    assert _value(metrics, "requests_total", **labels, status="200") == 1
    assert _value(metrics, "time_to_first_token_seconds_count", **labels) == 1
    assert _value(metrics, "inter_token_latency_seconds_count", **labels) == len(TOKENS) - 1
    # The gaps between tokens add up to at most the time from the first token to the end.
    gaps = _value(metrics, "inter_token_latency_seconds_sum", **labels)
    ttft = _value(metrics, "time_to_first_token_seconds_sum", **labels)
    total = _value(metrics, "request_duration_seconds_sum", **labels)
    assert 0.01 * (len(TOKENS) - 1) <= gaps and ttft + gaps <= total
    assert _value(metrics, "output_tokens_total", **labels) == len(TOKENS)
    assert _value(metrics, "input_tokens_total", **labels) == 6
    (line,) = _outcome_lines(caplog)
    assert line["streamed"] is True and line["finish_reason"] == "length"
    assert line["ttft_s"] == pytest.approx(ttft, abs=1e-6)
    tracing.force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert span.parent is None  # no caller context: a new trace


def test_errors_count_under_their_status(observed, caplog):
    metrics, tracing, exporter = observed
    caplog.set_level(logging.INFO, logger="ray.serve")
    app = _app()

    async def scenario():
        return [await _post(app, "/generate", "too long"),
                await _post(app, "/models/nope/generate", "hi"),
                await _post(app, "/generate", "crash"),
                await _post(app, "/generate_stream", "fail")]  # fmt: skip

    statuses = [answer.status_code for answer in asyncio.run(scenario())]
    assert statuses == [422, 404, 500, 200]  # the failed stream had started: its 200 was sent
    generate = {"model": "smollm2", "route": "/generate"}
    assert _value(metrics, "requests_total", **generate, status="422") == 1
    assert _value(metrics, "requests_total", **generate, status="500") == 1
    assert _value(metrics, "requests_total", model=NO_MODEL, route="/generate", status="404") == 1
    assert _value(metrics, "requests_total", model="smollm2", route="/generate_stream",
                  status="424") == 1  # fmt: skip
    assert _value(metrics, "output_tokens_total", model="smollm2", route="/generate_stream") == 2
    assert _value(metrics, "requests_in_flight", **generate) == 0
    lines = _outcome_lines(caplog)
    assert [(x["status"], x["outcome"], x["error_type"]) for x in lines] == [
        (422, "error", "validation"), (404, "error", "not_found"), (500, "error", None),
        (424, "error", "generation")]  # fmt: skip
    tracing.force_flush()
    spans = exporter.get_finished_spans()
    assert [s.attributes.get("error.type") for s in spans] == [
        "validation", "not_found", None, "generation"]  # fmt: skip
    assert spans[2].status.is_ok is False and spans[2].events[0].name == "exception"


def test_gauges_follow_a_stream_and_a_client_that_leaves(observed, caplog):
    """In flight and queued while it waits for its first token, in flight only after it,
    neither once the client has gone (499)."""
    metrics, _, _ = observed
    caplog.set_level(logging.INFO, logger="ray.serve")
    labels = {"model": "smollm2", "route": "/generate_stream"}
    seen: list[tuple[str, float, float]] = []

    async def scenario():
        gate = asyncio.Event()  # holds the stream after its first token
        app = _app(gate)
        left = asyncio.Event()
        body = json.dumps({"inputs": "hi"}).encode()
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if requests:
                return requests.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            in_flight = _value(metrics, "requests_in_flight", **labels)
            queued = _value(metrics, "requests_queued", **labels)
            seen.append((message["type"], in_flight, queued))
            if message["type"] == "http.response.body" and message.get("body"):
                left.set()  # the client leaves after the first token

        scope = {"type": "http", "method": "POST", "path": "/generate_stream", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "server": ("ingress", 80)}  # fmt: skip
        await app(scope, receive, send)

    asyncio.run(scenario())
    # send() runs after the observer saw the message: the first token already left the queue.
    assert seen[0] == ("http.response.start", 1, 1)
    assert seen[1] == ("http.response.body", 1, 0)
    assert _value(metrics, "requests_in_flight", **labels) == 0
    assert _value(metrics, "requests_queued", **labels) == 0
    assert _value(metrics, "requests_total", **labels, status="499") == 1
    (line,) = _outcome_lines(caplog)
    assert (line["status"], line["outcome"], line["output_tokens"]) == (499, "cancelled", 1)


def test_unobserved_routes_and_no_observer_pass_through(observed, caplog):
    metrics, tracing, exporter = observed
    caplog.set_level(logging.INFO, logger="ray.serve")

    async def get_metrics():
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            return await client.get("/metrics")

    assert asyncio.run(get_metrics()).status_code == 200
    install_observer(None)
    assert (
        asyncio.run(_post(_app(), "/generate", "hi", authorization="Bearer x")).status_code == 200
    )
    tracing.force_flush()
    assert exporter.get_finished_spans() == () and _outcome_lines(caplog) == []
    assert metrics.registry.get_sample_value(
        "ray_tgi_ingress_requests_total",
        {"model": "smollm2", "route": "/generate", "status": "200"},
    ) is None  # fmt: skip
