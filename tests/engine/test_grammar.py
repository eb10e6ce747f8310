"""Grammar compilation, its cache, the batched token masks and the tool-call text, with the
default model's real tokenizer (no forward pass)."""

import json
import weakref

import pytest
import torch
from transformers import AutoTokenizer

from engine.errors import ValidationError
from engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from engine.grammar_mask import allowed_tokens
from engine.logits_processors import process_logits
from engine.protocol import SamplingParams
from engine.schemas import ChatRequest, GenerateParameters
from engine.sequence import Sequence
from engine.tool_calls import NO_TOOL, CallText, ToolError, plan_tools, tool_call_message
from engine.validation import grammar_spec

VOCAB = 49152
EOS = 2  # <|im_end|>
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {
    "type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, frozenset({EOS}), cache_size=2)


def feed(state, tokenizer, text: str) -> None:
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        state.advance(token_id)


def test_the_byte_level_tokens_of_the_gguf_tokenizer_are_read_as_bytes(compiler, tokenizer):
    # " {" and "\":" are single byte-level tokens ("Ġ{", ...); read literally they would fail.
    state = compiler.compile(GrammarSpec.json_schema(PERSON)).new_state()
    feed(state, tokenizer, '{"name": "Zoë 中文", "age": 30}')
    assert not state.matcher.is_error() and state.matcher.is_accepting()
    assert state.num_tokens == len(tokenizer.encode('{"name": "Zoë 中文", "age": 30}'))


def test_properties_come_in_the_schemas_order_with_compact_separators(compiler, tokenizer):
    for text in ('{"age": 30, "name": "x"}', '{"name":"x","age":30}', '{ "name": "x", "age": 30}'):
        state = compiler.compile(GrammarSpec.json_schema(PERSON)).new_state()
        feed(state, tokenizer, text)
        assert state.matcher.is_error(), text


def test_compiled_once_per_spec_and_the_cache_is_a_bounded_lru(compiler):
    a, b, c = (GrammarSpec.regex(p) for p in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    assert compiler.compile(GrammarSpec.regex("a+")) is first  # equal specs, one entry
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b, the least recently used
    assert (compiler.num_misses, compiler.num_hits) == (3, 2)
    assert compiler.compile(a) is first
    compiler.compile(b)
    assert compiler.num_misses == 4


def test_each_request_gets_its_own_state(compiler, tokenizer):
    compiled = compiler.compile(GrammarSpec.regex("[0-9]{3}"))
    one, two = compiled.new_state(), compiled.new_state()
    feed(one, tokenizer, "12")
    assert one.num_tokens >= 1 and two.num_tokens == 0
    assert not two.matcher.is_accepting()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec.regex("[0-9"), "unclosed character class"),
        (GrammarSpec.json_schema({"type": "foo"}), "foo"),
        (GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}), "format"),
    ],
)
def test_bad_grammars_are_refused_with_the_reason(compiler, spec, message):
    with pytest.raises(GrammarError, match=message):
        compiler.compile(spec)
    assert spec not in compiler._cache


def test_tgi_grammar_shapes_become_specs():
    def spec(grammar: dict) -> GrammarSpec:
        return grammar_spec(GenerateParameters.model_validate({"grammar": grammar}).grammar)

    assert spec({"type": "regex", "value": "a+"}) == GrammarSpec.regex("a+")
    as_object = spec({"type": "json", "value": PERSON})
    assert spec({"type": "json", "value": json.dumps(PERSON)}) == as_object
    assert spec({"type": "json_schema", "value": {"name": "p", "schema": PERSON}}) == as_object
    with pytest.raises(ValidationError, match="grammar is not valid"):
        spec({"type": "json", "value": "{not json"})
    with pytest.raises(ValidationError, match="grammar is not supported"):
        spec({"type": "json", "value": 5})


def test_masks_of_different_grammars_in_one_call(compiler, tokenizer):
    digits = compiler.compile(GrammarSpec.regex("[0-9]+")).new_state()
    done = compiler.compile(GrammarSpec.regex("ok")).new_state()
    feed(done, tokenizer, "ok")
    allowed = allowed_tokens([digits, done], VOCAB, torch.device("cpu"))  # [2, vocab]
    assert allowed.shape == (2, VOCAB)
    texts = [tokenizer.decode([i]) for i in allowed[0].nonzero()[:, 0].tolist()]
    assert texts and all(t.isdigit() for t in texts)  # digits only, and not EOS yet
    assert allowed[1].nonzero()[:, 0].tolist() == [EOS]  # a finished grammar allows only EOS
    assert done.is_finished and not digits.is_finished


