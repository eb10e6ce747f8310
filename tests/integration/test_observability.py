"""Observability on a real cluster: the app's /metrics after known traffic, counted exactly;
/stats summed over two replicas; spans at a test-run OTLP/HTTP collector; one JSON log line
per request; Ray's metrics; the deploy/ queries against a real scrape; secrets in no log.

One local Ray cluster for the module, serving two models: `smollm2` with two replicas and
`smollm2-tiny` with one, both engines guarded by an API key, tracing on. The tests run in
file order; the secrets check comes last, after every request of the module.
"""

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from deploy_queries import all_queries, metric_names
from otlp_collector import OTLPCollector, otlp_collector
from ray import serve
from serve_cluster import REPO_ROOT, wait_until

from deployments.launcher import free_port
from deployments.request_observer import NO_MODEL
from serve_app.app import build_app

pytestmark = pytest.mark.slow

APP_NAME = "ray-tgi"
FIRST, TINY = "smollm2", "smollm2-tiny"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
API_KEY = f"sk-ray-tgi-test-{uuid.uuid4().hex}"
WRONG_KEY = f"sk-wrong-{uuid.uuid4().hex}"
HF_TOKEN = f"hf_test{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LAUNCHER_OTLP = "http://127.0.0.1:4317"
PROMPT = "Once upon a time"
# Greedy decoding goes on counting: no end-of-sequence token cuts a long generation short.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@dataclass
class App:
    url: str
    collector: OTLPCollector
    session_dir: Path
    ray_metrics_url: str
    request_ids: dict[str, int] = field(default_factory=dict)  # x-request-id -> status


def _app_args() -> dict[str, Any]:
    def model(name: str, num_replicas: int, max_input: int, max_total: int) -> dict[str, Any]:
        launcher_args = {"max_input_tokens": max_input, "max_total_tokens": max_total,
                         "max_batch_prefill_tokens": 1024, "max_batch_total_tokens": 4096,
                         "api_key": API_KEY}  # fmt: skip
        deployment = {"num_replicas": num_replicas, "startup_timeout_s": 240}
        return {"name": name, "model_id": MODEL_ID, "resources": {"num_cpus": 0.25},
                "deployment": deployment, "launcher_args": launcher_args}  # fmt: skip

    return {
        "models": [model(FIRST, 2, 512, 1024), model(TINY, 1, 64, 128)],
        "ingress": {"num_cpus": 0.1},
        "tracing": {
            "otlp_endpoint": "",
            "service_name": "ray-tgi-test",
            "launcher_otlp_endpoint": LAUNCHER_OTLP,
        },  # fmt: skip
    }


@pytest.fixture(scope="module")
def app(default_model_dir) -> Iterator[App]:
    # HF_TOKEN as operators should set it: in the environment Ray's processes inherit, not
    # in a runtime_env (Ray's runtime_env agent logs runtime_env env_vars verbatim).
    os.environ["HF_TOKEN"] = HF_TOKEN
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    metrics_port = free_port()
    try:
        with otlp_collector() as (collector_url, collector):
            context = ray.init(address="local", num_cpus=2, include_dashboard=False,
                               runtime_env={"env_vars": env},
                               _metrics_export_port=metrics_port)  # fmt: skip
            try:
                port = free_port()
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                args = _app_args()
                args["tracing"]["otlp_endpoint"] = collector_url
                serve.run(build_app(args), name=APP_NAME, route_prefix="/",
                          logging_config={"encoding": "JSON"})  # fmt: skip
                yield App(f"http://127.0.0.1:{port}", collector,
                          Path(context.address_info["session_dir"]),
                          f"http://127.0.0.1:{metrics_port}/metrics")  # fmt: skip
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        del os.environ["HF_TOKEN"]


