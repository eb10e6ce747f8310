"""OpenTelemetry spans of the ingress and the TGIServer, and W3C trace context between hops.

Each process (an ingress replica, a TGIServer replica) owns a TracerProvider that exports to
the app's OTLP/HTTP collector (`tracing.otlp_endpoint` in the app config). It is not
installed as OTel's global provider: Ray Serve's own tracing (`serve.start(tracing_config=)`)
may own that one in the same process. Trace context travels as W3C `traceparent` /
`tracestate` headers: client -> ingress (the HTTP request), ingress -> TGIServer (the
`headers` argument of `call` / `stream`), TGIServer -> launcher (the localhost HTTP
request), so a real TGI started with `--otlp-endpoint` puts its spans in the same trace.
"""

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deployments.generation_outcome import GenerationOutcome
from serve_app.config import TracingOptions

# Span attributes: the first two as the issue names them, the rest OTel's GenAI conventions.
BACKEND = "inference.backend"  # "embedded" | "tgi"
MODEL_ID = "model_id"
MODEL_NAME = "gen_ai.request.model"  # the app's name for the model
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
ERROR_TYPE = "error.type"
CANCELLED = "ray_tgi.cancelled"  # the client went away before the answer ended

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# Spans leave in batches this often: short, so a trace shows up while its requests are news.
EXPORT_DELAY_MS = 1000
_W3C = TraceContextTextMapPropagator()


class Tracing:
    """One process's tracer; a no-op one when tracing is off (`options` None)."""

    def __init__(
        self, options: TracingOptions | None, component: str, exporter: SpanExporter | None = None
    ):
        """`exporter` replaces the OTLP/HTTP one (tests pass an in-memory exporter)."""
        self._provider: TracerProvider | None = None
        if options is None:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=options.otlp_endpoint.rstrip("/") + "/v1/traces")
        resource = Resource.create(
            {"service.name": options.service_name, "ray_tgi.component": component}
        )
        sampler = ParentBased(TraceIdRatioBased(options.sampling_ratio))
        self._provider = TracerProvider(resource=resource, sampler=sampler)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
        )
        self.tracer = self._provider.get_tracer("ray_tgi")

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def force_flush(self) -> None:
        if self._provider is not None:
            self._provider.force_flush()

    def shutdown(self) -> None:
        """Export what is left; the replica is going away."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context a caller sent in W3C headers (lower-case keys); empty if none."""
    return _W3C.extract(carrier=dict(headers or {}))


def with_trace_context(headers: Mapping[str, str] | None, span: Span) -> dict[str, str]:
    """`headers` for the next hop, their trace headers replaced by `span`'s context; with no
    span of ours (tracing off), the caller's trace headers go on unchanged, so a traced
    launcher still joins the caller's trace."""
    if not span.get_span_context().is_valid:
        return dict(headers or {})
    outgoing = {k: v for k, v in (headers or {}).items() if k.lower() not in TRACE_HEADERS}
    _W3C.inject(outgoing, context=trace.set_span_in_context(span))
    return outgoing


def record_outcome(span: Span, outcome: GenerationOutcome) -> None:
    """Tokens, finish reasons and error of a finished request, as span attributes."""
    if not span.is_recording():
        return
    if outcome.input_tokens is not None:
        span.set_attribute(INPUT_TOKENS, outcome.input_tokens)
    if outcome.output_tokens is not None:
        span.set_attribute(OUTPUT_TOKENS, outcome.output_tokens)
    if outcome.finish_reasons:
        span.set_attribute(FINISH_REASONS, outcome.finish_reasons)
    if outcome.error_type is not None:
        span.set_attribute(ERROR_TYPE, outcome.error_type)
        span.set_status(trace.StatusCode.ERROR, outcome.error_message or outcome.error_type)


@contextmanager
def hop_span(
    tracer: trace.Tracer,
    name: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, str],
) -> Iterator[tuple[Span, dict[str, str], GenerationOutcome]]:
    """A client span for one call to the next hop, child of the context in `headers`.

    Yields the span, the headers to send on (carrying the span's context) and an outcome
    for the caller to fill as the answer passes; at exit the outcome becomes attributes,
    and an exception marks the span failed (a cancelled call is marked cancelled instead).
    The span is never made current: an async generator may be closed from another task,
    where a context token attached here could not be detached.
    """
    span = tracer.start_span(
        name, context=extract_context(headers), kind=SpanKind.CLIENT, attributes=attributes
    )
    outcome = GenerationOutcome()
    try:
        yield span, with_trace_context(headers, span), outcome
    except (GeneratorExit, asyncio.CancelledError):
        span.set_attribute(CANCELLED, True)
        raise
    except BaseException as exc:
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc).splitlines()[0] if str(exc) else "")
        raise
    finally:
        record_outcome(span, outcome)
        span.end()


def current_trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` carrying the current span's context (the request's, in the ingress)."""
    return with_trace_context(headers, trace.get_current_span())
