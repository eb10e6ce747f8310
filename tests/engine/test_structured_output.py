"""Structured output on the real engine process, over real HTTP: TGI's `grammar`, OpenAI's
`response_format`, and tool calls through the OpenAI client, streamed and not, checked
against TGI's OpenAPI schemas."""

import asyncio
import json
import re

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator
from test_spec_schemas import check

from benchmarks.common import engine_process
from benchmarks.grammar_cases import JSON_CASES, REGEX_CASES

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 160
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}}}  # fmt: skip
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def engine_url(default_model_dir):
    flags = ["--model-id", str(default_model_dir), "--max-total-tokens", "1024",
             "--max-batch-total-tokens", "16384", "--max-concurrent-requests", "64"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


@pytest.fixture
def client(engine_url):
    return openai.OpenAI(base_url=f"{engine_url}/v1", api_key="-", timeout=300)


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate_all(engine_url: str, bodies: list[dict]) -> list[dict]:
    """POST /generate for every body at once (so they share batches); the answers."""

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=engine_url, timeout=600) as http:
            answers = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json() for a in answers]

    return asyncio.run(run())


def grammar_body(question: str, grammar: dict, **parameters) -> dict:
    parameters = {"max_new_tokens": MAX_NEW_TOKENS, "details": True, **parameters}
    return {"inputs": chat_prompt(question), "parameters": {**parameters, "grammar": grammar}}


def test_every_json_schema_is_followed_with_plain_requests_in_the_batch(engine_url):
    assert len(JSON_CASES) >= 20
    bodies = [grammar_body(q, {"type": "json", "value": schema}) for q, schema in JSON_CASES]
    plain = {"inputs": chat_prompt("What is the capital of France?"),
             "parameters": {"max_new_tokens": 20}}  # fmt: skip
    *answers, unconstrained = generate_all(engine_url, [*bodies, plain])
    for (_, schema), answer in zip(JSON_CASES, answers, strict=True):
        assert answer["details"]["finish_reason"] == "eos_token", answer
        instance = json.loads(answer["generated_text"])
        errors = list(Draft202012Validator(schema).iter_errors(instance))
        assert not errors, (answer["generated_text"], errors[0].message)
    assert unconstrained["generated_text"] == "The capital of France is Paris."


def test_every_regex_matches_the_whole_output(engine_url):
    bodies = [grammar_body(q, {"type": "regex", "value": r}) for q, r in REGEX_CASES]
    for (_, pattern), answer in zip(REGEX_CASES, generate_all(engine_url, bodies), strict=True):
        assert answer["details"]["finish_reason"] == "eos_token"
        assert re.fullmatch(pattern, answer["generated_text"]), answer["generated_text"]


def test_a_stream_follows_the_grammar_token_by_token(engine_url):
    question, pattern = REGEX_CASES[1]
    body = grammar_body(question, {"type": "regex", "value": pattern})
    with httpx.stream("POST", f"{engine_url}/generate_stream", json=body, timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert re.fullmatch(pattern, text) and events[-1]["generated_text"] == text
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_the_three_grammar_types_and_a_schema_given_as_text(engine_url):
    question, schema = JSON_CASES[1]
    grammars = [
        {"type": "json", "value": schema},
        {"type": "json", "value": json.dumps(schema)},
        {"type": "json_schema", "value": {"name": "capital", "schema": schema}},
    ]
    answers = generate_all(engine_url, [grammar_body(question, g) for g in grammars])
    texts = {a["generated_text"] for a in answers}
    assert len(texts) == 1 and json.loads(texts.pop())["capital"] == "Paris"


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ({"type": "regex", "value": "[0-9"}, "grammar is not valid: "),
        ({"type": "json", "value": {"type": "foo"}}, "grammar is not valid: "),
        ({"type": "json", "value": "{not json"}, "grammar is not valid: "),
        ({"type": "json", "value": 7}, "grammar is not supported"),
        ({"type": "lark", "value": "start: x"}, "`parameters.grammar`"),
    ],
)
def test_bad_grammars_answer_422(engine_url, grammar, message):
    answer = httpx.post(f"{engine_url}/generate", json=grammar_body("Hi", grammar), timeout=60)
    assert answer.status_code == 422
    assert answer.json()["error_type"] == "validation"
    assert answer.json()["error"].startswith(f"Input validation error: {message}")


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "capital", "schema": JSON_CASES[1][1]}},
        {"type": "json_schema", "value": {"name": "capital", "schema": JSON_CASES[1][1]}},
        {"type": "json", "value": JSON_CASES[1][1]},
        {"type": "regex", "value": "(Paris|London|Rome)"},
    ],
)
def test_response_format_in_openais_and_tgis_shapes(client, response_format):
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=MAX_NEW_TOKENS, response_format=response_format,
    )  # fmt: skip
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", content
    if response_format["type"] == "regex":
        assert content in ("Paris", "London", "Rome")  # the 135M model says London
    else:
        assert isinstance(json.loads(content), dict)
    if response_format["type"] in ("json", "json_schema"):
        assert json.loads(content)["capital"] == "Paris"


