"""Bad input through the whole path (real cluster, real engine, real HTTP): a battery of
malformed requests, each answered with a 4xx in the documented shape, then Schemathesis
against the ingress's own OpenAPI document, bounded, with no 5xx; the app keeps serving.

The documented shapes (README): TGI's `{"error": ..., "error_type": ...}` everywhere, except
an unknown `model` on an OpenAI route, answered in OpenAI's `{"error": {"message", "type",
"param", "code"}}`.
"""

import collections
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from rel_cluster import (
    CHAT_PROMPT,
    app_at,
    engine_drained,
    model_args,
    placements,
    wait_until,
)
from serve_cluster import serve_cluster

pytestmark = pytest.mark.slow

APP = "bad"
LAUNCHER_ARGS = {"max_input_tokens": 32, "max_total_tokens": 48,
                 "max_batch_prefill_tokens": 256, "max_batch_total_tokens": 2048}  # fmt: skip
GOOD = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 8}}
HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _gen(**parameters) -> dict:
    return {"inputs": "Hi", "parameters": {"max_new_tokens": 2, **parameters}}


def _chat(**fields) -> dict:
    return {**HI, **fields}


def _raw(text: str) -> bytes:
    return text.encode()


# (name, path, body: dict -> JSON, bytes -> sent as is, expected status)
BATTERY: list[tuple[str, str, object, int]] = [
    # Not JSON, or not an object.
    ("truncated JSON", "/generate", _raw('{"inputs": "Hi",'), 422),
    ("empty body", "/generate", b"", 422),
    ("invalid UTF-8", "/generate", b'{"inputs": "\xff\xfe"}', 422),
    ("lone surrogate", "/generate", _raw('{"inputs": "Hi \\ud800"}'), 422),
    ("NaN literal", "/generate", _raw('{"inputs": "Hi", "parameters": {"temperature": NaN}}'), 422),
    ("Infinity literal", "/v1/chat/completions", _raw('{"messages": [], "top_p": Infinity}'), 422),
    ("float overflow", "/generate", _raw('{"inputs": "Hi", "parameters": {"top_p": 1e400}}'), 422),
    ("nested too deep", "/generate", b"[" * 100_000 + b"]" * 100_000, 422),
    ("JSON array", "/generate", [1, 2], 422),
    ("JSON string", "/generate", "Hi", 422),
    ("JSON null", "/v1/completions", None, 422),
    ("form encoded", "/generate", _raw("inputs=Hi&max_new_tokens=2"), 422),
    ("digits past the int limit", "/generate", _raw('{"inputs": "Hi", "parameters": '
                                                    '{"seed": ' + "9" * 5000 + "}}"), 422),
    # TGI routes: missing fields, wrong types, values out of range.
    ("missing inputs", "/generate", {"parameters": {"max_new_tokens": 2}}, 422),
    ("inputs a number", "/generate", {"inputs": 42}, 422),
    ("inputs null", "/generate_stream", {"inputs": None}, 422),
    ("inputs empty", "/generate", {"inputs": "", "parameters": {"max_new_tokens": 2}}, 422),
    ("parameters a string", "/generate", {"inputs": "Hi", "parameters": "fast"}, 422),
    ("max_new_tokens negative", "/generate", _gen(max_new_tokens=-5), 422),
    ("max_new_tokens zero", "/generate", _gen(max_new_tokens=0), 422),
    ("max_new_tokens huge", "/generate", _gen(max_new_tokens=10**30), 422),
    ("max_new_tokens over the context", "/generate_stream", _gen(max_new_tokens=1000), 422),
    ("max_new_tokens a string", "/generate", _gen(max_new_tokens="ten"), 422),
    ("max_new_tokens a fraction", "/generate", _gen(max_new_tokens=1.5), 422),
    ("temperature negative", "/generate", _gen(temperature=-1), 422),
    ("temperature a word", "/generate", _gen(temperature="hot"), 422),
    ("top_p above 1", "/generate", _gen(top_p=1.5), 422),
    ("top_k zero", "/generate", _gen(top_k=0), 422),
    ("top_k past i32", "/generate", _gen(top_k=2**70), 422),
    ("seed negative", "/generate", _gen(seed=-1), 422),
    ("seed past u64", "/generate", _gen(seed=2**64, do_sample=True), 422),
    ("repetition_penalty zero", "/generate", _gen(repetition_penalty=0), 422),
    ("frequency_penalty 5", "/generate", _gen(frequency_penalty=5), 422),
    ("typical_p 0", "/generate", _gen(typical_p=0), 422),
    ("stop a string", "/generate", _gen(stop="end"), 422),
    ("100 stop sequences", "/generate", _gen(stop=["x"] * 100), 422),
    ("best_of 100", "/generate", _gen(best_of=100, do_sample=True), 422),
    ("best_of when streaming", "/generate_stream", _gen(best_of=2, do_sample=True), 422),
    ("top_n_tokens 100", "/generate", _gen(top_n_tokens=100), 422),
    ("truncate 0", "/generate", _gen(truncate=0), 422),
    ("prompt over max_input_tokens", "/generate", {"inputs": "word " * 200}, 422),
    ("decoder_input_details streaming", "/generate_stream", _gen(decoder_input_details=True),
     422),
    ("compat route, stream a list", "/", {"inputs": "Hi", "stream": [1]}, 422),
    # OpenAI routes.
    ("messages missing", "/v1/chat/completions", {"max_tokens": 2}, 422),
    ("messages empty", "/v1/chat/completions", {"messages": []}, 422),
    ("messages an object", "/v1/chat/completions", {"messages": {"role": "user"}}, 422),
    ("role unknown", "/v1/chat/completions", {"messages": [{"role": "wizard",
                                                            "content": "Hi"}]}, 422),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                 "content": 7}]}, 422),
    ("content part text a number", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, 422),
    ("max_tokens negative", "/v1/chat/completions", _chat(max_tokens=-5), 422),
    ("max_tokens absurd", "/v1/chat/completions", _chat(max_tokens=10**12), 422),
    ("n zero", "/v1/chat/completions", _chat(n=0), 422),
    ("n 100", "/v1/chat/completions", _chat(n=100), 422),
    ("temperature -2", "/v1/chat/completions", _chat(temperature=-2), 422),
    ("top_logprobs 50", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=50), 422),
    ("stream a list", "/v1/chat/completions", _chat(stream=[True]), 422),
    ("unknown model (chat)", "/v1/chat/completions", _chat(model="gpt-nope"), 404),
    ("unknown model (completions)", "/v1/completions", {"model": "gpt-nope", "prompt": "Hi"},
     404),
    ("prompt missing", "/v1/completions", {"max_tokens": 2}, 422),
    ("prompt token ids", "/v1/completions", {"prompt": [1, 2, 3]}, 422),
    ("10 prompts", "/v1/completions", {"prompt": ["Hi"] * 10, "max_tokens": 2}, 422),
    ("prompt empty", "/v1/completions", {"prompt": "", "max_tokens": 2}, 422),
    # Routing and HTTP.
    ("unknown model prefix", "/models/nope/generate", GOOD, 404),
    ("unknown route", "/nope", GOOD, 404),
    ("tokenize without inputs", "/tokenize", {}, 422),
    ("chat_tokenize without messages", "/chat_tokenize", {}, 422),
    ("body over the size limit", "/generate", {"inputs": "x" * 2_100_000}, 413),
]  # fmt: skip


