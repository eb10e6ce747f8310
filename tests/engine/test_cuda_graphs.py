"""Decode through CUDA graphs gives the tokens eager decode gives (GPU only), as the batch
shrinks through the captured buckets and above them (eager there)."""

import pytest
import torch

from benchmarks.gpu_engine import random_model_dir
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                  rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=512)  # fmt: skip


def _greedy_tokens(model_dir, cuda_graphs: tuple[int, ...], num_requests: int) -> dict:
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), dtype="float32", device="cuda",
                                    cuda_graphs=cuda_graphs))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for i in range(num_requests):  # different prompt lengths, so contexts differ per row
        prompt = torch.randint(3, 500, (5 + 7 * i,), generator=gen).tolist()
        # Requests end one after another, so the batch shrinks step by step from 11 to 1.
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=4 + 2 * i))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(num_requests)}
    while engine.has_unfinished_requests():
        for step in engine.step():
            tokens[step.request_id].append(step.token_id)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return tokens


@cuda
def test_graphs_match_eager_through_the_buckets(tmp_path):
    model_dir, _ = random_model_dir(TINY_LLAMA, tmp_path / "tiny", torch.float32)
    eager = _greedy_tokens(model_dir, (), num_requests=11)
    graphs = _greedy_tokens(model_dir, (1, 2, 4), num_requests=11)  # batches 5..11 eager
    assert graphs == eager
    assert [len(eager[str(i)]) for i in range(11)] == [4 + 2 * i for i in range(11)]


def _staggered_tokens(model_dir, decode_ahead: bool, eos_ids: frozenset[int]):
    """8 requests, one joining every 9 steps, request 1 aborted at step 30: (tokens by
    request, the engine)."""
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", device="cuda",
                          cuda_graphs=(1, 2, 4, 8), decode_ahead=decode_ahead)  # fmt: skip
    engine = LLMEngine(config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (3 + 5 * i,), generator=gen).tolist() for i in range(8)]
    tokens: dict[str, list[int]] = {}
    for step in range(400):
        if step % 9 == 0 and (i := step // 9) < len(prompts):
            params = SamplingParams(max_new_tokens=20 + 3 * i, eos_token_ids=eos_ids)
            engine.add_request(str(i), prompts[i], params)
            tokens[str(i)] = []
        if step == 30:
            engine.abort_request("1")
        for token in engine.step():
            tokens[token.request_id].append(token.token_id)
        if len(tokens) == len(prompts) and not engine.has_unfinished_requests():
            break
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return tokens, engine


@cuda
def test_decode_ahead_gives_the_tokens_of_one_step_at_a_time(tmp_path):
    model_dir, _ = random_model_dir(TINY_LLAMA, tmp_path / "tiny", torch.float32)
    plain, _ = _staggered_tokens(model_dir, decode_ahead=False, eos_ids=frozenset())
    # A token request 2 generates early, made EOS: requests end where no length predicts.
    eos_ids = frozenset({plain["2"][6]})
    expected, one_at_a_time = _staggered_tokens(model_dir, False, eos_ids)
    got, ahead = _staggered_tokens(model_dir, True, eos_ids)
    assert got == expected
    assert len(expected["2"]) <= 7 and len(expected["1"]) < 23  # EOS, and the abort
    assert one_at_a_time.model_runner.num_steps_run_ahead == 0
    assert ahead.model_runner.num_steps_ahead_taken > 0


@cuda
def test_a_lone_request_decodes_ahead_at_every_step(tmp_path):
    model_dir, _ = random_model_dir(TINY_LLAMA, tmp_path / "tiny", torch.float32)

    def generate(decode_ahead: bool) -> tuple[list[int], LLMEngine]:
        config = EngineConfig(model_dir=str(model_dir), dtype="float32", device="cuda",
                              cuda_graphs=(1, 2), decode_ahead=decode_ahead)  # fmt: skip
        engine = LLMEngine(config)
        engine.add_request("r", list(range(3, 40)), SamplingParams(max_new_tokens=64))
        tokens = [token.token_id for _ in range(80) for token in engine.step()]
        assert not engine.has_unfinished_requests()
        return tokens, engine

    expected, _ = generate(decode_ahead=False)
    tokens, engine = generate(decode_ahead=True)
    assert tokens == expected and len(tokens) == 64
    # The first decode runs alone; each one after it was launched by the one before,
    # through block boundaries (every 16 tokens) too.
    assert engine.model_runner.num_steps_ahead_taken == 64 - 2


def _chunked_prefix_tokens(model_dir, graphed_prefill: bool):
    """6 requests behind one 37-token system prompt (prefix cache hits after the first), one
    joining every 5 steps, prefilled in chunks of at most 48 tokens: (token ids and logprobs
    by request, the engine)."""
    config = EngineConfig(model_dir=str(model_dir), dtype="float32", device="cuda",
                          cuda_graphs=(1, 2, 4, 8, 16, 32, 64),
                          max_batch_prefill_tokens=48)  # fmt: skip
    engine = LLMEngine(config)
    if not graphed_prefill:
        engine.model_runner.max_graphed_prefill_tokens = 0
    gen = torch.Generator().manual_seed(2)
    system = torch.randint(3, 500, (37,), generator=gen).tolist()
    prompts = [system + torch.randint(3, 500, (3 + 9 * i,), generator=gen).tolist()
               for i in range(6)]  # fmt: skip
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    for step in range(300):
        if step % 5 == 0 and (i := step // 5) < len(prompts):
            engine.add_request(str(i), prompts[i], SamplingParams(max_new_tokens=8))
            tokens[str(i)], logprobs[str(i)] = [], []
        for token in engine.step():
            tokens[token.request_id].append(token.token_id)
            logprobs[token.request_id].append(token.logprob)
        if len(tokens) == len(prompts) and not engine.has_unfinished_requests():
            break
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return tokens, logprobs, engine


@cuda
def test_short_prefills_through_the_graphs_match_eager_prefill(tmp_path):
    model_dir, _ = random_model_dir(TINY_LLAMA, tmp_path / "tiny", torch.float32)
    expected, expected_logprobs, eager = _chunked_prefix_tokens(model_dir, graphed_prefill=False)
    got, got_logprobs, graphed = _chunked_prefix_tokens(model_dir, graphed_prefill=True)
    assert got == expected and all(len(t) == 8 for t in got.values())
    # First tokens' logprobs differ a little: the decode kernel's fp32 dots run in TF32.
    for request_id, logprobs in got_logprobs.items():
        torch.testing.assert_close(logprobs, expected_logprobs[request_id], atol=2e-3, rtol=0)
    assert eager.model_runner.num_prefills_graphed == 0
    assert graphed.model_runner.num_prefills_graphed >= len(expected)  # every prompt's last chunk
    assert graphed.scheduler.block_manager.num_prefix_hits > 0
