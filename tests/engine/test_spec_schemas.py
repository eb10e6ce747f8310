"""Real responses of the engine validated against TGI 3.3.6's own OpenAPI schemas.

tgi-openapi.json is TGI's published spec (a copy of ../shared/anchors/tgi-openapi.json).
OpenAPI 3.0 marks optional values with `nullable`, which JSON Schema spells as a null type;
`to_json_schema` rewrites that, so jsonschema can check the responses as they are.
"""

import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

pytestmark = pytest.mark.slow

SPEC = json.loads((Path(__file__).with_name("tgi-openapi.json")).read_text())
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0}  # fmt: skip


def to_json_schema(node):
    """OpenAPI 3.0 `nullable: true` -> JSON Schema's `anyOf [..., null]`, recursively."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: to_json_schema(v) for k, v in node.items() if k not in ("example", "default")}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


REGISTRY = Registry().with_resource(
    "tgi", Resource.from_contents(to_json_schema(SPEC), default_specification=DRAFT202012)
)


def check(instance, schema_name: str) -> None:
    schema = {"$ref": f"tgi#/components/schemas/{schema_name}"}
    errors = list(Draft202012Validator(schema, registry=REGISTRY).iter_errors(instance))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def engine_url(small_engine_url):
    return small_engine_url


def events(engine_url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{engine_url}{path}", json=body, timeout=60) as response:
        lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def test_generate_with_every_detail_matches_generate_response(engine_url):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True,
            "decoder_input_details": True, "top_n_tokens": 2}}  # fmt: skip
    check(httpx.post(f"{engine_url}/generate", json=body, timeout=60).json(), "GenerateResponse")
    best_of = {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True,
               "best_of": 2, "do_sample": True}}  # fmt: skip
    check(httpx.post(f"{engine_url}/generate", json=best_of, timeout=60).json(),
          "GenerateResponse")  # fmt: skip


def test_stream_events_match_stream_response(engine_url):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True,
            "top_n_tokens": 2}}  # fmt: skip
    for event in events(engine_url, "/generate_stream", body):
        check(event, "StreamResponse")


def test_openai_answers_match_their_schemas(engine_url):
    chat = httpx.post(f"{engine_url}/v1/chat/completions", json=CHAT, timeout=60).json()
    check(chat, "ChatCompletion")
    for chunk in events(engine_url, "/v1/chat/completions", {**CHAT, "stream": True}):
        check(chunk, "ChatCompletionChunk")
    completion = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{engine_url}/v1/completions", json=completion, timeout=60).json()
    check(answer, "CompletionFinal")
    for chunk in events(engine_url, "/v1/completions", {**completion, "stream": True}):
        check(chunk, "Chunk")


def test_info_tokenize_and_errors_match_their_schemas(engine_url):
    check(httpx.get(f"{engine_url}/info").json(), "Info")
    check(httpx.post(f"{engine_url}/tokenize", json={"inputs": "Hello"}).json(),
          "TokenizeResponse")  # fmt: skip
    check(httpx.post(f"{engine_url}/chat_tokenize", json=CHAT).json(), "ChatTokenizeResponse")
    error = httpx.post(f"{engine_url}/generate", json={"inputs": "Hi", "parameters": {
        "top_k": 0}}).json()  # fmt: skip
    check(error, "ErrorResponse")
