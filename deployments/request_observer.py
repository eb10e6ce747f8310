"""One observation per inference request at the ingress: metrics, a span and a log line.

`ObservabilityMiddleware` wraps the ingress's FastAPI app (pure ASGI, so streams pass
through untouched). For each POST to an inference route it watches what passes: the
request's headers (a caller's W3C trace context), the answer's status and headers (TGI's
`x-prompt-tokens` / `x-generated-tokens`), and its body: a non-streamed JSON answer, or each
SSE event of a stream, timed as it leaves (time to first token, time between tokens). The
ingress says which model it chose with `note_model(request, name)`.

What a request's `status` is, in metrics and logs: the HTTP status sent, except that a
stream ending in an error event counts under that error's status (TGI's error types:
validation 422, overloaded 429, generation 424, ...) although its 200 was sent, and a
request whose client went away before the end counts as 499 (nginx's "client closed").

The log line goes to Serve's logger (`ray.serve`), whose replica log files carry Serve's
`request_id` (also returned to the client as `x-request-id`); with the app's
`logging_config: {encoding: JSON}` each line is a JSON object. It names no header, body or
prompt, so credentials never reach a log.
"""

import asyncio
import logging
import time
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, format_trace_id
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.generation_outcome import GenerationOutcome
from deployments.ingress_metrics import IngressMetrics
from deployments.tgi_server import FORWARDED_ROUTES
from deployments.tracing import (
    BACKEND,
    MODEL_ID,
    MODEL_NAME,
    Tracing,
    extract_context,
    record_outcome,
)

# The inference routes (TGI's and OpenAI's), without the `/models/{name}` prefix.
OBSERVED_ROUTES = FORWARDED_ROUTES["POST"]
NO_MODEL = "(none)"  # the model label of a request refused before a model was chosen
CLIENT_CLOSED = 499
# A non-streamed answer is read for its token counts up to this size; past it, the x-*
# headers alone count (an answer with every token's top alternatives can be large).
MAX_BODY_BYTES = 1 << 20
_SCOPE_KEY = "ray_tgi.observation"

log = logging.getLogger("ray.serve")  # Serve's logger: its handlers add the request id


class RequestObserver:
    """What the middleware records into: the ingress replica's metrics and tracer, and the
    facts its spans carry about each model (`{name: {"model_id": .., "backend": ..}}`)."""

    def __init__(
        self, metrics: IngressMetrics, tracing: Tracing, models: Mapping[str, Mapping[str, str]]
    ):
        self.metrics = metrics
        self.tracing = tracing
        self.models = models


_observer: RequestObserver | None = None


def install_observer(observer: RequestObserver | None) -> None:
    """Make the middleware record into `observer` (the ingress calls it when it starts:
    one ingress replica per process). None: requests pass unobserved."""
    global _observer
    _observer = observer


def note_model(request: Request, name: str) -> None:
    """The ingress chose `name` for this request."""
    observation = request.scope.get(_SCOPE_KEY)
    if observation is not None:
        observation.model_chosen(name)


def observed_route(scope: Scope) -> str | None:
    """The inference route a request is for (prefix and mount point stripped), or None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    if path.startswith("/models/"):
        _, slash, rest = path[len("/models/") :].partition("/")
        path = "/" + rest if slash else "/"
    return path if path in OBSERVED_ROUTES else None


class ObservabilityMiddleware:
    """ASGI middleware: observes the inference routes, passes everything else through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        observer = _observer
        route = observed_route(scope) if observer is not None else None
        if observer is None or route is None:
            await self.app(scope, receive, send)
            return
        await _Observation(observer, scope, route).run(self.app, receive, send)


