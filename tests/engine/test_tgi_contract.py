"""TGI's contract on the real engine process: validation rules and messages, details, best_of,
top tokens, prefill, headers, and the clients users already have."""

import asyncio
import json

import httpx
import pytest
import text_generation
from huggingface_hub import InferenceClient

from benchmarks.common import engine_process

pytestmark = pytest.mark.slow

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PARIS = "The capital of France is Paris."


@pytest.fixture(scope="module")
def engine_url(default_model_dir):
    flags = ["--model-id", str(default_model_dir), "--max-input-tokens", "64",
             "--max-total-tokens", "128", "--max-batch-total-tokens", "2048", "--max-best-of",
             "3", "--max-top-n-tokens", "4", "--max-stop-sequences", "2"]  # fmt: skip
    with engine_process(flags) as url:
        yield url


def post(engine_url: str, body: dict, path: str = "/generate") -> httpx.Response:
    return httpx.post(f"{engine_url}{path}", json=body, timeout=60)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c"]}, "`stop` supports up to 2 stop sequences. Given: 3"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 5}, "`top_n_tokens` must be >= 0 and <= 4. Given: 5"),
        ({"truncate": 65}, "`truncate` must be strictly positive and less than 64. Given: 65"),
        ({"best_of": 4, "do_sample": True}, "`best_of` must be > 0 and <= 3. Given: 4"),
        ({"max_new_tokens": 200}, "`inputs` tokens + `max_new_tokens` must be <= 128. Given: "),
        ({"adapter_id": "my-lora"}, "adapter `my-lora` is not loaded"),
        ({"grammar": {"type": "regex", "value": "[0-9"}}, "grammar is not valid: "),
    ],
)
def test_validation_rules_answer_422_with_tgis_message(engine_url, parameters, message):
    answer = post(engine_url, {"inputs": "Hello", "parameters": parameters})
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "error": answer.json()["error"], "error_type": "validation"}  # fmt: skip
    assert answer.json()["error"].startswith(f"Input validation error: {message}")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming"),
        ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported"),
    ],
)
def test_stream_only_rules(engine_url, parameters, message):
    answer = post(engine_url, {"inputs": "Hello", "parameters": parameters}, "/generate_stream")
    assert answer.status_code == 422
    assert message in answer.json()["error"]


def test_parameters_omitted_sample_but_empty_parameters_are_greedy(engine_url):
    omitted = post(engine_url, {"inputs": PROMPT}).json()
    empty = post(engine_url, {"inputs": PROMPT, "parameters": {"details": True}}).json()
    assert empty["generated_text"] == PARIS and empty["details"]["seed"] is None
    assert "details" not in omitted  # details default to false
    sampling = {"do_sample": True, "details": True}
    sampled = post(engine_url, {"inputs": PROMPT, "parameters": sampling}).json()
    assert isinstance(sampled["details"]["seed"], int)  # drawn by the server, as TGI does