@pytest.fixture(scope="module")
def app(default_model_dir: Path) -> Iterator[tuple[str, str]]:
    with serve_cluster() as base, app_at(base, APP, model_args(default_model_dir,
                                                               LAUNCHER_ARGS)) as url:  # fmt: skip
        (placement,) = placements(APP)
        yield url, placement["launcher_url"]


def _send(client: httpx.Client, url: str, path: str, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(f"{url}{path}", content=body,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    return client.post(f"{url}{path}", json=body)


def _documented_shape(reply: httpx.Response, path: str) -> bool:
    body = reply.json()
    if set(body) == {"error", "error_type"}:  # TGI's
        return isinstance(body["error"], str) and isinstance(body["error_type"], str)
    openai = path.startswith("/v1/") and reply.status_code == 404
    return openai and set(body["error"]) == {"message", "type", "param", "code"}


def _serving(client: httpx.Client, url: str) -> bool:
    reply = client.post(f"{url}/generate", json=GOOD)
    return reply.status_code == 200 and "Paris" in reply.json()["generated_text"]


def test_a_battery_of_malformed_requests_gets_4xx_in_the_documented_shape(app):
    url, engine = app
    assert len(BATTERY) >= 40
    wrong = []
    with httpx.Client(timeout=60) as client:
        for i, (name, path, body, expected) in enumerate(BATTERY):
            reply = _send(client, url, path, body)
            if reply.status_code != expected or not _documented_shape(reply, path):
                wrong.append((name, reply.status_code, reply.text[:200]))
            if i % 10 == 9:  # and the app keeps serving, all along
                assert _serving(client, url), f"not serving after {name!r}"
        # Wrong method: 405, in TGI's shape too.
        reply = client.get(f"{url}/generate")
        if reply.status_code != 405 or not _documented_shape(reply, "/generate"):
            wrong.append(("GET /generate", reply.status_code, reply.text[:200]))
        assert client.get(f"{url}/health").status_code == 200
        assert _serving(client, url)
    print(f"\nbad input battery: {len(BATTERY) + 1} requests, "
          f"{len(BATTERY) + 1 - len(wrong)} rejected as documented")  # fmt: skip
    assert wrong == []
    wait_until(lambda: engine_drained(engine), 10, "nothing left running in the engine")


MAX_EXAMPLES = {"POST": 25, "GET": 5}  # per operation; prefixed duplicates get GET's count


def test_schemathesis_finds_no_server_error(app):
    """Schemathesis cases (schema-valid and schema-violating bodies) for every operation of
    /api-doc/openapi.json, a bounded number each: no response is a 5xx."""
    url, engine = app
    document = httpx.get(f"{url}/api-doc/openapi.json", timeout=30).json()
    assert document["paths"]["/generate"]["post"]["requestBody"]  # bodies are documented
    schema = schemathesis.openapi.from_dict(document)
    statuses: collections.Counter = collections.Counter()
    server_errors = []
    num_operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        num_operations += 1
        prefixed = operation.path.startswith("/models/")
        examples = MAX_EXAMPLES["GET" if prefixed else operation.method.upper()]
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        for mode in modes if operation.method.upper() == "POST" else modes[:1]:

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=url, timeout=120)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append((case.operation.label, case.body, response.text[:300]))

            call()
    total = sum(statuses.values())
    print(f"\nschemathesis: {total} cases over {num_operations} operations, statuses "
          f"{dict(sorted(statuses.items()))}")  # fmt: skip
    assert server_errors == [], json.dumps(server_errors[:5], default=str)
    assert total >= 300
    assert any(400 <= s < 500 for s in statuses) and statuses[200] > 0
    with httpx.Client(timeout=60) as client:
        assert _serving(client, url)
    wait_until(lambda: engine_drained(engine), 60, "nothing left running in the engine")
