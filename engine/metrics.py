"""Prometheus metrics under TGI's names, types and buckets, plus time to first token.

Dashboards built for TGI query its exact names. TGI's exporter writes counters without the
`_total` suffix that prometheus-client appends, so `render` writes the text format itself
from prometheus-client's collected families.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.utils import floatToGoString

# TGI's buckets: durations grow geometrically from 0.15 ms; lengths in 100ths of the limit.
DURATION_BUCKETS = tuple(0.0001 * 1.5**i for i in range(1, 36))


def _length_buckets(limit: int) -> tuple[float, ...]:
    return tuple(limit / 100 * (i + 1) for i in range(100))


class EngineMetrics:
    """Every metric of one engine process, in its own registry."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int):
        r = self.registry = CollectorRegistry()

        def duration(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=DURATION_BUCKETS)

        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests served", registry=r)
        self.request_failure = Counter(
            "tgi_request_failure", "Requests failed, by error type", ["err"], registry=r
        )
        self.request_duration = duration("tgi_request_duration", "Request end to end, s")
        self.request_validation_duration = duration(
            "tgi_request_validation_duration", "Validation and tokenization, s"
        )
        self.request_queue_duration = duration(
            "tgi_request_queue_duration", "From admission to the request's first batch, s"
        )
        self.request_inference_duration = duration(
            "tgi_request_inference_duration", "From the first batch to the last token, s"
        )
        self.request_mean_time_per_token_duration = duration(
            "tgi_request_mean_time_per_token_duration", "Inference time / generated tokens, s"
        )
        self.request_time_to_first_token_duration = duration(
            "tgi_request_time_to_first_token_duration", "From arrival to the first token, s"
        )  # not in TGI
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", registry=r,
            buckets=_length_buckets(max_input_tokens),
        )  # fmt: skip
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", registry=r,
            buckets=_length_buckets(max_total_tokens),
        )  # fmt: skip
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "max_new_tokens asked", registry=r,
            buckets=_length_buckets(max_total_tokens),
        )  # fmt: skip
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting for a batch", registry=r)
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Requests in the running batch", registry=r
        )
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Tokens the running batch may grow to", registry=r
        )
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV cache capacity in tokens", registry=r
        )
        self.batch_max_total_tokens.set(max_batch_total_tokens)
        self.kv_blocks_free = Gauge(
            "ray_tgi_kv_blocks_free", "Paged KV cache blocks free (not in TGI)", registry=r
        )
        self.kv_blocks_total = Gauge(
            "ray_tgi_kv_blocks_total", "Paged KV cache blocks in all (not in TGI)", registry=r
        )
        self.batch_inference_count = Counter(
            "tgi_batch_inference_count", "Engine steps, by method", ["method"], registry=r
        )
        self.batch_inference_success = Counter(
            "tgi_batch_inference_success", "Engine steps that succeeded", ["method"], registry=r
        )
        self.batch_inference_duration = duration(
            "tgi_batch_inference_duration", "Engine step, s", ("method",)
        )

    def track_prefix_cache(self, read_stats) -> None:
        """Expose the prefix cache's lookups and hits, read from `read_stats()` (an
        EngineStats) at each scrape."""
        self.registry.register(_PrefixCacheCounters(read_stats))

    def render(self) -> bytes:
        """The Prometheus text format, counters named as TGI names them."""
        lines = []
        for family in self.registry.collect():
            name = family.name
            lines.append(f"# HELP {name} {family.documentation}")
            lines.append(f"# TYPE {name} {family.type}")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                sample_name = name if family.type == "counter" else sample.name
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
                labels = f"{{{labels}}}" if labels else ""
                lines.append(f"{sample_name}{labels} {floatToGoString(sample.value)}")
        return ("\n".join(lines) + "\n").encode()


class _PrefixCacheCounters:
    """Counters the block manager keeps itself, collected when Prometheus scrapes."""

    def __init__(self, read_stats):
        self._read_stats = read_stats

    def collect(self):
        stats = self._read_stats()
        yield CounterMetricFamily(
            "ray_tgi_prefix_cache_lookups", "Full prompt blocks looked up (not in TGI)",
            value=stats.num_prefix_lookups,
        )  # fmt: skip
        yield CounterMetricFamily(
            "ray_tgi_prefix_cache_hits", "Full prompt blocks found cached (not in TGI)",
            value=stats.num_prefix_hits,
        )  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def record_success(metrics: EngineMetrics, request, num_generated: int) -> None:
    """Observe a finished request (a service.ValidRequest, its timing complete)."""
    t = request.timing
    metrics.request_success.inc()
    metrics.request_duration.observe(t.end - t.arrived)
    metrics.request_queue_duration.observe(t.first_step - t.validated)
    metrics.request_inference_duration.observe(t.end - t.first_step)
    metrics.request_mean_time_per_token_duration.observe((t.end - t.first_step) / num_generated)
    metrics.request_time_to_first_token_duration.observe(t.first_token - t.arrived)
    metrics.request_input_length.observe(len(request.prompt_ids))
    metrics.request_generated_tokens.observe(num_generated)
    metrics.request_max_new_tokens.observe(request.params.max_new_tokens)
