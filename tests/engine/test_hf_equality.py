"""The engine's greedy output is token-identical to transformers' `generate` (real model).

Requests arrive while others are decoding, and a second run squeezes the KV cache so that
sequences are preempted and recomputed; both must match HF run one prompt at a time (fp32,
CPU). On a machine with a CUDA GPU the same staggered run on the GPU (CUDA graphs, Triton
kernels, decode ahead) must match HF on that GPU in fp32, token for token over 32 new tokens.
"""

from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three primary colors."}],
    [
        {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
        {"role": "user", "content": "Why is the sky blue? Explain it to a ten year old child."},
    ],
    [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant. How can I help?"},
        {"role": "user", "content": "Tell me a fun fact about octopuses."},
    ],
]
TEXTS = [
    "Hello",
    "The quick brown fox",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village nestled between rolling hills and a quiet river, "
    "there lived an old clockmaker named Elias. Every morning he opened the shutters of his "
    "tiny shop, wound each of the hundred clocks on its walls, and listened to them tick in "
    "unison. The villagers said his clocks never lost a second, and travellers came from far "
    "away to buy them. One winter evening, a stranger in a long grey coat knocked on the door",
]


@pytest.fixture(scope="module")
def prompts(default_model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chats = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False)
             for c in CHATS]  # fmt: skip
    texts = [tokenizer(t)["input_ids"] for t in TEXTS]
    # Interleave so that long and short prompts arrive mixed.
    mixed = [p for pair in zip(chats, texts, strict=True) for p in pair]
    assert len({len(p) for p in mixed}) == len(mixed), "prompt lengths should all differ"
    return mixed


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_new_tokens(i: int) -> int:
    return 24 + (5 * i) % 9


def hf_greedy(
    model_dir, prompts: list[list[int]], num_new: Callable[[int], int],
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> tuple[list[list[int]], frozenset[int]]:  # fmt: skip
    """HF `generate`, one prompt at a time: each prompt's new tokens, and the EOS ids."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    outputs = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            input_ids = torch.tensor([prompt], device=device)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_new(i),
                do_sample=False,
                pad_token_id=min(eos_ids),
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs, eos_ids


@pytest.fixture(scope="module")
def hf_outputs(default_model_dir, prompts) -> tuple[list[list[int]], frozenset[int]]:
    return hf_greedy(default_model_dir, prompts, max_new_tokens)


def run_staggered(
    engine: LLMEngine, prompts: list[list[int]], eos_ids,
    num_new: Callable[[int], int] = max_new_tokens,
) -> dict[str, list[int]]:  # fmt: skip
    """Submit 4 requests, then one more every 3 steps while those decode; run to the end."""
    generated: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))

    def submit() -> None:
        i, prompt = pending.pop(0)
        params = SamplingParams(max_new_tokens=num_new(i), eos_token_ids=eos_ids)
        engine.add_request(f"req{i}", prompt, params)
        generated[f"req{i}"] = []

    for _ in range(4):
        submit()
    num_steps = 0
    while engine.has_unfinished_requests() or pending:
        if pending and num_steps >= 2 and num_steps % 3 == 0:
            submit()
        for token in engine.step():
            generated[token.request_id].append(token.token_id)
            done = len(generated[token.request_id]) == num_new(int(token.request_id[3:]))
            assert (token.finish_reason is not None) == (done or token.token_id in eos_ids)
        num_steps += 1
    return generated


def assert_matches_hf(generated, hf_outputs, engine: LLMEngine) -> None:
    expected, _ = hf_outputs
    for i, tokens in enumerate(expected):
        assert generated[f"req{i}"] == tokens, f"request {i} differs from HF"
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert (stats.num_waiting, stats.num_running, stats.num_batch_tokens) == (0, 0, 0)


def test_staggered_batch_matches_hf(default_model_dir, prompts, hf_outputs):
    config = EngineConfig(model_dir=str(default_model_dir), max_batch_prefill_tokens=256)
    engine = LLMEngine(config)
    generated = run_staggered(engine, prompts, hf_outputs[1])
    assert_matches_hf(generated, hf_outputs, engine)
    assert (
        AutoTokenizer.from_pretrained(default_model_dir)
        .decode(generated["req0"])
        .startswith("The capital of France is Paris.")
    )


def test_preemption_under_a_small_cache_matches_hf(
    default_model_dir, prompts, hf_outputs, record_preemptions
):
    longest = max(len(p) + max_new_tokens(i) for i, p in enumerate(prompts))
    config = EngineConfig(
        model_dir=str(default_model_dir), max_batch_total_tokens=longest + 16, block_size=8
    )
    engine = LLMEngine(config)
    num_preemptions = record_preemptions(engine)
    generated = run_staggered(engine, prompts, hf_outputs[1])
    assert num_preemptions, "the cache was meant to be too small to avoid preemption"
    assert_matches_hf(generated, hf_outputs, engine)


@cuda
def test_on_cuda_matches_hf_on_the_same_gpu(default_model_dir, prompts):
    # fp32: in bf16 two correct implementations part at near-tied logits. On an H200 the
    # first prompt's first token already flips ("The capital..." vs "L'Etoile, ..."), and
    # which way depends on the rounding of any one elementwise op (docs/benchmarks.md).
    def num_new(i: int) -> int:
        return 32

    expected = hf_greedy(default_model_dir, prompts, num_new, torch.float32, "cuda")
    config = EngineConfig(model_dir=str(default_model_dir), dtype="float32", device="cuda",
                          max_batch_prefill_tokens=256)  # fmt: skip
    engine = LLMEngine(config)
    generated = run_staggered(engine, prompts, expected[1], num_new)
    assert_matches_hf(generated, expected, engine)
