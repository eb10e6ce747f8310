"""Prefix cache on the real model: prompts that hit cached blocks, ending exactly on, just
after and just before a block boundary, generate what HF transformers generates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

pytestmark = pytest.mark.slow

BLOCK_SIZE = 4
MAX_NEW_TOKENS = 12
TEXT = ("You are a helpful assistant. Answer briefly and precisely, in plain English, and "
        "never make things up. Question: what is the tallest mountain in Europe?")  # fmt: skip


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def run(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    out = {name: [] for name in prompts}
    for name, prompt in prompts.items():
        engine.add_request(name, prompt, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    while engine.has_unfinished_requests():
        for step in engine.step():
            out[step.request_id].append(step.token_id)
    return out


def test_prefix_hits_at_block_boundaries_match_hf(default_model_dir):
    ids = AutoTokenizer.from_pretrained(default_model_dir)(TEXT)["input_ids"]
    shared = ids[:12]  # three full blocks
    # 12 + s tokens: s = 0, 4, 5, 7 -> length % 4 in {0, 0, 1, 3}
    prompts = {f"s{s}": shared + ids[12 : 12 + s] for s in (0, 4, 5, 7)}
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = {name: hf_greedy(model, p) for name, p in prompts.items()}

    config = EngineConfig(model_dir=str(default_model_dir), block_size=BLOCK_SIZE,
                          max_batch_total_tokens=512)  # fmt: skip
    engine = LLMEngine(config)
    assert run(engine, {"warm": ids[:20]}) is not None  # computes and registers the prefix
    assert engine.stats().num_prefix_hits == 0
    assert run(engine, prompts) == expected
    # Each prompt hits every full block the warm-up computed, except its own last token's:
    # s0 2 blocks (12 tokens, the last one is always computed), s4 3, s5 and s7 4.
    assert engine.stats().num_prefix_hits == 2 + 3 + 4 + 4
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # shared blocks freed once each


@pytest.mark.parametrize("prefill_budget", [5, 6, 8])
def test_chunked_prefill_with_prefix_hits_matches_hf(default_model_dir, prefill_budget):
    """Prompts read in chunks of 5, 6 or 8 tokens (across, before and on block boundaries),
    some starting from a cached prefix, while others decode: still HF's tokens."""
    ids = AutoTokenizer.from_pretrained(default_model_dir)(TEXT)["input_ids"]
    prompts = {f"s{s}": ids[: 12 + s] for s in (0, 4, 5, 7)}
    prompts["long"] = ids  # longer than any budget: several chunks
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = {name: hf_greedy(model, p) for name, p in prompts.items()}

    config = EngineConfig(model_dir=str(default_model_dir), block_size=BLOCK_SIZE,
                          max_batch_total_tokens=512, max_batch_prefill_tokens=prefill_budget,
                          waiting_served_ratio=0.0)  # fmt: skip
    engine = LLMEngine(config)
    run(engine, {"warm": ids[:13]})  # caches the first three blocks
    assert run(engine, prompts) == expected
    assert engine.stats().num_prefix_hits > 0
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