def test_a_broken_state_allows_only_eos(compiler, tokenizer):
    state = compiler.compile(GrammarSpec.regex("[0-9]+")).new_state()
    feed(state, tokenizer, "abc")  # not allowed by the grammar: the matcher errs
    allowed = allowed_tokens([state], VOCAB, torch.device("cpu"))
    assert allowed[0].nonzero()[:, 0].tolist() == [EOS]


def test_constrained_and_plain_rows_share_one_batch(compiler):
    compiled = compiler.compile(GrammarSpec.regex("[0-9]+"))
    params = [SamplingParams(max_new_tokens=4, grammar=compiled), SamplingParams(max_new_tokens=4)]
    seqs = [Sequence(f"r{i}", [1, 2, 3], p, block_size=16) for i, p in enumerate(params)]
    logits = torch.randn(2, VOCAB)
    scores = process_logits(logits, seqs)
    assert torch.equal(scores[1], logits[1])  # the plain row is untouched
    kept = scores[0].isfinite()
    assert 0 < int(kept.sum()) < VOCAB
    assert torch.equal(scores[0][kept], logits[0][kept])


def test_finished_sequences_free_their_grammar_state(compiler):
    from engine.config import EngineConfig
    from engine.scheduler import Scheduler

    scheduler = Scheduler(EngineConfig(model_dir="-", max_batch_total_tokens=256))
    seq = Sequence("r", [1, 2], SamplingParams(max_new_tokens=1,
                   grammar=compiler.compile(GrammarSpec.regex("[0-9]"))), 16)  # fmt: skip
    state = weakref.ref(seq.grammar)
    scheduler.add(seq)
    scheduler.abort("r")
    assert seq.grammar is None and state() is None


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {}}}]  # fmt: skip


def chat(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_picks_the_callable_tools():
    named = {"type": "function", "function": {"name": "now"}}
    names = []
    for choice in ("auto", "required", "now", named):
        plan = plan_tools(chat(tools=TOOLS, tool_choice=choice))
        names.append([t.function.name for t in plan.tools])
    assert names == [["get_weather", "now", NO_TOOL], ["get_weather", "now"], ["now"], ["now"]]
    assert plan_tools(chat(tools=TOOLS)).tools[-1].function.name == NO_TOOL  # auto by default
    assert plan_tools(chat(tools=TOOLS, tool_choice="none")) is None
    assert plan_tools(chat()) is None
    with pytest.raises(ToolError, match="Tool with name nope not found"):
        plan_tools(chat(tools=TOOLS, tool_choice="nope"))
    with pytest.raises(ToolError, match="cannot be used together"):
        plan_tools(chat(tools=TOOLS, response_format={"type": "json_object"}))


def test_the_call_schema_accepts_calls_of_the_offered_tools_only(compiler, tokenizer):
    schema = plan_tools(chat(tools=TOOLS, tool_choice="required")).schema
    compiled = compiler.compile(GrammarSpec.json_schema(schema))
    for text, ok in [('{"function": {"_name": "get_weather", "city": "Paris"}}', True),
                     ('{"function": {"_name": "now"}}', True),
                     ('{"function": {"_name": "no_tool"}}', False),
                     ('{"function": {"_name": "now", "city": "Paris"}}', False)]:  # fmt: skip
        state = compiled.new_state()
        feed(state, tokenizer, text)
        assert state.matcher.is_accepting() == ok and state.matcher.is_error() != ok, text


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ('{"function": {"_name": "get_weather", "city": "Paris"}}', "get_weather",
         '{"city": "Paris"}'),
        ('{"function": {"_name": "now"}}', "now", "{}"),
        ('{"function": {"_name": "f", "a": {"b": "}}"}, "c": [1]}}', "f",
         '{"a": {"b": "}}"}, "c": [1]}'),
        ('{"function": {"_name": "f", "a": "cut by leng', "f", '{"a": "cut by leng'),
    ],
)  # fmt: skip
def test_streamed_arguments_add_up_to_the_final_arguments(text, name, arguments):
    message = tool_call_message(text, "call_1")
    assert message["tool_calls"][0]["function"] == {
        "name": name, "arguments": arguments, "description": None}  # fmt: skip
    for step in (1, 2, 3, 7):  # token boundaries anywhere
        call, sent = CallText(), ""
        for start in range(0, len(text), step):
            call.push(text[start : start + step])
            if call.name is not None:
                streamed = call.arguments(final=False)
                assert streamed.startswith(sent)  # never takes back what was sent
                sent = streamed
        assert call.name == name
        assert call.arguments(final=True).startswith(sent)
        assert call.arguments(final=True) == arguments
    assert tool_call_message('{"function": {"_na', "call_1") is None
