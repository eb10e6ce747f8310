"""Constrained and plain requests in one batch of the real engine core (real model, greedy):
the plain ones generate exactly what they generate alone, the constrained ones always match,
and preemption by recompute changes nothing, leaking no KV block and no grammar state."""

import gc
import json
import re
import weakref

import pytest
from jsonschema import Draft202012Validator
from transformers import AutoTokenizer

from benchmarks.grammar_cases import JSON_CASES, REGEX_CASES
from engine.config import EngineConfig
from engine.grammar import GrammarCompiler, GrammarSpec, GrammarState
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 48
PLAIN_QUESTIONS = ["What is the capital of France?", "Tell me a story about a dragon.",
                   "Name three fruits.", "How are you today?"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, 49152, frozenset({2}))


def prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Add every request at once and step to the end; each request's token ids."""
    out: dict[str, list[int]] = {request_id: [] for request_id in requests}
    for request_id, (prompt_ids, params) in requests.items():
        engine.add_request(request_id, prompt_ids, params)
    for _ in range(10_000):  # bounded: preemption must not loop forever
        if not engine.has_unfinished_requests():
            break
        for step in engine.step():
            out[step.request_id].append(step.token_id)
    assert not engine.has_unfinished_requests()
    return out


def constrained_requests(tokenizer, compiler) -> dict:
    """Four JSON schemas and two regexes, each its own grammar."""
    cases = [(q, GrammarSpec.json_schema(s), s) for q, s in JSON_CASES[11:15]]
    cases += [(q, GrammarSpec.regex(r), r) for q, r in REGEX_CASES[:2]]
    return {
        f"c{i}": (prompt(tokenizer, q), SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=frozenset({2}),
            grammar=compiler.compile(spec)), check)
        for i, (q, spec, check) in enumerate(cases)
    }  # fmt: skip


def assert_matches(tokenizer, tokens: list[int], check: dict | str) -> None:
    assert tokens[-1] == 2, "ended by the grammar's EOS, not by max_new_tokens"
    text = tokenizer.decode(tokens[:-1])
    if isinstance(check, str):
        assert re.fullmatch(check, text), text
    else:
        assert not list(Draft202012Validator(check).iter_errors(json.loads(text))), text


def test_plain_rows_are_unchanged_and_constrained_rows_match(
    tokenizer, compiler, default_model_dir
):
    config = EngineConfig(model_dir=str(default_model_dir), max_batch_total_tokens=8192)
    engine = LLMEngine(config)
    plain = {f"p{i}": (prompt(tokenizer, q), SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=frozenset({2})))
        for i, q in enumerate(PLAIN_QUESTIONS)}  # fmt: skip
    alone = run(engine, plain)
    constrained = constrained_requests(tokenizer, compiler)
    mixed = run(engine, {**plain, **{k: v[:2] for k, v in constrained.items()}})
    for request_id in plain:
        assert mixed[request_id] == alone[request_id]
    for request_id, (_, _, check) in constrained.items():
        assert_matches(tokenizer, mixed[request_id], check)
    assert "The capital of France is Paris" in tokenizer.decode(alone["p0"])


def test_preemption_by_recompute_keeps_grammar_state_and_frees_it(
    tokenizer, compiler, default_model_dir, record_preemptions
):
    requests = {k: v[:2] for k, v in constrained_requests(tokenizer, compiler).items()}
    checks = {k: v[2] for k, v in constrained_requests(tokenizer, compiler).items()}
    roomy = LLMEngine(EngineConfig(model_dir=str(default_model_dir), block_size=4,
                                   max_batch_total_tokens=4096))  # fmt: skip
    expected = run(roomy, requests)
    longest = max(len(p) for p, _ in requests.values()) + MAX_NEW_TOKENS
    tight = LLMEngine(EngineConfig(model_dir=str(default_model_dir), block_size=4,
                                   max_batch_total_tokens=2 * longest,
                                   enable_prefix_caching=False))  # fmt: skip
    preempted = record_preemptions(tight)
    states: list[weakref.ref] = []
    add = tight.add_request

    def add_and_watch(request_id, prompt_ids, params):
        add(request_id, prompt_ids, params)
        seq = tight.scheduler._seqs[request_id]
        assert isinstance(seq.grammar, GrammarState)
        states.append(weakref.ref(seq.grammar))

    tight.add_request = add_and_watch
    assert run(tight, requests) == expected
    assert preempted, "the cache was meant to be too small to avoid preemption"
    for request_id, tokens in expected.items():
        assert_matches(tokenizer, tokens, checks[request_id])
    stats = tight.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    gc.collect()
    assert len(states) == len(requests) and all(state() is None for state in states)