# --- reading a scrape -------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _scrape(url: str, **headers: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics answer, by (name as written, labels)."""
    answer = httpx.get(f"{url}", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in answer.text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _sum(samples: dict, name: str, **labels: str) -> float:
    """Sum over the samples of `name` whose labels include `labels` (e.g. every replica)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _ingress(samples: dict, metric: str, model: str, route: str, **more: str) -> float:
    return _get(samples, f"ray_tgi_ingress_{metric}", model=model, route=route, **more)


# --- known traffic ----------------------------------------------------------------------------


@dataclass
class Traffic:
    before: dict
    after: dict
    generate_prompt_tokens: int = 0
    generate_tokens: int = 0
    stream_prompt_tokens: int = 0
    stream_tokens: list[int] = field(default_factory=list)
    stream_seconds: float = 0.0
    chat_usage: dict[str, int] = field(default_factory=dict)


def _remember(app: App, answer: httpx.Response) -> httpx.Response:
    app.request_ids[answer.headers["x-request-id"]] = answer.status_code
    return answer


def _stream(app: App, client: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list]:
    started = time.monotonic()
    with client.stream("POST", f"{app.url}{path}", json=body, headers=AUTH) as answer:
        assert answer.status_code == 200
        data = [line.removeprefix("data:").strip() for line in answer.iter_lines()]
        events = [json.loads(d) for d in data if d and d != "[DONE]" and not d.startswith(":")]
    _remember(app, answer)
    return answer, [time.monotonic() - started, *events]


@pytest.fixture(scope="module")
def traffic(app: App) -> Traffic:
    """Known requests, between two scrapes of the app's /metrics."""

    def three_engines_report() -> bool:
        return len({ls for (n, ls) in _scrape(f"{app.url}/metrics") if n == "tgi_queue_size"}) == 3

    wait_until(three_engines_report, 120, "the three replicas' engines are in the scrape")
    seen = Traffic(before=_scrape(f"{app.url}/metrics"), after={})
    with httpx.Client(timeout=120) as client:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
        for _ in range(3):
            answer = _remember(app, client.post(f"{app.url}/models/{FIRST}/generate", json=body,
                                                headers=AUTH))  # fmt: skip
            assert answer.status_code == 200, answer.text
            seen.generate_prompt_tokens += int(answer.headers["x-prompt-tokens"])
            seen.generate_tokens += int(answer.headers["x-generated-tokens"])
        stream_body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
        for _ in range(2):
            answer, (seconds, *events) = _stream(app, client, "/generate_stream", stream_body)
            seen.stream_prompt_tokens += int(answer.headers["x-prompt-tokens"])
            seen.stream_tokens.append(sum("token" in e for e in events))
            seen.stream_seconds += seconds
        chat = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        _, (_, *chunks) = _stream(app, client, "/v1/chat/completions", chat)
        seen.chat_usage = chunks[-1]["usage"]
        # TGI allows 4 stop sequences; the engine refuses the fifth (the ingress checks only
        # token counts), so the refusal shows in both the ingress's and the engine's metrics.
        five_stops = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "stop": list("abcde")}}
        refused = _remember(app, client.post(f"{app.url}/models/{TINY}/generate",
                                             json=five_stops, headers=AUTH))  # fmt: skip
        assert refused.status_code == 422
        unknown = _remember(app, client.post(f"{app.url}/models/nope/generate", json=body,
                                             headers=AUTH))  # fmt: skip
        assert unknown.status_code == 404
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        unauthorized = _remember(app, client.post(f"{app.url}/models/{FIRST}/generate",
                                                  json=body, headers=wrong))  # fmt: skip
        assert unauthorized.status_code == 401
    seen.after = _scrape(f"{app.url}/metrics")
    return seen


def _placements(model: str) -> list[dict[str, Any]]:
    """TGIServer.placement of every running replica of `model`."""
    handle = serve.get_deployment_handle(f"TGIServer:{model}", APP_NAME)
    return handle.broadcast("placement").results(timeout_s=30)


def _delta(traffic: Traffic, metric: str, model: str, route: str, **more: str) -> float:
    return _ingress(traffic.after, metric, model, route, **more) - _ingress(
        traffic.before, metric, model, route, **more
    )


# --- the tests --------------------------------------------------------------------------------


