import pytest
from transformers import AutoTokenizer

from engine.text import IncrementalDetokenizer, find_stop


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize(
    "text", ["The capital of France is Paris.", "  spaces\n\nand lines", "café 東京 🚀 naïve"]
)
def test_token_texts_add_up_to_the_decoded_text(tokenizer, text):
    prompt_ids = tokenizer.encode("Say:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # half characters wait for their rest


def test_find_stop_sees_a_stop_sequence_across_token_boundaries():
    assert find_stop("The answer is Par", 3, ["Paris"]) is None
    assert find_stop("The answer is Paris", 2, ["Paris"]) == len("The answer is Paris")
    # A stop inside text that arrived earlier does not end the request again.
    assert find_stop("Paris, then more text", 5, ["Paris"]) is None
    assert find_stop("abc. def", 5, [".", "x"]) == 4
