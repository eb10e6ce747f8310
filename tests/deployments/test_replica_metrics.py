"""Engine metrics of several replicas re-exposed as one Prometheus text, with `model` and
`replica` labels and TGI's exact names (the text comes from the engine's own registry)."""

from prometheus_client.parser import text_string_to_metric_families

from deployments.replica_metrics import ReplicaScrape, relabeled_text
from engine.metrics import EngineMetrics


def _engine_text(num_requests: int, queued: int) -> str:
    metrics = EngineMetrics(max_input_tokens=64, max_total_tokens=128, max_batch_total_tokens=1024)
    for _ in range(num_requests):
        metrics.request_count.inc()
        metrics.request_duration.observe(0.2)
    metrics.request_failure.labels(err="validation").inc()
    metrics.queue_size.set(queued)
    return metrics.render().decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Sample lines as written (the parser would rename TGI's counters)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_every_sample_gets_model_and_replica_and_families_merge():
    text = relabeled_text([
        ReplicaScrape("smollm2", "r1", _engine_text(num_requests=3, queued=1)),
        ReplicaScrape("smollm2", "r2", _engine_text(num_requests=2, queued=0)),
        ReplicaScrape("tiny", "r3", _engine_text(num_requests=5, queued=4)),
    ])  # fmt: skip
    lines = text.splitlines()
    # One header per family, however many replicas: the text format's rule.
    assert lines.count("# TYPE tgi_request_count counter") == 1
    assert lines.count("# TYPE tgi_queue_size gauge") == 1
    # TGI's counter names stay as TGI writes them (no `_total`).
    assert 'tgi_request_count{model="smollm2",replica="r1"} 3.0' in lines
    assert 'tgi_request_count{model="tiny",replica="r3"} 5.0' in lines
    assert 'tgi_request_failure{model="smollm2",replica="r2",err="validation"} 1.0' in lines
    # A family's samples stay together: all of tgi_queue_size between its header and the next.
    start = lines.index("# TYPE tgi_queue_size gauge")
    queue_lines = [line for line in lines[start + 1 :] if not line.startswith("#")][:3]
    assert all(line.startswith("tgi_queue_size{") for line in queue_lines)
    samples = _samples(text)  # and the whole text parses
    assert samples[("tgi_queue_size", (("model", "tiny"), ("replica", "r3")))] == 4
    buckets = ("tgi_request_duration_count", (("model", "smollm2"), ("replica", "r1")))
    assert samples[buckets] == 3
    replicas = {dict(labels)["replica"] for (name, labels) in samples if name == "tgi_queue_size"}
    assert replicas == {"r1", "r2", "r3"}


def test_samples_without_labels_or_headers_and_odd_values():
    text = relabeled_text([ReplicaScrape('m"x', "r\\1", 'up 1\nfoo{} 2\nbar{a="b"} 3 1700\n')])
    assert text.splitlines() == [
        'up{model="m\\"x",replica="r\\\\1"} 1',
        'foo{model="m\\"x",replica="r\\\\1"} 2',
        'bar{model="m\\"x",replica="r\\\\1",a="b"} 3 1700',
    ]
    assert relabeled_text([]) == ""