def test_metrics_count_known_traffic_exactly(traffic: Traffic):
    gen, stream = (FIRST, "/generate"), (FIRST, "/generate_stream")
    chat = (TINY, "/v1/chat/completions")
    assert _delta(traffic, "requests_total", *gen, status="200") == 3
    assert _delta(traffic, "requests_total", *gen, status="401") == 1
    assert _delta(traffic, "requests_total", *stream, status="200") == 2
    assert _delta(traffic, "requests_total", *chat, status="200") == 1
    assert _delta(traffic, "requests_total", TINY, "/generate", status="422") == 1
    assert _delta(traffic, "requests_total", NO_MODEL, "/generate", status="404") == 1
    # Tokens: what the engine's headers, events and usage told the client.
    assert _delta(traffic, "input_tokens_total", *gen) == traffic.generate_prompt_tokens
    assert _delta(traffic, "output_tokens_total", *gen) == traffic.generate_tokens == 15
    assert _delta(traffic, "input_tokens_total", *stream) == traffic.stream_prompt_tokens
    assert _delta(traffic, "output_tokens_total", *stream) == sum(traffic.stream_tokens) == 12
    assert _delta(traffic, "input_tokens_total", *chat) == traffic.chat_usage["prompt_tokens"]
    assert _delta(traffic, "output_tokens_total", *chat) == traffic.chat_usage["completion_tokens"]
    # Histograms: one end-to-end latency per request, TTFT per stream, a gap per later token.
    assert _delta(traffic, "request_duration_seconds_count", *gen) == 4
    assert _delta(traffic, "time_to_first_token_seconds_count", *gen) == 0
    assert _delta(traffic, "time_to_first_token_seconds_count", *stream) == 2
    assert _delta(traffic, "inter_token_latency_seconds_count", *stream) == sum(
        n - 1 for n in traffic.stream_tokens
    )
    assert _delta(traffic, "time_to_first_token_seconds_count", *chat) == 1
    ttft = _delta(traffic, "time_to_first_token_seconds_sum", *stream)
    assert 0 < ttft < traffic.stream_seconds  # measured inside the client's wait
    assert _delta(traffic, "time_to_first_token_seconds_bucket", *stream, le="+Inf") == 2
    # Nothing left in flight or queued at the ingress.
    for name in ("ray_tgi_ingress_requests_in_flight", "ray_tgi_ingress_requests_queued"):
        assert _sum(traffic.after, name) == 0


def test_every_replicas_engine_metrics_are_in_the_scrape(traffic: Traffic):
    after, before = traffic.after, traffic.before
    queues = [dict(labels) for (name, labels) in after if name == "tgi_queue_size"]
    replicas = {m: {q["replica"] for q in queues if q["model"] == m} for m in (FIRST, TINY)}
    assert len(replicas[FIRST]) == 2 and len(replicas[TINY]) == 1
    assert _get(after, "ray_tgi_engine_replicas_scraped", model=FIRST) == 2
    assert _get(after, "ray_tgi_engine_replicas_scraped", model=TINY) == 1

    def engine_delta(name: str, model: str, **labels: str) -> float:
        return _sum(after, name, model=model, **labels) - _sum(before, name, model=model, **labels)

    # TGI's names as TGI writes them (counters without `_total`), summed over the replicas:
    # 3 generations + 2 streams on smollm2 (the 401 never reached a handler), 1 chat on tiny.
    assert engine_delta("tgi_request_success", FIRST) == 5
    assert engine_delta("tgi_request_success", TINY) == 1
    assert engine_delta("tgi_request_failure", TINY, err="validation") == 1
    assert engine_delta("tgi_request_generated_tokens_sum", FIRST) == 15 + 12
    assert engine_delta("tgi_request_duration_count", FIRST) == 5


def test_a_models_metrics_route_shows_that_model_only(app: App, traffic: Traffic):
    for scrape in (_scrape(f"{app.url}/models/{TINY}/metrics"),
                   _scrape(f"{app.url}/metrics", **{"x-model": TINY})):  # fmt: skip
        models = {dict(labels).get("model") for (_, labels) in scrape}
        assert models == {TINY}
        assert _get(scrape, "ray_tgi_engine_replicas_scraped", model=TINY) == 1
        assert _sum(scrape, "tgi_request_success", model=TINY) >= 1
        assert _ingress(scrape, "requests_total", TINY, "/generate", status="422") >= 1
    assert httpx.get(f"{app.url}/models/nope/metrics").status_code == 404