class _Observation:
    """One request, from arrival to its last byte (or its client leaving)."""

    def __init__(self, observer: RequestObserver, scope: Scope, route: str):
        self.observer = observer
        self.scope = scope
        self.route = route
        self.started = time.perf_counter()
        self.model: str | None = None
        self.status: int | None = None  # the HTTP status sent, once the answer started
        self.finished = False  # the answer's last byte was sent
        self.streamed = False
        self.answered = False  # the first token (streams) or the answer (others) went out
        self.first_token_s: float | None = None
        self.last_token_at: float | None = None
        self.outcome = GenerationOutcome()
        self._pending = b""  # a stream's bytes after the last complete event
        self._body = bytearray()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.span = observer.tracing.tracer.start_span(
            f"{scope['method']} {route}", context=extract_context(headers), kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "http.route": route},
        )  # fmt: skip
        scope[_SCOPE_KEY] = self

    # --- what passes ------------------------------------------------------------------

    def model_chosen(self, name: str) -> None:
        self.model = name
        self._gauges(+1)
        facts = self.observer.models.get(name, {})
        if self.span.is_recording():
            self.span.set_attribute(MODEL_NAME, name)
            if "model_id" in facts:
                self.span.set_attribute(MODEL_ID, facts["model_id"])
            if "backend" in facts:
                self.span.set_attribute(BACKEND, facts["backend"])

    async def run(self, app: ASGIApp, receive: Receive, send: Send) -> None:
        async def observed_send(message: Message) -> None:
            self._sending(message)
            await send(message)

        # Current while the route runs, so the ingress passes it on (deployments/tracing.py).
        token = otel_context.attach(trace.set_span_in_context(self.span))
        error: BaseException | None = None
        try:
            await app(self.scope, receive, observed_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            self._end(error)

    def _sending(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in message.get("headers", [])
            }  # fmt: skip
            self.streamed = headers.get("content-type", "").startswith("text/event-stream")
            self.outcome.read_headers(headers)
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if self.streamed:
                self._read_events(chunk)
            elif len(self._body) + len(chunk) <= MAX_BODY_BYTES:
                self._body += chunk
            if not message.get("more_body", False):
                self.finished = True
                if not self.streamed:
                    self.outcome.read_body(bytes(self._body))
                    self._mark_answered()

    def _read_events(self, chunk: bytes) -> None:
        *events, self._pending = (self._pending + chunk).split(b"\n\n")
        for event in events:
            if self.outcome.read_event(event.decode("utf-8", errors="replace")):
                self._token_sent()

    def _token_sent(self) -> None:
        now = time.perf_counter()
        labels = self._labels()
        if self.last_token_at is None:
            self.first_token_s = now - self.started
            self.observer.metrics.time_to_first_token.observe(labels, self.first_token_s)
            self._mark_answered()
        else:
            self.observer.metrics.inter_token_latency.observe(labels, now - self.last_token_at)
        self.last_token_at = now

    def _mark_answered(self) -> None:
        if not self.answered:
            self.answered = True
            if self.model is not None:
                self.observer.metrics.queued.add(self._labels(), -1)

    # --- the end ----------------------------------------------------------------------

    def _labels(self) -> tuple[str, str]:
        return (self.model or NO_MODEL, self.route)

    def _gauges(self, delta: int) -> None:
        labels = self._labels()
        self.observer.metrics.in_flight.add(labels, delta)
        if not self.answered:
            self.observer.metrics.queued.add(labels, delta)

    def _final_status(self, error: BaseException | None) -> int:
        if isinstance(error, asyncio.CancelledError | ClientDisconnect):
            return CLIENT_CLOSED
        if error is not None or self.status is None:
            return 500  # Starlette answers an unhandled exception with a 500
        if not self.finished:
            return CLIENT_CLOSED  # the stream stopped because its client left
        if self.streamed and self.outcome.error_status is not None:
            return self.outcome.error_status
        return self.status

    def _end(self, error: BaseException | None) -> None:
        status = self._final_status(error)
        duration_s = time.perf_counter() - self.started
        m, labels = self.observer.metrics, self._labels()
        if self.model is not None:
            self._gauges(-1)
        m.requests.inc((*labels, str(status)))
        m.request_duration.observe(labels, duration_s)
        if self.outcome.input_tokens is not None:
            m.input_tokens.inc(labels, self.outcome.input_tokens)
        if self.outcome.output_tokens is not None:
            m.output_tokens.inc(labels, self.outcome.output_tokens)
        self._end_span(status, error)
        self._log(status, duration_s)

    def _end_span(self, status: int, error: BaseException | None) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            record_outcome(span, self.outcome)
            if status >= 500:
                span.set_status(trace.StatusCode.ERROR, f"HTTP {status}")
            if error is not None and status != CLIENT_CLOSED:
                span.record_exception(error)
        span.end()

    def _log(self, status: int, duration_s: float) -> None:
        outcome = "ok" if status < 400 else "cancelled" if status == CLIENT_CLOSED else "error"
        fields = {
            "event": "request_outcome",
            "model": self.model or NO_MODEL,
            "path": self.route,  # Serve's own `route` field is its route prefix
            "status": status,
            "outcome": outcome,
            "streamed": self.streamed,
            "duration_s": round(duration_s, 6),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 6),
            "input_tokens": self.outcome.input_tokens,
            "output_tokens": self.outcome.output_tokens,
            "finish_reason": ",".join(self.outcome.finish_reasons) or None,
            "error_type": self.outcome.error_type,
        }
        context = self.span.get_span_context()
        if context.is_valid:
            fields["trace_id"] = format_trace_id(context.trace_id)
        log.info(
            "%s %s %s %s", self.scope["method"], self.route, status, outcome,
            extra={"ray_serve_extra_fields": fields},
        )  # fmt: skip