def test_tool_calls_through_the_openai_client_streamed_and_not(engine_url, client):
    kwargs = {"model": "tgi", "messages": WEATHER_QUESTION, "tools": [WEATHER],
              "temperature": 0, "max_tokens": 100}  # fmt: skip
    reply = client.chat.completions.create(**kwargs)
    check(reply.model_dump(exclude_unset=True), "ChatCompletion")
    (call,) = reply.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments == {"location": "Paris", "unit": "celsius"}
    assert reply.choices[0].message.content is None and reply.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    for chunk in chunks:
        check(chunk.model_dump(exclude_unset=True), "ChatCompletionChunk")
    deltas = [c.choices[0].delta.tool_calls for c in chunks]
    assert all(isinstance(d, list) and len(d) == 1 for d in deltas)  # an array, every time
    assert deltas[0][0].function.name == "get_weather" and deltas[0][0].id
    assert all(d[0].function.name is None and d[0].id == deltas[0][0].id for d in deltas[1:])
    assert "".join(d[0].function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_required_named_and_none(client):
    now = {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    base = {"model": "tgi", "messages": WEATHER_QUESTION, "tools": [WEATHER, now],
            "temperature": 0, "max_tokens": 40}  # fmt: skip
    required = client.chat.completions.create(**base, tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    named = client.chat.completions.create(
        **base, tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    (call,) = named.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_time", "{}")
    none = client.chat.completions.create(**base, tool_choice="none")
    plain = client.chat.completions.create(**{**base, "tools": None})
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_no_tool_is_answered_by_a_plain_generation(client):
    # With "auto" the model may decline every tool (the 135M model always calls one unless
    # TGI's `tool_prompt` tells it not to); the route then answers as if no tool had been
    # offered, as TGI 3.3 does.
    messages = [{"role": "user", "content": "Hi!"}]
    base = {"model": "tgi", "messages": messages, "temperature": 0, "max_tokens": 30}
    plain = client.chat.completions.create(**base).choices[0].message.content
    declined = {"tools": [WEATHER], "extra_body": {"tool_prompt": "Call the no_tool function."}}
    reply = client.chat.completions.create(**base, **declined, tool_choice="auto")
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == plain == "Hello! How can I assist you today?"
    chunks = list(client.chat.completions.create(**base, **declined, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert all(c.choices[0].delta.tool_calls is None for c in chunks)


def test_a_tool_conversation_continues_with_the_tools_answer(client, engine_url):
    messages = [*WEATHER_QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]  # fmt: skip
    reply = client.chat.completions.create(
        model="tgi", messages=messages, temperature=0, max_tokens=40, tools=[WEATHER],
        tool_choice="none",
    )  # fmt: skip
    assert reply.choices[0].message.content
    templated = httpx.post(f"{engine_url}/chat_tokenize", timeout=60, json={
        "messages": WEATHER_QUESTION, "tools": [WEATHER]}).json()["templated_text"]  # fmt: skip
    assert '"name": "get_weather"' in templated and "no_tool" in templated
    assert "respond with a JSON for a function call" in templated


def test_tool_errors_answer_422_tool_error(engine_url):
    def post(**fields) -> httpx.Response:
        body = {"messages": WEATHER_QUESTION, "tools": [WEATHER], **fields}
        return httpx.post(f"{engine_url}/v1/chat/completions", json=body, timeout=60)

    unknown = post(tool_choice="nope")
    assert unknown.status_code == 422
    assert unknown.json() == {"error": "Tool error: Tool with name nope not found",
                              "error_type": "tool_error"}  # fmt: skip
    both = post(response_format={"type": "json_object"})
    assert both.status_code == 422 and both.json()["error_type"] == "tool_error"
