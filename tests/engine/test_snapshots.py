"""Whole greedy responses compared with stored snapshots (tests/engine/snapshots/*.json).

Greedy fp32 decoding on the CPU is deterministic, so everything but ids and clocks must match;
logprobs within 1e-3. `UPDATE_SNAPSHOTS=1 pytest tests/engine/test_snapshots.py` rewrites
them after an intended change (review the diff).
"""

import json
import math
import os
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

SNAPSHOTS = Path(__file__).with_name("snapshots")
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CHAT = [{"role": "user", "content": "Name three colors."}]
VOLATILE = {"id", "created", "system_fingerprint"}  # differ on every call by design

CASES = {
    "generate_details": ("/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 20, "details": True, "decoder_input_details": True,
        "top_n_tokens": 2}}),
    "generate_stop_sequence": ("/generate", {"inputs": "1, 2, 3,", "parameters": {
        "max_new_tokens": 30, "stop": [" 7"], "details": True}}),
    "generate_stream": ("/generate_stream", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 20, "details": True}}),
    "compat_list": ("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 20}}),
    "chat_completion": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 24,
                                                 "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 1}),
    "chat_completion_stream": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 24,
                                                        "temperature": 0, "stream": True}),
    "completion": ("/v1/completions", {"prompt": ["1, 2, 3,", "The sky is"],
                                       "max_tokens": 8, "temperature": 0}),
}  # fmt: skip


@pytest.fixture(scope="module")
def engine_url(small_engine_url):
    return small_engine_url


def fetch(engine_url: str, path: str, body: dict):
    """The response body, or for a stream the list of its events."""
    with httpx.stream("POST", f"{engine_url}{path}", json=body, timeout=60) as response:
        response.read()
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def normalize(body):
    """Drop the top-level fields that change on every call (of each event, for a stream)."""
    if isinstance(body, list):
        return [normalize(event) for event in body]
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k not in VOLATILE}
    return body


def assert_matches(actual, expected, where: str = "") -> None:
    if isinstance(expected, float) and isinstance(actual, float):
        assert math.isclose(actual, expected, abs_tol=1e-3), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_matches(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_matches(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_response_matches_its_snapshot(engine_url, name):
    path, body = CASES[name]
    actual = normalize(fetch(engine_url, path, body))
    snapshot = SNAPSHOTS / f"{name}.json"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        snapshot.write_text(json.dumps(actual, indent=1) + "\n")
    assert snapshot.is_file(), f"no snapshot {snapshot.name}; run with UPDATE_SNAPSHOTS=1"
    assert_matches(actual, json.loads(snapshot.read_text()), name)
