"""Prompt logprobs and penalties through the whole engine, against transformers (real model, fp32).

Prefill logprobs must be the raw model's, come once (on the request's first step) and only for
requests that ask; a request preempted and recomputed must neither repeat them nor change its
tokens.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams, TokenStep

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog because",
    "def add(a, b):\n    return",
    "Paris is the capital of",
]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Submit all requests, run to the end: every TokenStep, by request id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    steps: dict[str, list[TokenStep]] = {request_id: [] for request_id in requests}
    while engine.has_unfinished_requests():
        for step in engine.step():
            steps[step.request_id].append(step)
    return steps


def test_prefill_logprobs_are_the_models_and_only_for_requests_that_ask(
    default_model_dir, prompts, hf_model
):
    asks = SamplingParams(max_new_tokens=3, prefill_logprobs=True)
    requests = {
        "a": (prompts[0], asks),
        "b": (prompts[1], SamplingParams(max_new_tokens=3)),
        "c": (prompts[2], asks),
    }
    engine = LLMEngine(EngineConfig(model_dir=str(default_model_dir)))
    steps = run(engine, requests)

    for request_id in ("a", "c"):
        prompt = requests[request_id][0]
        first, *rest = steps[request_id]
        assert first.prefill_logprobs is not None
        assert len(first.prefill_logprobs) == len(prompt) and first.prefill_logprobs[0] is None
        with torch.inference_mode():
            logits = hf_model(torch.tensor([prompt])).logits[0].float()  # [n, vocab]
        expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None])
        torch.testing.assert_close(
            torch.tensor(first.prefill_logprobs[1:]), expected[:, 0], atol=1e-4, rtol=1e-4
        )
        assert all(step.prefill_logprobs is None for step in rest)
    assert all(step.prefill_logprobs is None for step in steps["b"])


def test_preempted_requests_keep_their_tokens_and_get_prefill_logprobs_once(
    default_model_dir, prompts, hf_model, record_preemptions
):
    # Greedy with a repetition penalty, as transformers' generate applies it.
    params = SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.3, prefill_logprobs=True
    )
    requests = {f"r{i}": (prompt, params) for i, prompt in enumerate(prompts)}
    expected = {}
    with torch.inference_mode():
        for request_id, (prompt, _) in requests.items():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                repetition_penalty=1.3,
                eos_token_id=None,
                pad_token_id=0,
            )
            expected[request_id] = out[0, len(prompt) :].tolist()

    longest = max(len(prompt) for prompt in prompts) + MAX_NEW_TOKENS
    config = EngineConfig(
        model_dir=str(default_model_dir), max_batch_total_tokens=longest + 8, block_size=4
    )
    engine = LLMEngine(config)
    preempted = record_preemptions(engine)
    steps = run(engine, requests)

    assert preempted, "the cache was meant to be too small to avoid preemption"
    for request_id, request_steps in steps.items():
        assert [step.token_id for step in request_steps] == expected[request_id]
        with_prefill = [step for step in request_steps if step.prefill_logprobs is not None]
        assert with_prefill == request_steps[:1]