def test_stats_sum_the_queues_of_every_replica(app: App):
    """Three long streams on the two replicas of smollm2: /stats counts all three, and each
    replica's share is what that replica's engine reports."""
    body = {"inputs": COUNTING, "parameters": {"max_new_tokens": 900}}
    url = f"{app.url}/models/{FIRST}/generate_stream"
    with contextlib.ExitStack() as open_streams:
        lines = []  # kept: dropping a line iterator closes its stream
        for _ in range(3):
            stream = httpx.stream("POST", url, json=body, headers=AUTH, timeout=120)
            lines.append(open_streams.enter_context(stream).iter_lines())
            assert next(lines[-1]).startswith('data:{"index"')
        stats = {m["name"]: m for m in httpx.get(f"{app.url}/stats", timeout=30).json()["models"]}
        first = stats[FIRST]
        assert first["running_replicas"] == 2 and len(first["replicas"]) == 2
        assert first["queued_requests"] + first["running_requests"] == 3
        assert first["running_requests"] == sum(r["running_requests"] for r in first["replicas"])
        assert first["queued_requests"] == sum(r["queued_requests"] for r in first["replicas"])
        assert stats[TINY]["running_requests"] == 0 and len(stats[TINY]["replicas"]) == 1
        # Each replica's numbers are its own engine's, read directly on its launcher.
        launchers = {p["replica_id"]: p["launcher_url"] for p in _placements(FIRST)}
        for replica in first["replicas"]:
            text = httpx.get(f"{launchers[replica['replica_id']]}/metrics").text
            running = re.search(r"^tgi_batch_current_size (\S+)$", text, re.M).group(1)
            queued = re.search(r"^tgi_queue_size (\S+)$", text, re.M).group(1)
            assert (replica["running_requests"], replica["queued_requests"]) == (
                int(float(running)), int(float(queued)))  # fmt: skip
    wait_until(lambda: _sum(_scrape(f"{app.url}/metrics"), "tgi_batch_current_size",
                            model=FIRST) == 0, 30, "the streams' requests ended")  # fmt: skip


def test_spans_of_the_ingress_and_the_replica_reach_the_collector(app: App):
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {**AUTH, "traceparent": f"00-{trace_id}-{caller_span}-01"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}
    answer = httpx.post(f"{app.url}/models/{FIRST}/generate", json=body, headers=headers,
                        timeout=60)  # fmt: skip
    assert answer.status_code == 200
    spans = app.collector.wait_for(lambda s: len([x for x in s if x.trace_id == trace_id]) >= 2,
                                   30, "the request's two spans")  # fmt: skip
    by_kind = {s.kind: s for s in spans if s.trace_id == trace_id}
    ingress, replica = by_kind["SERVER"], by_kind["CLIENT"]
    assert (ingress.kind, ingress.name, ingress.parent_span_id) == (
        "SERVER", "POST /generate", caller_span)  # fmt: skip
    assert (replica.kind, replica.name, replica.parent_span_id) == (
        "CLIENT", "POST /generate", ingress.span_id)  # fmt: skip
    assert ingress.resource["ray_tgi.component"] == "Ingress"
    assert replica.resource["ray_tgi.component"] == f"TGIServer:{FIRST}"
    for span in (ingress, replica):
        assert span.resource["service.name"] == "ray-tgi-test"
        assert span.attributes["inference.backend"] == "embedded"
        assert span.attributes["model_id"] == MODEL_ID
        assert span.attributes["gen_ai.request.model"] == FIRST
        assert span.attributes["gen_ai.usage.input_tokens"] == int(
            answer.headers["x-prompt-tokens"]
        )
        assert span.attributes["gen_ai.usage.output_tokens"] == 3
        assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert ingress.attributes["http.response.status_code"] == 200
    # The launcher was started with --otlp-endpoint (a real TGI exports its spans there).
    for placement in _placements(FIRST) + _placements(TINY):
        argv = Path(f"/proc/{placement['launcher_pid']}/cmdline").read_bytes().decode()
        argv = argv.split("\0")
        assert argv[argv.index("--otlp-endpoint") + 1] == LAUNCHER_OTLP


