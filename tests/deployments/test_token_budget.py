"""Prompt token counts at the ingress (tokenizers + the chat template in jinja2, no torch)
equal the engine's (a transformers tokenizer and apply_chat_template), and the ingress
refuses with TGI's messages only what the engine would refuse."""

import pytest

from deployments.errors import TGIError
from deployments.prompt_tokens import PromptTokens
from deployments.token_budget import Prompt, check_prompts, prompts_of
from deployments.tokenizer_files import read_tokenizer_files
from engine.validation import Limits
from serve_app.config import ModelConfig

LIMITS = Limits(max_concurrent_requests=128, max_input_tokens=64, max_total_tokens=128,
                max_stop_sequences=4, max_client_batch_size=4, max_best_of=2,
                max_top_n_tokens=5)  # fmt: skip
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye ünïcødé 😀"}],
    [{"role": "user", "content": ""}],
]  # fmt: skip
TEXTS = ["Hello world", "  leading spaces", "ünïcødé 😀 and <|im_start|> markers", "x" * 3000]


@pytest.fixture(scope="module")
def tokens(default_model_dir) -> PromptTokens:
    cfg = ModelConfig(name="m", model_id=str(default_model_dir))
    return PromptTokens.from_files(read_tokenizer_files(cfg))


@pytest.fixture(scope="module")
def engine_tokenizer(default_model_dir):
    from transformers import AutoTokenizer  # what the engine uses

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_plain_text_counts_equal_the_engines(tokens, engine_tokenizer):
    for text in TEXTS:
        assert tokens.count(text) == len(engine_tokenizer.encode(text)), text


def test_chat_prompts_and_counts_equal_the_engines(tokens, engine_tokenizer):
    for chat in CHATS:
        expected = engine_tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                        tokenize=False)  # fmt: skip
        assert tokens.chat_prompt(chat) == expected
        assert tokens.count(expected) == len(
            engine_tokenizer.encode(expected, add_special_tokens=False)
        )


def test_the_prompts_of_each_route(tokens):
    assert prompts_of("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 5,
                      "truncate": 3}}, tokens) == [Prompt("Hi", 5, 3)]  # fmt: skip
    assert prompts_of("/", {"inputs": "Hi"}, tokens) == [Prompt("Hi", None)]
    assert prompts_of("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, tokens) == [
        Prompt("a", 2), Prompt("b", 2)]  # fmt: skip
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "image_url"},
             {"type": "text", "text": " of France?"}]  # fmt: skip
    (chat,) = prompts_of("/v1/chat/completions", {"messages": [{"role": "user",
                         "content": parts}]}, tokens)  # fmt: skip
    assert chat.text == tokens.chat_prompt(CHATS[0])


@pytest.mark.parametrize(
    ("path", "body"),
    [("/generate", {"inputs": 5}), ("/generate", {"inputs": "Hi", "parameters": "x"}),
     ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": -1}}),
     ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": True}}),
     ("/generate", {"inputs": "Hi", "parameters": {"truncate": 1.5}}),
     ("/v1/completions", {"prompt": [1, 2]}),
     ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}),
     ("/v1/chat/completions", {"messages": []}),
     ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}),
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                          "text": 5}]}]})],
)  # fmt: skip
def test_bodies_the_engine_must_judge_are_not_checked_here(tokens, path, body):
    assert prompts_of(path, body, tokens) is None


def test_tgis_messages_and_only_sure_refusals(tokens):
    long_text = " ".join(["one"] * 65)
    with pytest.raises(TGIError) as error:
        check_prompts([Prompt(long_text, 1)], tokens, LIMITS)
    assert (error.value.status_code, error.value.message) == (
        422,
        "Input validation error: `inputs` must have less than 64 tokens. Given: 65",
    )
    with pytest.raises(TGIError) as error:
        check_prompts([Prompt("Hi", 200)], tokens, LIMITS)
    assert error.value.message == ("Input validation error: `inputs` tokens + `max_new_tokens` "
                                   "must be <= 128. Given: 1 `inputs` tokens and 200 "
                                   "`max_new_tokens`")  # fmt: skip
    # Accepted here (the engine decides): at the limits, truncated, empty, a bad truncate.
    check_prompts([Prompt(" ".join(["one"] * 64), None)], tokens, LIMITS)
    check_prompts([Prompt("Hi", 127)], tokens, LIMITS)
    check_prompts([Prompt(long_text, 1, truncate=10)], tokens, LIMITS)
    check_prompts([Prompt("", 1)], tokens, LIMITS)
    check_prompts([Prompt(long_text, 1, truncate=100)], tokens, LIMITS)
