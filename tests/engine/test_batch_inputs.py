"""A prefill laid out as decode rows (how the CUDA graphs run short prefills) computes what
the packed prefill computes, cached prefix and chunking included. CPU: the decode rows read
gathered contexts here, the GPU's paged kernel is checked against eager prefill in
test_cuda_graphs.py."""

import torch
from transformers import AutoConfig

from benchmarks.gpu_engine import random_model_dir
from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.protocol import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                  tie_word_embeddings=False, max_position_embeddings=128)  # fmt: skip


def _sequence(request_id: str, num_tokens: int, first_block: int) -> Sequence:
    gen = torch.Generator().manual_seed(num_tokens)
    prompt = torch.randint(3, 300, (num_tokens,), generator=gen).tolist()
    seq = Sequence(request_id, prompt, SamplingParams(max_new_tokens=4), BLOCK_SIZE)
    seq.block_table = list(range(first_block, first_block + -(-num_tokens // BLOCK_SIZE)))
    return seq


def test_prefill_rows_match_the_packed_prefill(tmp_path):
    model_dir, _ = random_model_dir(TINY_LLAMA, tmp_path / "tiny", torch.float32)
    config = EngineConfig(model_dir=str(model_dir), device="cpu", block_size=BLOCK_SIZE,
                          max_batch_total_tokens=64)  # fmt: skip
    runner = ModelRunner(config, AutoConfig.from_pretrained(model_dir))
    cached = _sequence("cached", 11, first_block=0)  # blocks 0-2
    cached.prefill_chunk = 5  # its first chunk: 5 of 11 tokens
    runner.forward(*runner.inputs.prepare_prefill([cached]))  # now those 5 are in the cache
    cached.num_cached_tokens, cached.prefill_chunk = 5, 6
    fresh = _sequence("fresh", 7, first_block=3)  # blocks 3-4, no prefix
    fresh.prefill_chunk = 4  # a first chunk, packed after the other's last
    seqs = [cached, fresh]

    input_ids, positions, meta = runner.inputs.prepare_prefill(seqs)
    packed = runner.forward(input_ids, positions, meta)  # [10, hidden]
    row_ids, row_positions, row_meta = runner.inputs.prepare_prefill_rows(seqs)
    assert torch.equal(row_ids, input_ids) and torch.equal(row_positions, positions)
    assert torch.equal(row_meta.slot_mapping, meta.slot_mapping)
    assert not row_meta.is_prefill
    rows = runner.forward(row_ids, row_positions, row_meta)
    torch.testing.assert_close(rows, packed, atol=1e-5, rtol=1e-5)
    # Against nothing cached at all: the cached sequence's prefix K/V were read, not ignored.
    alone = _sequence("cached", 11, first_block=5)
    alone.prefill_chunk = 11
    whole = runner.forward(*runner.inputs.prepare_prefill([alone]))
    torch.testing.assert_close(rows[:6], whole[5:], atol=1e-5, rtol=1e-5)
