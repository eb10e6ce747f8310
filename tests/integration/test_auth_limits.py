"""Auth and limits at the ingress, on a real cluster with the real engine and real HTTP:
API keys (one from an environment variable, one inline), per-key rate and concurrency
limits, body size, TGI's token limits before dispatch, Serve's max_queued_requests, and
the request timeout. Every refusal is in TGI's shape and the app keeps serving after it.
"""

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from playwright.sync_api import Browser, expect
from rel_cluster import (
    CHAT_PROMPT,
    QUESTION,
    app_at,
    engine_drained,
    engine_metrics,
    model_args,
    placements,
    sse_data,
    wait_until,
)
from serve_cluster import serve_cluster
from text_generation import Client

pytestmark = pytest.mark.slow

APP = "guarded"
KEY_ENV = "RAY_TGI_TEST_ALICE_KEY"
ALICE_KEY = "alice-0123456789abcdef"  # from the environment: rate limited
BOB_KEY = "bob-0123456789abcdef"  # inline in the config: at most 2 requests at once
CAROL_KEY = "carol-0123456789abcdef"  # unlimited
TIMEOUT_S = 6
MAX_BODY_BYTES = 20_000
RATE, BURST = 0.2, 3
LAUNCHER_ARGS = {"max_input_tokens": 64, "max_total_tokens": 1024,
                 "max_batch_prefill_tokens": 1024, "max_batch_total_tokens": 4096}  # fmt: skip
INGRESS = {
    "auth": {
        "api_keys": [
            {"name": "alice", "key_env": KEY_ENV, "requests_per_second": RATE, "burst": BURST},
            {"name": "bob", "key": BOB_KEY, "max_concurrent_requests": 2},
            {"name": "carol", "key": CAROL_KEY},
        ],
    },
    "max_body_bytes": MAX_BODY_BYTES,
    "request_timeout_s": TIMEOUT_S,
}
# Two requests at a time on the replica, one more waiting at the ingress's handle.
DEPLOYMENT = {"max_ongoing_requests": 2, "max_queued_requests": 1}
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 900}}
SHORT = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 8}}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(default_model_dir: Path) -> Iterator[tuple[str, str]]:
    """(app URL, engine URL)."""
    args = model_args(default_model_dir, LAUNCHER_ARGS, DEPLOYMENT, INGRESS)
    with serve_cluster(environ={KEY_ENV: ALICE_KEY}) as base, app_at(base, APP, args) as url:
        (placement,) = placements(APP)
        yield url, placement["launcher_url"]


def _assert_tgi_error(reply: httpx.Response, status: int, error_type: str) -> str:
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


