"""The ingress's own metrics, per model and route: prometheus-client for the app's /metrics,
mirrored to Ray's metrics through Serve's API (`ray.serve.metrics`), so the Ray dashboard
(and a Prometheus scraping Ray's nodes) shows them too.

Both sides use the same names: Ray prefixes custom metrics with `ray_`, so Serve's
`tgi_ingress_requests` is exported as `ray_tgi_ingress_requests_total`, the name the
prometheus-client counter `ray_tgi_ingress_requests` has here. Ray adds its own labels
(`application`, `deployment`, `replica`, ...); a Prometheus that scrapes both the app's
/metrics and Ray's nodes tells them apart by `job` (deploy/grafana's queries select one).

Labels: `model` (the app's model name; `(none)` when the request named a model the app
does not serve), `route` (TGI's route without the `/models/{name}` prefix), and `status`
on the request counter (see deployments/request_observer.py for what a status means).
"""

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from ray.serve import metrics as serve_metrics

# Seconds. TTFT: from the ingress receiving the request to the first token leaving it.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                       0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)  # fmt: skip
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)  # fmt: skip

PREFIX = "ray_tgi_ingress_"
_ROUTE = ("model", "route")


class _Mirrored:
    """One prometheus-client metric and, when `to_ray`, its `ray.serve.metrics` twin."""

    def __init__(self, prom, ray_metric, labels: tuple[str, ...]):
        self.prom = prom
        self.ray = ray_metric
        self.labels = labels
        # Per label values: the labelled child and Ray's tags, looked up once (the
        # inter-token histogram is observed for every streamed token).
        self._children: dict[tuple[str, ...], tuple[Any, dict[str, str]]] = {}

    def _child(self, values: tuple[str, ...]) -> tuple[Any, dict[str, str]]:
        child = self._children.get(values)
        if child is None:
            tags = dict(zip(self.labels, values, strict=True))
            child = self._children[values] = (self.prom.labels(*values), tags)
        return child


class _Counter(_Mirrored):
    def inc(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        prom, tags = self._child(values)
        prom.inc(amount)
        if self.ray is not None:
            self.ray.inc(amount, tags=tags)


class _Histogram(_Mirrored):
    def observe(self, values: tuple[str, ...], value: float) -> None:
        prom, tags = self._child(values)
        prom.observe(value)
        if self.ray is not None:
            self.ray.observe(value, tags=tags)


class _Gauge(_Mirrored):
    """Kept as counts here: Ray's gauges only take absolute values."""

    def __init__(self, prom, ray_metric, labels: tuple[str, ...]):
        super().__init__(prom, ray_metric, labels)
        self._counts: dict[tuple[str, ...], int] = defaultdict(int)

    def add(self, values: tuple[str, ...], delta: int) -> None:
        self._counts[values] += delta
        prom, tags = self._child(values)
        prom.set(self._counts[values])
        if self.ray is not None:
            self.ray.set(self._counts[values], tags=tags)


class IngressMetrics:
    """Every metric one ingress replica keeps, in its own registry."""

    def __init__(self, to_ray: bool = True):
        """`to_ray`: also record through `ray.serve.metrics` (inside a Serve replica)."""
        self.registry = CollectorRegistry()
        self._to_ray = to_ray
        self.requests = self._counter(
            "requests", "Requests answered, by HTTP status", ("model", "route", "status")
        )
        self.input_tokens = self._counter("input_tokens", "Prompt tokens of answered requests")
        self.output_tokens = self._counter("output_tokens", "Tokens generated for clients")
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds", "Streamed requests: arrival to first token",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds", "Streamed requests: time between two tokens",
            INTER_TOKEN_BUCKETS,
        )  # fmt: skip
        self.request_duration = self._histogram(
            "request_duration_seconds", "Arrival to the answer's last byte", DURATION_BUCKETS
        )
        self.in_flight = self._gauge("requests_in_flight", "Requests being answered")
        self.queued = self._gauge(
            "requests_queued", "Requests in flight with nothing answered yet: streams before "
            "their first token, other requests until their answer",
        )  # fmt: skip
        # Set while /metrics gathers the engines' metrics, for that scrape.
        self.engine_replicas = Gauge(
            "ray_tgi_engine_replicas_scraped", "Replicas whose engine metrics this scrape shows",
            ["model"], registry=self.registry,
        )  # fmt: skip
        self.engine_scrape_errors = Counter(
            "ray_tgi_engine_scrape_errors", "Replicas whose engine metrics could not be read",
            ["model"], registry=self.registry,
        )  # fmt: skip

    def _ray(self, kind: str, name: str, doc: str, labels: tuple[str, ...], **kwargs):
        if not self._to_ray:
            return None
        ray_name = (PREFIX + name).removeprefix("ray_")  # Ray adds the prefix back
        return getattr(serve_metrics, kind)(ray_name, description=doc, tag_keys=labels, **kwargs)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = _ROUTE) -> _Counter:
        prom = Counter(PREFIX + name, doc, labels, registry=self.registry)
        return _Counter(prom, self._ray("Counter", name, doc, labels), labels)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> _Histogram:
        prom = Histogram(PREFIX + name, doc, _ROUTE, registry=self.registry, buckets=buckets)
        ray_metric = self._ray("Histogram", name, doc, _ROUTE, boundaries=list(buckets))
        return _Histogram(prom, ray_metric, _ROUTE)

    def _gauge(self, name: str, doc: str) -> _Gauge:
        prom = Gauge(PREFIX + name, doc, _ROUTE, registry=self.registry)
        return _Gauge(prom, self._ray("Gauge", name, doc, _ROUTE), _ROUTE)
