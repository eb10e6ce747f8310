"""The engine process (`python -m engine`) over real HTTP, with TGI's and OpenAI's clients."""

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import text_generation

from deployments.launcher import Launcher, embedded_env, launcher_command

pytestmark = pytest.mark.slow

CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PARIS = "The capital of France is Paris."
MAX_CONCURRENT = 2


@pytest.fixture(scope="module")
def engine_url(default_model_dir):
    flags = [
        "--model-id", str(default_model_dir),
        "--max-input-tokens", "64",
        "--max-total-tokens", "128",
        "--max-batch-total-tokens", "2048",
        "--max-concurrent-requests", str(MAX_CONCURRENT),
    ]  # fmt: skip
    launcher = Launcher(launcher_command("embedded", flags), env=embedded_env())
    launcher.start()
    try:
        launcher.wait_until_healthy(timeout_s=120)
        yield launcher.url
    finally:
        launcher.stop()
    assert launcher.returncode is not None


def test_generate_greedy_with_details(engine_url):
    response = text_generation.Client(engine_url).generate(CHAT_PROMPT, max_new_tokens=20)
    assert response.generated_text == PARIS
    details = response.details
    assert details.finish_reason == "eos_token"
    assert details.generated_tokens == len(details.tokens) == 8
    assert details.tokens[-1].special and details.tokens[-1].text == "<|im_end|>"
    assert all(t.logprob <= 0 for t in details.tokens)


def test_generate_stream_tokens_add_up_to_generated_text(engine_url):
    client = text_generation.Client(engine_url)
    responses = list(client.generate_stream(CHAT_PROMPT, max_new_tokens=20))
    assert [r.token.id for r in responses][:2] == [504, 3575]  # "The", " capital"
    assert all(r.generated_text is None for r in responses[:-1])
    last = responses[-1]
    assert last.generated_text == PARIS
    assert "".join(r.token.text for r in responses if not r.token.special) == PARIS
    assert last.details.finish_reason == "eos_token"
    assert last.details.generated_tokens == len(responses)


def test_max_new_tokens_and_stop_sequences(engine_url):
    client = text_generation.Client(engine_url)
    response = client.generate(CHAT_PROMPT, max_new_tokens=3)
    assert (response.generated_text, response.details.finish_reason) == ("The capital of", "length")
    response = client.generate(CHAT_PROMPT, max_new_tokens=20, stop_sequences=[" France"])
    assert response.generated_text == "The capital of France"
    assert response.details.finish_reason == "stop_sequence"


def test_seeded_sampling_is_reproducible(engine_url):
    client = text_generation.Client(engine_url)
    kwargs = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 7}
    first = client.generate("Once upon a time", **kwargs)
    second = client.generate("Once upon a time", **kwargs)
    assert first.generated_text == second.generated_text
    assert first.details.seed == 7


def test_openai_chat_streaming_and_not(engine_url):
    client = openai.OpenAI(base_url=f"{engine_url}/v1", api_key="-")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="tgi", messages=messages, temperature=0)
    assert reply.choices[0].message.content == PARIS
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 8
    chunks = list(
        client.chat.completions.create(
            model="tgi", messages=messages, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PARIS
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8


def test_concurrent_requests_get_the_same_greedy_answer(engine_url):
    client = text_generation.AsyncClient(engine_url)

    async def generate_all():
        requests = [client.generate(CHAT_PROMPT, max_new_tokens=20) for _ in range(MAX_CONCURRENT)]
        return await asyncio.gather(*requests)

    responses = asyncio.run(generate_all())
    assert [r.generated_text for r in responses] == [PARIS] * MAX_CONCURRENT


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": "hi", "parameters": {"max_new_tokens": 500}}, "must be <= 128"),
        ({"inputs": "hi " * 100}, "must have less than 64 tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "strictly positive"),
        ({"inputs": "hi", "parameters": {"temperature": 0}}, "`temperature`"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "`top_p`"),
        ({"inputs": "hi", "parameters": {"stop": ["a"] * 5}}, "up to 4 stop sequences"),
        ({"inputs": ""}, "cannot be empty"),
        ({"inputs": 5}, "`inputs`"),
        ({"parameters": {}}, "`inputs`"),
    ],
)
def test_invalid_requests_get_422_in_tgi_shape(engine_url, body, message):
    response = httpx.post(f"{engine_url}/generate", json=body, timeout=30)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]