def test_a_key_is_needed_except_on_open_paths(app):
    url, _ = app
    for headers in ({}, _auth("wrong-key-0123456789"), {"Authorization": CAROL_KEY},
                    {"Authorization": f"Basic {CAROL_KEY}"}):  # fmt: skip
        reply = httpx.post(f"{url}/generate", json=SHORT, headers=headers, timeout=60)
        assert _assert_tgi_error(reply, 401, "unauthorized") == "Unauthorized"
        assert reply.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/info", timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    # Open by default: health and metrics, also under a model's prefix; the chat page.
    for path in ("/health", "/metrics", "/models/smollm2/health", "/models/smollm2/metrics", "/"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path
    # Each key works, with any client that sends a Bearer token.
    for key in (BOB_KEY, CAROL_KEY):
        reply = httpx.post(f"{url}/generate", json=SHORT, headers=_auth(key), timeout=60)
        assert "Paris" in reply.json()["generated_text"]
    client = Client(url, headers=_auth(CAROL_KEY), timeout=60)
    assert "Paris" in client.generate(CHAT_PROMPT, max_new_tokens=8).generated_text
    assert "Paris" in "".join(
        r.token.text for r in client.generate_stream(CHAT_PROMPT, max_new_tokens=8)
    )
    assert httpx.get(f"{url}/info", headers=_auth(CAROL_KEY), timeout=30).status_code == 200


def test_the_key_from_the_environment_is_rate_limited_with_retry_after(app):
    url, _ = app
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    with httpx.Client(timeout=60, headers=_auth(ALICE_KEY)) as client:
        statuses = [client.post(f"{url}/generate", json=body).status_code for _ in range(BURST)]
        assert statuses == [200] * BURST  # the bucket's burst
        refused = client.post(f"{url}/generate", json=body)
        message = _assert_tgi_error(refused, 429, "rate_limited")
        assert "alice" in message and ALICE_KEY not in message
        # One token comes back every 1 / RATE = 5 s; the first of them sooner.
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 1 / RATE
        # Other keys are not affected.
        other = client.post(f"{url}/generate", json=body, headers=_auth(CAROL_KEY))
        assert other.status_code == 200
        time.sleep(retry_after)
        assert client.post(f"{url}/generate", json=body).status_code == 200


async def _open_stream(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    request = client.build_request("POST", f"{url}/generate_stream", json=LONG,
                                   headers=_auth(key))  # fmt: skip
    response = await client.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    return response


def test_a_keys_concurrent_requests_are_capped_and_released_when_streams_end(app):
    url, engine = app

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [await _open_stream(client, url, BOB_KEY) for _ in range(2)]
            try:
                refused = await client.post(f"{url}/generate", json=SHORT,
                                            headers=_auth(BOB_KEY))  # fmt: skip
                message = _assert_tgi_error(refused, 429, "rate_limited")
                assert "max_concurrent_requests" in message
                assert refused.headers["retry-after"] == "1"
            finally:
                for stream in streams:
                    await stream.aclose()  # the client leaves mid-stream
            # Leaving released both slots (and the engine's requests).
            await asyncio.sleep(0.5)
            reply = await client.post(f"{url}/generate", json=SHORT, headers=_auth(BOB_KEY))
            assert reply.status_code == 200, reply.text

    asyncio.run(scenario())
    wait_until(lambda: engine_drained(engine), 30, "the engine dropped the streams")


def test_servers_queue_bound_is_a_tgi_overloaded_429(app):
    """Serve's max_queued_requests: 2 running + 1 queued at the handle; the next is 429."""
    url, engine = app

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            running = [await _open_stream(client, url, CAROL_KEY) for _ in range(2)]
            queued = asyncio.create_task(client.post(f"{url}/generate", json=SHORT,
                                                     headers=_auth(CAROL_KEY)))  # fmt: skip
            try:
                await asyncio.sleep(1.0)  # the third request waits in the handle's queue
                refused = await client.post(f"{url}/generate", json=SHORT,
                                            headers=_auth(CAROL_KEY))  # fmt: skip
            finally:
                for stream in running:
                    await stream.aclose()
            return [refused, await queued]

    refused, queued = asyncio.run(scenario())
    assert _assert_tgi_error(refused, 429, "overloaded") == "Model is overloaded"
    assert refused.headers["retry-after"] == "1"
    assert queued.status_code == 200 and "Paris" in queued.json()["generated_text"]
    wait_until(lambda: engine_drained(engine), 30, "the engine dropped the streams")


def test_bodies_over_the_limit_are_413_declared_or_chunked(app):
    url, engine = app
    big = {"inputs": "x" * MAX_BODY_BYTES, "parameters": {"max_new_tokens": 1}}
    before = engine_metrics(engine)["tgi_request_count"]
    reply = httpx.post(f"{url}/generate", json=big, headers=_auth(CAROL_KEY), timeout=60)
    assert "20000 bytes" in _assert_tgi_error(reply, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"y" * 1000
        yield b'"}'

    json_headers = {**_auth(CAROL_KEY), "Content-Type": "application/json"}
    reply = httpx.post(f"{url}/generate", content=chunks(), headers=json_headers, timeout=60)
    _assert_tgi_error(reply, 413, "payload_too_large")
    pieces = iter([b'{"inputs": "Hi", ', b'"parameters": {"max_new_tokens": 2}}'])
    small = httpx.post(f"{url}/generate", content=pieces, headers=json_headers, timeout=60)
    assert small.status_code == 200, small.text  # a small chunked body is read and served
    assert engine_metrics(engine)["tgi_request_count"] == before + 1


def test_token_limits_are_checked_before_dispatch_with_tgis_messages(app):
    url, engine = app
    headers = _auth(CAROL_KEY)
    long_prompt = "one two three four five " * 20  # over max_input_tokens (64)
    chat = [{"role": "user", "content": long_prompt}]
    # The engine's own counts: the ingress must refuse with exactly these numbers.
    num_plain = len(httpx.post(f"{url}/tokenize", json={"inputs": long_prompt},
                               headers=headers).json())  # fmt: skip
    num_chat = len(httpx.post(f"{url}/chat_tokenize", json={"messages": chat},
                              headers=headers).json()["tokenize_response"])  # fmt: skip
    over_input = "Input validation error: `inputs` must have less than 64 tokens. Given: {}"
    over_total = ("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1024. "
                  "Given: 1 `inputs` tokens and {} `max_new_tokens`")  # fmt: skip
    cases = [
        ("/generate", {"inputs": long_prompt, "parameters": {"max_new_tokens": 4}},
         over_input.format(num_plain)),
        ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 2000}},
         over_total.format(2000)),
        ("/v1/chat/completions", {"messages": chat}, over_input.format(num_chat)),
        ("/v1/chat/completions", {"messages": chat, "stream": True, "max_tokens": 4},
         over_input.format(num_chat)),
        ("/v1/completions", {"prompt": ["Hi", long_prompt], "max_tokens": 4},
         over_input.format(num_plain)),
        ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 10**12}, "stream": True},
         over_total.format(10**12)),
    ]  # fmt: skip
    before = engine_metrics(engine)["tgi_request_count"]
    for path, body, message in cases:
        reply = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)
        assert _assert_tgi_error(reply, 422, "validation") == message, path
    # None of them reached the engine, which counts every request it validates.
    assert engine_metrics(engine)["tgi_request_count"] == before
    # At the limit: accepted (TGI refuses more than max_input_tokens, whatever it says).
    fits = {"inputs": " ".join(["one"] * 64), "parameters": {"max_new_tokens": 1}}
    assert len(httpx.post(f"{url}/tokenize", json=fits, headers=headers).json()) == 64
    assert httpx.post(f"{url}/generate", json=fits, headers=headers, timeout=60).is_success
    # `truncate` keeps the last tokens, as in TGI: then a long prompt fits.
    truncated = {"inputs": long_prompt, "parameters": {"max_new_tokens": 2, "truncate": 32}}
    assert httpx.post(f"{url}/generate", json=truncated, headers=headers, timeout=60).is_success
    assert engine_metrics(engine)["tgi_request_count"] == before + 2


