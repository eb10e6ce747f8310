"""Request bodies the engine must refuse at parsing (422), not inside its loop: numbers past
TGI's integer types, NaN and infinities, and text that is not Unicode (lone surrogates).

Before these bounds, one request with `top_k: 2**70` overflowed a torch tensor in the engine
loop, which stopped the loop, so every later request failed with 424 until a restart.
"""

import pydantic
import pytest

from engine.schemas import ChatRequest, CompletionRequest, GenerateRequest

TOO_BIG = 2**70


def _refused(model: type[pydantic.BaseModel], body: dict) -> tuple:
    with pytest.raises(pydantic.ValidationError) as error:
        model.model_validate(body)
    first = error.value.errors()[0]
    return first["loc"], first["msg"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("seed", 2**64), ("top_k", 2**31), ("max_new_tokens", 2**32), ("top_n_tokens", 2**32),
     ("truncate", 2**64), ("best_of", 2**64), ("seed", TOO_BIG)],
)  # fmt: skip
def test_integers_past_tgis_types_are_refused(name, value):
    loc, msg = _refused(GenerateRequest, {"inputs": "Hi", "parameters": {name: value}})
    assert loc == ("parameters", name) and "less than or equal" in msg


def test_the_largest_values_of_tgis_types_are_accepted():
    body = {"inputs": "Hi", "parameters": {"seed": 2**64 - 1, "top_k": 2**31 - 1}}
    parameters = GenerateRequest.model_validate(body).parameters
    assert (parameters.seed, parameters.top_k) == (2**64 - 1, 2**31 - 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinities_are_refused(value):
    loc, msg = _refused(GenerateRequest, {"inputs": "Hi", "parameters": {"temperature": value}})
    assert loc == ("parameters", "temperature") and "finite" in msg
    loc, _ = _refused(ChatRequest, {"messages": [{"role": "user", "content": "Hi"}],
                                    "top_p": value})  # fmt: skip
    assert loc == ("top_p",)


@pytest.mark.parametrize(
    ("model", "body", "where"),
    [
        (GenerateRequest, {"inputs": "Hi \ud800"}, ("inputs",)),
        (GenerateRequest, {"inputs": "Hi", "parameters": {"stop": ["\udc00"]}},
         ("parameters", "stop", 0)),
        (ChatRequest, {"messages": [{"role": "user", "content": "a\udc00"}]},
         ("messages", 0, "content")),
        (ChatRequest, {"messages": [{"role": "user",
                                     "content": [{"type": "text", "text": "\ud800"}]}]},
         ("messages", 0, "content")),
        (ChatRequest, {"messages": [{"role": "user", "content": "Hi"}], "stop": "\ud800"},
         ("stop",)),
        (CompletionRequest, {"prompt": ["fine", "\ud800"]}, ("prompt",)),
    ],
)  # fmt: skip
def test_lone_surrogates_are_refused(model, body, where):
    loc, msg = _refused(model, body)
    assert loc == where and "not valid Unicode text" in msg


def test_surrogate_pairs_are_text():
    assert GenerateRequest.model_validate({"inputs": "\U0001f600"}).inputs == "\U0001f600"


def test_content_parts_keep_only_text_and_refuse_non_strings():
    parts = [{"type": "text", "text": "Hi "}, {"type": "image_url", "image_url": {}},
             {"type": "text", "text": "there"}]  # fmt: skip
    body = {"messages": [{"role": "user", "content": parts}]}
    assert ChatRequest.model_validate(body).messages[0].text() == "Hi there"
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    _refused(ChatRequest, bad)
