"""Preemption under a KV cache of a few blocks: 32 concurrent requests all complete, with the
same greedy tokens as a run whose cache holds them all at once."""

import pytest
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 8
WORDS = [
    "river", "mountain", "city", "music", "history", "water", "light", "school", "family",
    "government", "north", "season", "number", "house", "early", "film", "game", "team", "war",
    "second",
]  # fmt: skip


def run_all(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    out = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    for _ in range(10_000):  # bounded: preemption must not loop forever
        if not engine.has_unfinished_requests():
            break
        for step in engine.step():
            out[step.request_id].append(step.token_id)
    assert not engine.has_unfinished_requests()
    return out


def test_32_requests_on_a_few_blocks_match_an_unconstrained_run(
    default_model_dir, record_preemptions
):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9))
             for i in range(32)]  # fmt: skip
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    longest = max(len(p) for p in prompts) + MAX_NEW_TOKENS

    roomy = LLMEngine(EngineConfig(model_dir=str(default_model_dir), block_size=4,
                                   max_batch_total_tokens=4096))  # fmt: skip
    expected = run_all(roomy, prompts)

    # Room for about three requests at a time: the rest wait or get preempted.
    tight = LLMEngine(EngineConfig(model_dir=str(default_model_dir), block_size=4,
                                   max_batch_total_tokens=3 * longest,
                                   enable_prefix_caching=False))  # fmt: skip
    preempted = record_preemptions(tight)
    assert run_all(tight, prompts) == expected
    assert preempted, "the cache was meant to be too small to avoid preemption"
    stats = tight.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert all(len(tokens) >= 1 for tokens in expected.values())