def test_one_json_log_line_per_request_with_its_request_id(app: App, traffic: Traffic):
    def outcome_lines() -> dict[str, list[dict]]:
        lines: dict[str, list[dict]] = {}
        for path in (app.session_dir / "logs" / "serve").glob(f"replica_{APP_NAME}_Ingress_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                record = json.loads(line)  # every line of the ingress's log is JSON
                if record.get("event") == "request_outcome":
                    lines.setdefault(record["request_id"], []).append(record)
        return lines

    wait_until(lambda: set(app.request_ids) <= set(outcome_lines()), 30, "every line written")
    lines = outcome_lines()
    for request_id, status in app.request_ids.items():
        (record,) = lines[request_id]  # exactly one per request
        assert record["status"] == status and record["levelname"] == "INFO"
        assert record["outcome"] == ("ok" if status < 400 else "error")
        assert record["deployment"] == f"{APP_NAME}_Ingress"
    statuses = sorted(
        (r["model"], r["path"], r["status"]) for rid in app.request_ids for r in lines[rid]
    )
    assert statuses.count((FIRST, "/generate_stream", 200)) == 2
    assert (NO_MODEL, "/generate", 404) in statuses and (TINY, "/generate", 422) in statuses
    stream_line = next(r for rid in app.request_ids for r in lines[rid]
                       if r["path"] == "/generate_stream")  # fmt: skip
    assert stream_line["streamed"] is True and stream_line["ttft_s"] > 0
    assert stream_line["output_tokens"] == 6 and len(stream_line["trace_id"]) == 32


def test_the_ingress_metrics_reach_rays_metrics(app: App, traffic: Traffic):
    """Through ray.serve.metrics: the same names, in Ray's own Prometheus export."""

    def ray_requests() -> float:
        text = httpx.get(app.ray_metrics_url, timeout=10).text
        wanted = ("ray_tgi_ingress_requests_total{", f'model="{FIRST}"', 'route="/generate"',
                  'status="200"')  # fmt: skip
        lines = [line for line in text.splitlines() if all(w in line for w in wanted)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    wait_until(lambda: ray_requests() >= 3, 60, "Ray exports the ingress's request counter")


def test_the_deploy_queries_name_metrics_the_app_exports(traffic: Traffic):
    exported = {name for (name, _) in traffic.after}
    for expr in all_queries():
        assert metric_names(expr) <= exported, (expr, metric_names(expr) - exported)


def test_no_secret_reaches_any_log(app: App, traffic: Traffic):
    """Last: after every request of the module (the right key, a wrong one, HF_TOKEN in the
    processes' environment), no log the cluster or an engine wrote holds any of them."""
    launcher_logs = {Path(p["launcher_log"]) for m in (FIRST, TINY) for p in _placements(m)}
    assert len(launcher_logs) == 3 and all(p.stat().st_size > 0 for p in launcher_logs)
    log_files = launcher_logs | {p for p in (app.session_dir / "logs").rglob("*") if p.is_file()}
    assert len(log_files) > 20  # the cluster's logs and the engines' are there
    assert any("replica_ray-tgi_Ingress" in str(p) for p in log_files)
    # The secrets were really there: the engines enforce the key and inherited HF_TOKEN.
    for placement in _placements(FIRST):
        environ = Path(f"/proc/{placement['launcher_pid']}/environ").read_bytes()
        assert f"HF_TOKEN={HF_TOKEN}".encode() in environ.split(b"\0")
    contents = {p: Path(p).read_bytes() for p in log_files}
    # The search reads what the requests left: every request id is in some log.
    assert all(any(rid.encode() in c for c in contents.values()) for rid in app.request_ids)
    secrets = [API_KEY.encode(), WRONG_KEY.encode(), HF_TOKEN.encode()]
    leaks = [(str(p), s.decode()) for p, c in contents.items() for s in secrets if s in c]
    assert leaks == []
