"""--disable-grammar-support, set through its environment variable as TGI's launcher reads it:
`grammar`, `response_format` and `tools` are refused with TGI's 422, plain requests still run."""

import os

import httpx
import pytest

from benchmarks.common import engine_process

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
JSON_OBJECT = {"type": "json_object"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def engine_url(default_model_dir, monkeypatch_module):
    monkeypatch_module.setenv("DISABLE_GRAMMAR_SUPPORT", "true")  # the child inherits it
    flags = ["--model-id", str(default_model_dir), "--max-total-tokens", "256",
             "--max-batch-total-tokens", "1024"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "a"}}}),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": JSON_OBJECT}),
        ("/v1/chat/completions", {"messages": MESSAGES, "tools": [TOOL]}),
    ],
)
def test_grammar_requests_are_refused(engine_url, path, body):
    assert os.environ.get("DISABLE_GRAMMAR_SUPPORT") == "true"
    answer = httpx.post(f"{engine_url}{path}", json=body, timeout=60)
    assert answer.status_code == 422
    assert answer.json() == {"error": "Input validation error: grammar is not supported",
                             "error_type": "validation"}  # fmt: skip


def test_plain_requests_still_run(engine_url):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    answer = httpx.post(f"{engine_url}/v1/chat/completions", json=body, timeout=60)
    assert answer.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
