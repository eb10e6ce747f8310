"""Tokens, finish reasons and errors read from TGI's and OpenAI's answers as they pass."""

import json

from deployments.generation_outcome import GenerationOutcome


def _event(obj: object, space: str = "") -> str:
    return f"data:{space}{json.dumps(obj)}\n\n"


def test_tgi_generate_headers_and_details():
    outcome = GenerationOutcome()
    outcome.read_headers(
        {"x-prompt-tokens": "7", "x-generated-tokens": "5", "x-compute-type": "cpu"}
    )
    details = {"finish_reason": "length", "generated_tokens": 5, "seed": None, "tokens": []}
    outcome.read_body(json.dumps({"generated_text": "abc", "details": details}).encode())
    assert (outcome.input_tokens, outcome.output_tokens) == (7, 5)
    assert outcome.finish_reasons == ["length"]
    assert outcome.error_type is None and outcome.error_status is None


def test_tgi_compat_route_wraps_the_answer_in_a_list():
    outcome = GenerationOutcome()
    outcome.read_body(b'[{"generated_text": "x", "details": {"finish_reason": "eos_token", '
                      b'"generated_tokens": 2}}]')  # fmt: skip
    assert outcome.output_tokens == 2 and outcome.finish_reasons == ["eos_token"]
    assert outcome.input_tokens is None  # the body does not say; the headers would


def test_tgi_stream_counts_token_events_and_reads_the_last_details():
    outcome = GenerationOutcome()
    tokens = [{"index": i, "token": {"id": i, "text": "a", "logprob": 0.0, "special": False},
               "generated_text": None, "details": None} for i in range(3)]  # fmt: skip
    tokens[-1]["generated_text"] = "aaa"
    assert [outcome.read_event(_event(t)) for t in tokens] == [True, True, True]
    assert outcome.output_tokens == 3 and outcome.finish_reasons == []  # no details asked
    assert outcome.read_event(":\n\n") is False  # keep-alive comment
    with_details = GenerationOutcome()
    tokens[-1]["details"] = {"finish_reason": "length", "generated_tokens": 3,
                             "seed": None, "input_length": 11}  # fmt: skip
    for t in tokens:
        with_details.read_event(_event(t))
    assert (with_details.input_tokens, with_details.output_tokens) == (11, 3)
    assert with_details.finish_reasons == ["length"]


def test_openai_chat_stream_with_usage_and_done():
    outcome = GenerationOutcome()
    chunks = [{"object": "chat.completion.chunk", "usage": None,
               "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
              for w in ("The", " end")]  # fmt: skip
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    for chunk in chunks:
        assert outcome.read_event(_event(chunk, space=" ")) is True
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    assert outcome.read_event(_event(usage, space=" ")) is False  # no token in it
    assert outcome.read_event("data: [DONE]") is False
    assert (outcome.input_tokens, outcome.output_tokens) == (9, 2)
    assert outcome.finish_reasons == ["stop"] and outcome.num_token_events == 2


def test_reported_counts_win_over_counted_events():
    outcome = GenerationOutcome()
    outcome.read_event(_event({"choices": [{"index": 0, "text": "a", "finish_reason": ""}]}))
    assert outcome.output_tokens == 1
    outcome.read_event(
        _event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}})
    )
    assert outcome.output_tokens == 6


def test_openai_non_streamed_answer():
    outcome = GenerationOutcome()
    choices = [{"index": 0, "message": {"content": "x"}, "finish_reason": "length"},
               {"index": 1, "message": {"content": "y"}, "finish_reason": "stop"}]  # fmt: skip
    answer = {"object": "chat.completion", "choices": choices,
              "usage": {"prompt_tokens": 3, "completion_tokens": 8}}  # fmt: skip
    outcome.read_body(json.dumps(answer).encode())
    assert (outcome.input_tokens, outcome.output_tokens) == (3, 8)
    assert outcome.finish_reasons == ["length", "stop"]
    assert outcome.num_token_events == 0  # a whole answer is not a token event


def test_errors_in_bodies_and_streams_map_to_tgi_statuses():
    body = GenerationOutcome()
    body.read_body(b'{"error": "Input validation error: too long", "error_type": "validation"}')
    assert (body.error_type, body.error_status) == ("validation", 422)
    stream = GenerationOutcome()
    stream.read_event(_event({"index": 0, "token": {"id": 1, "text": "a"}}))
    assert stream.read_event(_event({"error": "oom", "error_type": "generation"})) is False
    assert (stream.error_type, stream.error_status, stream.error_message) == (
        "generation", 424, "oom")  # fmt: skip
    assert stream.output_tokens == 1
    unknown = GenerationOutcome()
    unknown.read_body(b'{"error": "Unauthorized", "error_type": "unauthorized"}')
    assert unknown.error_status == 500  # no TGI status for it: the ingress uses the HTTP one


def test_garbage_is_ignored():
    outcome = GenerationOutcome()
    outcome.read_body(b"not json")
    outcome.read_body(b'"a string"')
    assert outcome.read_event("data:{broken") is False
    outcome.read_headers({"x-prompt-tokens": "n/a"})
    assert outcome == GenerationOutcome()
