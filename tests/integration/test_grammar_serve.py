"""Structured output through the Serve ingress on a real Ray cluster: TGI's `grammar`, OpenAI's
`response_format`, and tool calls through the OpenAI client, streamed and not. The ingress
forwards bodies unchanged, so what the engine does (tests/engine/test_structured_output.py)
must arrive whole, with TGI's errors."""

import json

import httpx
import openai
import pytest
from serve_cluster import CHAT_PROMPT, FIRST, TINY

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}  # fmt: skip
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
SCHEMA = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
          "required": ["capital"], "additionalProperties": False}  # fmt: skip


def test_grammar_and_its_errors_through_the_ingress(two_model_app):
    body = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 40, "details": True,
            "grammar": {"type": "json", "value": SCHEMA}}}  # fmt: skip
    answer = httpx.post(f"{two_model_app}/models/{TINY}/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["generated_text"]) == {"capital": "Paris"}
    assert answer.json()["details"]["finish_reason"] == "eos_token"
    bad = {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "[0-9"}}}
    refused = httpx.post(f"{two_model_app}/generate", json=bad, timeout=60)
    assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
    assert refused.json()["error"].startswith("Input validation error: grammar is not valid")


def test_response_format_through_the_ingress(two_model_app):
    client = openai.OpenAI(base_url=f"{two_model_app}/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(
        model=FIRST, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    )  # fmt: skip
    assert json.loads(reply.choices[0].message.content) == {"capital": "Paris"}


def test_tool_calls_through_the_ingress_streamed_and_not(two_model_app):
    client = openai.OpenAI(base_url=f"{two_model_app}/v1", api_key="-", max_retries=0)
    kwargs = {"model": FIRST, "messages": QUESTION, "tools": [WEATHER], "temperature": 0,
              "max_tokens": 60}  # fmt: skip
    (call,) = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks]
    assert all(isinstance(d, list) and len(d) == 1 for d in deltas)
    assert deltas[0][0].function.name == "get_weather"
    assert "".join(d[0].function.arguments for d in deltas) == call.function.arguments
    unknown = {**kwargs, "tool_choice": "nope"}
    refused = httpx.post(f"{two_model_app}/v1/chat/completions", json=unknown, timeout=60)
    assert refused.status_code == 422
    assert refused.json() == {"error": "Tool error: Tool with name nope not found",
                              "error_type": "tool_error"}  # fmt: skip