def test_past_max_concurrent_requests_gets_429(engine_url):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 100}}
    with httpx.Client(base_url=engine_url, timeout=60) as client:
        streams = [client.stream("POST", "/generate_stream", json=body) for _ in range(2)]
        lines = []  # keep each line iterator alive: dropping one closes its connection
        for stream in streams:
            response = stream.__enter__()
            assert response.status_code == 200
            lines.append(response.iter_lines())
            next(lines[-1])  # the request is running
        overloaded = client.post("/generate", json=body)
        for stream in streams:  # disconnect mid-stream
            stream.__exit__(None, None, None)
    assert overloaded.status_code == 429
    assert overloaded.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert_slots_come_back(engine_url)


def assert_slots_come_back(engine_url: str) -> None:
    """Disconnected streams release their slots: soon, MAX_CONCURRENT requests run at once."""
    deadline = time.monotonic() + 30
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 20}}
    with httpx.Client(base_url=engine_url, timeout=60) as client:
        while True:  # the engine notices each disconnect at its next write
            with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
                codes = list(pool.map(lambda _: client.post("/generate", json=body).status_code,
                                      range(MAX_CONCURRENT)))  # fmt: skip
            if codes == [200] * MAX_CONCURRENT or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert codes == [200] * MAX_CONCURRENT


def test_health_and_info(engine_url):
    assert httpx.get(f"{engine_url}/health").status_code == 200
    info = httpx.get(f"{engine_url}/info").json()
    assert info["max_input_tokens"] == 64
    assert info["max_total_tokens"] == 128
    assert info["max_concurrent_requests"] == MAX_CONCURRENT


def test_compat_route_answers_as_a_list_or_a_stream(engine_url):
    body = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 20}}
    response = httpx.post(engine_url, json=body, timeout=60)
    assert response.status_code == 200
    assert response.json() == [{"generated_text": PARIS}]
    with httpx.stream("POST", engine_url, json={**body, "stream": True}, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert '"generated_text": "The capital of France is Paris."' in events[-1]


def test_openai_completions_single_list_and_stream(engine_url):
    client = openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused")
    answer = client.completions.create(
        model="any", prompt=CHAT_PROMPT, max_tokens=20, temperature=0
    )
    assert answer.choices[0].text == PARIS
    assert answer.choices[0].finish_reason == "stop"
    batch = client.completions.create(
        model="any", prompt=[CHAT_PROMPT, "1, 2, 3, 4,"], max_tokens=6, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == PARIS[: len(batch.choices[0].text)]
    assert batch.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model="any", prompt=[CHAT_PROMPT] * 2, max_tokens=20, temperature=0, stream=True
        )
    )
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == index) == PARIS
    too_many = httpx.post(
        f"{engine_url}/v1/completions", json={"prompt": ["a"] * 5, "max_tokens": 2}
    )
    assert too_many.status_code == 422
    assert "--max-client-batch-size" in too_many.json()["error"]


@pytest.mark.parametrize("path", ["/generate_stream", "/v1/chat/completions", "/v1/completions"])
def test_streams_dropped_before_the_first_event_free_their_slots(engine_url, path):
    bodies = {
        "/generate_stream": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 50}},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
        "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 50, "stream": True},
    }
    payload = json.dumps(bodies[path]).encode()
    host, port = engine_url.removeprefix("http://").split(":")
    for _ in range(3 * MAX_CONCURRENT):  # more than the slots: each must come back
        with socket.create_connection((host, int(port))) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        # closed without reading a byte
    assert_slots_come_back(engine_url)
