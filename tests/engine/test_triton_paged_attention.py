"""The Triton paged decode kernel against the SDPA path it replaces on CUDA (GPU only)."""

import pytest
import torch

from engine.attention import AttentionMetadata, decode_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size=16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    v_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, device="cuda", generator=gen)
    # Blocks handed out in a shuffled order, as a long-running cache would.
    free = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    max_blocks = max(-(-n // block_size) for n in context_lens)
    tables, slots = [], []
    for n in context_lens:
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        seq_slots = [b * block_size + i for b in blocks for i in range(block_size)][:n]
        slots.extend(seq_slots + [0] * (max(context_lens) - n))
    lens = torch.tensor(context_lens, device="cuda")
    arange = torch.arange(max(context_lens), device="cuda")
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.zeros(len(context_lens), dtype=torch.long, device="cuda"),
        context_slots=torch.tensor(slots, device="cuda"),
        context_mask=(arange[None] < lens[:, None])[:, None, None],
    )
    block_tables = torch.tensor(tables, dtype=torch.int32, device="cuda")
    return q.to(dtype), k_cache, v_cache, meta, block_tables, lens.to(torch.int32)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads", [(9, 3, 64), (32, 8, 128), (8, 8, 64)], ids=["smollm2", "llama8b", "mha"]
)
def test_kernel_matches_sdpa_over_gathered_context(dtype, heads):
    from engine.triton_paged_attention import paged_decode_attention

    q, k_cache, v_cache, meta, block_tables, lens = _case([1, 15, 16, 17, 100, 513], *heads, dtype)
    scale = heads[2] ** -0.5
    expected = decode_attention(q, k_cache, v_cache, meta, scale).float()
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale).float()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3  # tl.dot runs tf32 on fp32
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@cuda
@pytest.mark.parametrize("splits", [2, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_contexts_give_the_same_attention(dtype, splits):
    # More splits than a short context has tiles (empty splits), and uneven shares.
    from engine.triton_paged_attention import paged_decode_attention

    q, k_cache, v_cache, meta, block_tables, lens = _case([1, 65, 700, 2049], 32, 8, 128, dtype)
    expected = decode_attention(q, k_cache, v_cache, meta, 128**-0.5).float()
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5, splits)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@cuda
def test_small_batches_split_and_large_ones_do_not():
    from engine.triton_paged_attention import num_splits

    assert [num_splits(b, 8, 132) for b in (1, 2, 4, 8, 9, 64)] == [16, 8, 4, 2, 1, 1]
