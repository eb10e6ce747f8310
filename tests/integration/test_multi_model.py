"""Two models in one app: routing by prefix, header and OpenAI `model`, /v1/models, /stats,
and `ray-tgi chat` — over a real cluster, the real engine and real HTTP clients.

The two models are the same weights with different limits (serve_cluster.py), so which
model answered shows in /info's max_total_tokens and in a 422 only the tiny one gives.
"""

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from serve_cluster import (
    CHAT_PROMPT,
    FIRST,
    MAX_TOTAL_TOKENS,
    MID_PROMPT,
    QUESTION,
    TINY,
    engines_idle,
    model_stats,
    wait_until,
)
from text_generation import Client

from serve_app.chat_client import stream_chat

pytestmark = pytest.mark.slow

RAY_TGI = Path(sys.executable).with_name("ray-tgi")


def _generate(url: str, prompt: str, **kwargs) -> httpx.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 4}}
    return httpx.post(url, json=body, timeout=60, **kwargs)


def test_v1_models_lists_the_models_first_one_first(two_model_app):
    models = httpx.get(f"{two_model_app}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [FIRST, TINY]
    assert all(m["object"] == "model" for m in models["data"])


def test_the_route_prefix_picks_the_model(two_model_app):
    for name in (FIRST, TINY):
        info = httpx.get(f"{two_model_app}/models/{name}/info").json()
        assert info["max_total_tokens"] == MAX_TOTAL_TOKENS[name]
        assert httpx.get(f"{two_model_app}/models/{name}/health").status_code == 200
    assert _generate(f"{two_model_app}/models/{FIRST}/generate", MID_PROMPT).status_code == 200
    refused = _generate(f"{two_model_app}/models/{TINY}/generate", MID_PROMPT)
    assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
    # TGI's own client, with the model's base URL: its compat route `POST /models/{name}`.
    client = Client(f"{two_model_app}/models/{TINY}", timeout=60)
    assert "Paris" in client.generate(CHAT_PROMPT, max_new_tokens=16).generated_text
    tokens = [r.token.text for r in client.generate_stream(CHAT_PROMPT, max_new_tokens=16)]
    assert len(tokens) > 1 and "Paris" in "".join(tokens)


def test_the_x_model_header_picks_the_model_and_no_name_means_the_first(two_model_app):
    headers = {"x-model": TINY}
    info = httpx.get(f"{two_model_app}/info", headers=headers).json()
    assert info["max_total_tokens"] == MAX_TOTAL_TOKENS[TINY]
    assert _generate(f"{two_model_app}/generate", MID_PROMPT, headers=headers).status_code == 422
    # Neither prefix nor header: the first model (what a one-model TGI client expects).
    assert httpx.get(f"{two_model_app}/info").json()["max_total_tokens"] == 1024
    assert _generate(f"{two_model_app}/generate", MID_PROMPT).status_code == 200
    # The prefix beats the header.
    answer = httpx.get(f"{two_model_app}/models/{FIRST}/info", headers=headers).json()
    assert answer["max_total_tokens"] == MAX_TOTAL_TOKENS[FIRST]


def test_an_unknown_model_on_a_tgi_route_is_a_tgi_404(two_model_app):
    for url, headers in [
        (f"{two_model_app}/models/nope/generate", {}),
        (f"{two_model_app}/generate", {"x-model": "nope"}),
    ]:
        answer = _generate(url, "Hello", headers=headers)
        assert answer.status_code == 404
        assert answer.json()["error_type"] == "not_found"
        assert "nope" in answer.json()["error"] and TINY in answer.json()["error"]


def test_openai_model_field_routes_and_an_unknown_model_is_openais_404(two_model_app):
    client = openai.OpenAI(base_url=f"{two_model_app}/v1", api_key="unused", max_retries=0)
    long_question = [{"role": "user", "content": MID_PROMPT}]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=TINY, messages=long_question, max_tokens=4)
    for model in (FIRST, "tgi"):  # "tgi", TGI's conventional name: the first model
        answer = client.chat.completions.create(model=model, messages=long_question, max_tokens=4)
        assert answer.choices[0].message.content
    question = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model=TINY, messages=question, temperature=0)
    assert "Paris" in answer.choices[0].message.content

    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-nope", messages=question)
    assert error.value.code == "model_not_found"
    raw = httpx.post(f"{two_model_app}/v1/completions", json={"model": "gpt-nope", "prompt": "Hi"})
    assert raw.status_code == 404
    assert raw.json() == {
        "error": {
            "message": "The model `gpt-nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    # No `model` at all: the first model.
    body = {"messages": long_question, "max_tokens": 4}
    assert httpx.post(f"{two_model_app}/v1/chat/completions", json=body, timeout=60).is_success


def test_an_openai_client_on_a_models_base_url(two_model_app):
    client = openai.OpenAI(base_url=f"{two_model_app}/models/{TINY}/v1", api_key="-")
    with pytest.raises(openai.UnprocessableEntityError):  # the prefix's model, not the body's
        client.completions.create(model=FIRST, prompt=MID_PROMPT, max_tokens=4)


def test_stats_show_replicas_and_a_running_request_until_its_client_leaves(two_model_app):
    wait_until(lambda: engines_idle(two_model_app), 30, "both engines report an idle queue")
    stats = model_stats(two_model_app)
    assert list(stats) == [FIRST, TINY]
    for name, entry in stats.items():
        assert entry["deployment"] == f"TGIServer:{name}"
        assert entry["status"] == "HEALTHY" and entry["running_replicas"] == 1
        assert entry["model_id"].endswith("SmolLM2-135M-Instruct")

    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 900}}
    url = f"{two_model_app}/models/{FIRST}/generate_stream"
    with httpx.stream("POST", url, json=body, timeout=60) as stream:
        events = stream.iter_lines()
        assert next(events).startswith("data:")
        stats = model_stats(two_model_app)
        assert stats[FIRST]["running_requests"] == 1
        assert stats[TINY]["running_requests"] == 0
    # Leaving the stream closed the connection: the engine's request is cancelled long
    # before 900 tokens would have been generated.
    wait_until(lambda: engines_idle(two_model_app), 10, "the engine dropped the request")


def test_cli_chat_streams_an_answer(two_model_app):
    pieces = list(stream_chat(two_model_app, QUESTION, model=TINY, temperature=0))
    assert len(pieces) > 1 and "Paris" in "".join(pieces)
    command = [str(RAY_TGI), "chat", QUESTION, "--url", two_model_app, "--max-tokens", "16"]
    done = subprocess.run(
        [*command, "--temperature", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    unknown = subprocess.run(
        [*command, "--model", "nope"], capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode == 1
    assert "HTTP 404" in unknown.stderr and "`nope` does not exist" in unknown.stderr
