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