def test_details_prefill_top_tokens_and_headers(engine_url):
    body = {"inputs": "The capital of France is", "parameters": {
        "max_new_tokens": 3, "details": True, "decoder_input_details": True,
        "top_n_tokens": 2}}  # fmt: skip
    answer = post(engine_url, body)
    details = answer.json()["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
    prefill = details["prefill"]
    assert "".join(t["text"] for t in prefill) == "The capital of France is"
    assert prefill[0]["logprob"] is None and all(t["logprob"] < 0 for t in prefill[1:])
    assert len(details["top_tokens"]) == 3
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(top) >= 2 and top[0]["logprob"] >= top[1]["logprob"]
        assert token["id"] == top[0]["id"]  # greedy picks the most likely
        assert {"id", "text", "logprob", "special"} <= set(top[0])
    headers = answer.headers
    assert headers["x-prompt-tokens"] == str(len(prefill))
    assert headers["x-generated-tokens"] == "3"
    for name in ("x-compute-type", "x-compute-time", "x-queue-time", "x-inference-time",
                 "x-time-per-token", "x-total-time", "x-validation-time"):  # fmt: skip
        assert name in headers


def test_best_of_returns_the_other_sequences(engine_url):
    body = {"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 5, "best_of": 3, "do_sample": True, "details": True}}  # fmt: skip
    details = post(engine_url, body).json()["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2
    for seq in others:
        assert {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill",
                "tokens"} <= set(seq)  # fmt: skip
    seeds = {details["seed"], *(s["seed"] for s in others)}
    assert len(seeds) == 3


def test_stream_details_and_top_tokens(engine_url):
    client = text_generation.Client(engine_url)
    events = list(client.generate_stream(PROMPT, max_new_tokens=8, top_n_tokens=2))
    assert all(len(e.top_tokens) >= 2 for e in events)
    assert events[-1].details.finish_reason.value in ("length", "eos_token")
    # StreamDetails.input_length is in TGI's spec, not in text_generation 0.7's model.
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    with httpx.stream("POST", f"{engine_url}/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert all(e["details"] is None for e in events[:-1])
    assert events[-1]["details"]["input_length"] == 16
    assert "top_tokens" not in events[0]  # left out when not asked for, as TGI does


def test_text_generation_clients_sync_async_and_streaming(engine_url):
    client = text_generation.Client(engine_url)
    answer = client.generate(PROMPT, max_new_tokens=20, decoder_input_details=True)
    assert answer.generated_text == PARIS
    assert answer.details.finish_reason.value == "eos_token"
    assert len(answer.details.prefill) == 16
    text = "".join(e.token.text for e in client.generate_stream(PROMPT, max_new_tokens=20)
                   if not e.token.special)  # fmt: skip
    assert text == PARIS
    async_answer = asyncio.run(text_generation.AsyncClient(engine_url).generate(
        PROMPT, max_new_tokens=20))  # fmt: skip
    assert async_answer.generated_text == PARIS


def test_huggingface_hub_inference_client(engine_url):
    client = InferenceClient(engine_url)
    assert client.text_generation(PROMPT, max_new_tokens=20) == PARIS
    detailed = client.text_generation(PROMPT, max_new_tokens=20, details=True)
    assert detailed.generated_text == PARIS and detailed.details.generated_tokens == 8
    chat = client.chat_completion(
        [{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )  # fmt: skip
    assert chat.choices[0].message.content == PARIS


def test_openai_logprobs_and_penalties(engine_url):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    answer = post(engine_url, body, "/v1/chat/completions").json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content).startswith(PARIS)
    assert all(len(c["top_logprobs"]) >= 2 for c in content)
    assert answer["usage"]["completion_tokens"] == len(content)
    penalized = post(engine_url, {**body, "frequency_penalty": 2.0, "presence_penalty": 1.0},
                     "/v1/chat/completions")  # fmt: skip
    assert penalized.status_code == 200
    bad = post(engine_url, {**body, "frequency_penalty": 3.0}, "/v1/chat/completions")
    assert bad.status_code == 422 and "`frequency_penalty`" in bad.json()["error"]


def test_openai_n_choices_streaming_and_not(engine_url):
    import openai

    client = openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me a word."}]
    answer = client.chat.completions.create(model="m", messages=messages, n=3, max_tokens=6,
                                            temperature=1.0)  # fmt: skip
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.completion_tokens >= 3
    greedy = client.chat.completions.create(model="m", messages=messages, n=2, max_tokens=6,
                                            temperature=0)  # fmt: skip
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, n=2, max_tokens=6, temperature=0, stream=True))  # fmt: skip
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks
                     if c.choices[0].index == i) for i in (0, 1)]  # fmt: skip
    assert texts == [greedy.choices[0].message.content] * 2
    too_many = post(engine_url, {"messages": messages, "n": 5}, "/v1/chat/completions")
    assert too_many.status_code == 422 and "`n` must be between 1 and 4" in too_many.json()["error"]
