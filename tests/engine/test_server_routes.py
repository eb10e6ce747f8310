"""The engine's auxiliary routes and launcher guards: tokenize, metrics, docs, API key,
payload limit and CORS, over real HTTP against the real engine process."""

import time

import httpx
import pytest

from benchmarks.common import engine_process

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture(scope="module")
def engine_url(default_model_dir):
    flags = ["--model-id", str(default_model_dir), "--max-input-tokens", "64",
             "--max-total-tokens", "128", "--max-batch-total-tokens", "1024",
             "--api-key", "s3cret", "--payload-limit", "2000",
             "--cors-allow-origin", "http://example.com"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


@pytest.fixture
def client(engine_url):
    with httpx.Client(base_url=engine_url, timeout=60,
                      headers={"Authorization": "Bearer s3cret"}) as client:  # fmt: skip
        yield client


def test_tokenize_gives_ids_texts_and_offsets(client):
    tokens = client.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["text"] for t in tokens] == ["Hello", " world"]
    assert [(t["start"], t["stop"]) for t in tokens] == [(0, 5), (5, 11)]
    assert all(isinstance(t["id"], int) for t in tokens)


def test_chat_tokenize_applies_the_template(client):
    answer = client.post("/chat_tokenize", json=CHAT).json()
    text = answer["templated_text"]
    assert text.endswith("<|im_start|>assistant\n") and "What is the capital" in text
    assert "".join(t["text"] for t in answer["tokenize_response"]) == text


def test_metrics_count_requests_successes_and_failures(client):
    def counters() -> dict[str, float]:
        lines = client.get("/metrics").text.splitlines()
        return {n: float(v) for n, v in (line.rsplit(" ", 1) for line in lines
                                         if line.startswith("tgi_request_"))}  # fmt: skip

    before = counters()
    assert client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3}}).status_code == 200  # fmt: skip
    bad = client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
    assert bad.status_code == 422
    after = counters()
    assert after["tgi_request_count"] - before["tgi_request_count"] == 2
    assert after["tgi_request_success"] - before["tgi_request_success"] == 1
    assert after['tgi_request_failure{err="validation"}'] - before.get(
        'tgi_request_failure{err="validation"}', 0) == 1  # fmt: skip
    assert after["tgi_request_generated_tokens_count"] - before[
        "tgi_request_generated_tokens_count"] == 1  # fmt: skip
    text = client.get("/metrics").text
    for name in ("tgi_queue_size 0.0", "tgi_batch_current_size 0.0",
                 "tgi_batch_max_total_tokens 1024.0", "# TYPE tgi_request_count counter",
                 "tgi_request_time_to_first_token_duration_bucket"):  # fmt: skip
        assert name in text


def test_api_key_guards_generation_but_not_health_info_metrics(engine_url):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = httpx.post(f"{engine_url}/generate", json=body, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error_type"] == "unauthorized"
    for path in ("/health", "/info", "/metrics", "/v1/models", "/docs", "/api-doc/openapi.json"):
        assert httpx.get(f"{engine_url}{path}").status_code == 200, path


def test_payload_limit_answers_413(client):
    answer = client.post("/generate", json={"inputs": "x" * 3000})
    assert answer.status_code == 413
    assert "--payload-limit" in answer.json()["error"]


def test_openapi_document_lists_the_routes(client):
    paths = client.get("/api-doc/openapi.json").json()["paths"]
    for path in ("/", "/generate", "/generate_stream", "/tokenize", "/chat_tokenize",
                 "/v1/chat/completions", "/v1/completions", "/metrics"):  # fmt: skip
        assert path in paths


def test_cors_allows_the_configured_origin_only(client):
    def preflight(origin: str) -> httpx.Response:
        return client.options("/generate", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})  # fmt: skip

    assert preflight("http://example.com").headers["access-control-allow-origin"] == (
        "http://example.com"
    )
    assert "access-control-allow-origin" not in preflight("http://evil.example").headers


def test_a_client_gone_mid_stream_leaves_the_batch_and_frees_its_blocks(client):
    def gauges() -> dict[str, float]:
        lines = client.get("/metrics").text.splitlines()
        return {
            n: float(v)
            for n, v in (
                line.split(" ")
                for line in lines
                if line.startswith(("tgi_batch_current_size ", "ray_tgi_kv_blocks_"))  # fmt: skip
            )
        }

    idle = gauges()
    assert idle["tgi_batch_current_size"] == 0
    assert idle["ray_tgi_kv_blocks_free"] == idle["ray_tgi_kv_blocks_total"]
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 100}}
    with client.stream("POST", "/generate_stream", json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data:")
        busy = gauges()
        assert busy["tgi_batch_current_size"] == 1
        assert busy["ray_tgi_kv_blocks_free"] < busy["ray_tgi_kv_blocks_total"]
    # disconnected after one token: the engine drops the request at its next step
    deadline = time.monotonic() + 20
    while gauges() != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauges() == idle


def test_metrics_count_prefix_cache_lookups_and_hits(client):
    def counter(name: str) -> float:
        lines = client.get("/metrics").text.splitlines()
        return float(next(line.split(" ")[1] for line in lines if line.startswith(name + " ")))

    before = counter("ray_tgi_prefix_cache_hits")
    body = {"inputs": "The quick brown fox jumps over the lazy dog. " * 3,
            "parameters": {"max_new_tokens": 2}}  # fmt: skip
    for _ in range(2):  # the second run finds the first one's full blocks
        assert client.post("/generate", json=body).status_code == 200
    assert counter("ray_tgi_prefix_cache_hits") > before
    assert counter("ray_tgi_prefix_cache_lookups") >= counter("ray_tgi_prefix_cache_hits")


def test_scheduler_snapshot_shows_a_running_request_and_the_steps_times(engine_url):
    with httpx.Client(base_url=engine_url, timeout=60) as open_client:  # no key: open route
        idle = open_client.get("/scheduler").json()
        assert idle["running"] == idle["waiting"] == idle["prefilling"] == []
        assert idle["block_size"] == 16 and idle["num_free_blocks"] == 1024 // 16
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 50}}
        headers = {"Authorization": "Bearer s3cret"}
        with open_client.stream("POST", "/generate_stream", json=body, headers=headers) as s:
            lines = (line for line in s.iter_lines() if line)
            for _ in range(3):
                assert next(lines).startswith("data:")
            busy = open_client.get("/scheduler").json()
    [(num_prompt, num_tokens, max_new, num_read, num_blocks)] = busy["running"]
    assert max_new == 50 and num_tokens - num_prompt >= 3 and num_read >= num_prompt
    assert num_blocks == -(-(num_tokens - 1) // 16)  # the newest token's KV is not written yet
    assert busy["num_free_blocks"] == 1024 // 16 - num_blocks
    assert busy["decode_s"] > 0 and busy["prefill_base_s"] + busy["prefill_s_per_token"] > 0
    assert busy["taken_at"] > idle["taken_at"]