def test_the_request_timeout_ends_requests_and_streams_in_tgis_shape(app):
    url, engine = app
    headers = _auth(CAROL_KEY)
    started = time.monotonic()
    reply = httpx.post(f"{url}/generate", json=LONG, headers=headers, timeout=60)
    took = time.monotonic() - started
    message = _assert_tgi_error(reply, 504, "timeout")
    assert message == f"Request timed out after {TIMEOUT_S} s (ingress.request_timeout_s)"
    assert TIMEOUT_S <= took < TIMEOUT_S + 5
    wait_until(lambda: engine_drained(engine), 15, "the timed-out request was cancelled")

    with httpx.stream("POST", f"{url}/generate_stream", json=LONG, headers=headers,
                      timeout=60) as stream:  # fmt: skip
        assert stream.status_code == 200
        events = sse_data(list(stream.iter_lines()))
    assert len(events) > 3 and '"token"' in events[0]
    assert events[-1] == ('{"error":"Request timed out after 6 s (ingress.request_timeout_s)",'
                          '"error_type":"timeout"}')  # fmt: skip
    wait_until(lambda: engine_drained(engine), 15, "the timed-out stream was cancelled")
    assert httpx.post(f"{url}/generate", json=SHORT, headers=headers, timeout=60).is_success


def test_no_key_is_in_any_log(app):
    """The keys (the environment's and the inline one) appear in no Ray or Serve log."""
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    leaks = []
    for path in session_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                leaks += [(str(path), k) for k in (ALICE_KEY, BOB_KEY, CAROL_KEY)
                          if k.encode() in data]  # fmt: skip
    assert leaks == []


def test_the_chat_page_asks_for_a_key_and_sends_it(app, browser: Browser):
    url, _ = app
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(f"{url}/")  # the page itself is open
        expect(page.locator("#key-error")).to_contain_text("needs an API key")
        expect(page.locator("#model option")).to_have_count(0)
        page.fill("#api-key", CAROL_KEY)
        page.click("#prompt")  # leaving the field commits the key, as a user would
        expect(page.locator("#model option")).to_have_count(1)
        expect(page.locator("#key-error")).to_be_empty()
        # The key's first /stats asks the engine too; sent at the same moment as the chat,
        # the two would meet this app's one-request handle queue and one would be a 429.
        expect(page.locator("#stats tbody tr")).to_have_count(1)
        page.fill("#max-tokens", "16")
        page.fill("#temperature", "0")
        page.fill("#prompt", QUESTION)
        page.click("#send")
        expect(page.locator("#status")).to_have_text("done", timeout=60_000)
        expect(page.locator(".message.assistant").last).to_contain_text("Paris")
        page.reload()  # the key is kept in the browser
        expect(page.locator("#model option")).to_have_count(1)
    finally:
        page.close()
