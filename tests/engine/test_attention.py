import pytest
import torch
from torch.nn.attention.bias import CausalBias

from engine.attention import (
    AttentionMetadata,
    decode_attention,
    prefill_attention,
    prefix_causal_mask,
    use_prefill_backends,
)


def naive_causal(q, k, v, scale):  # [n, h, d], [n, kv_h, d] x2 -> [n, h, d]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_packed_prompts_each_attend_causally_to_themselves_alone():
    gen = torch.Generator().manual_seed(0)
    seq_lens, heads, kv_heads, head_dim, scale = [5, 3], 6, 2, 8, 8**-0.5
    n = sum(seq_lens)
    q = torch.randn(n, heads, head_dim, generator=gen)
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    cache = torch.zeros(4, 4, kv_heads, head_dim)  # unused: no cached prefix
    meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.arange(n), seq_lens=seq_lens)
    out = prefill_attention(q, k, v, cache, cache, meta, scale)
    parts = zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True)
    expected = torch.cat([naive_causal(*part, scale) for part in parts])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


DEVICES = [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]  # fmt: skip


@pytest.mark.parametrize(("device", "dtype", "tolerance"), DEVICES)
def test_new_tokens_after_a_cached_prefix_attend_to_it_through_the_cache(device, dtype, tolerance):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, scale = 4, 2, 8, 8**-0.5
    cached, new, other = 6, 3, 4  # sequence 0: a cached prefix; sequence 1 (packed after): none
    full_q = torch.randn(cached + new, heads, head_dim, generator=gen)
    full_k = torch.randn(cached + new, kv_heads, head_dim, generator=gen)
    full_v = torch.randn(cached + new, kv_heads, head_dim, generator=gen)
    q1, k1, v1 = (
        torch.randn(other, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads)
    )
    expected = torch.cat([naive_causal(full_q, full_k, full_v, scale)[cached:],
                          naive_causal(q1, k1, v1, scale)])  # fmt: skip
    # Blocks of 4 slots; sequence 0's whole context (prefix and new K/V) sits in slots 0..8.
    k_cache, v_cache = torch.zeros(2, 4, 4, kv_heads, head_dim)
    k_cache.view(-1, kv_heads, head_dim)[: cached + new] = full_k
    v_cache.view(-1, kv_heads, head_dim)[: cached + new] = full_v
    mask = prefix_causal_mask(cached, new, torch.device(device))
    # CUDA: a lower-right causal bias, so SDPA can run flash attention.
    assert isinstance(mask, CausalBias) == (device == "cuda")
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.arange(new + other),  # not read by the attention itself
        seq_lens=[new, other],
        prefill_context_slots=[torch.arange(cached + new), torch.arange(other)],
        prefill_masks=[mask, None],
    ).to(torch.device(device))
    q = torch.cat([full_q[cached:], q1])
    k, v = torch.cat([full_k[cached:], k1]), torch.cat([full_v[cached:], v1])
    q, k, v, k_cache, v_cache = (t.to(device, dtype) for t in (q, k, v, k_cache, v_cache))
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(out.float().cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_attends_over_each_context_through_the_cache(dtype):
    # Two sequences of 5 and 3 tokens, blocks of 4 slots, the shorter padded with slot 0;
    # bf16 caches are attended in fp32 (SDPA's bf16 kernel is slow for one query row).
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, scale = 6, 2, 8, 8**-0.5
    k_cache, v_cache = torch.randn(2, 3, 4, kv_heads, head_dim, generator=gen)
    slots = [[8, 9, 10, 11, 0], [4, 5, 6]]  # blocks 2 and 0; block 1
    q = torch.randn(2, heads, head_dim, generator=gen)
    group = heads // kv_heads
    expected = []
    for i, seq_slots in enumerate(slots):
        k, v = (c.view(-1, kv_heads, head_dim)[seq_slots].repeat_interleave(group, 1)
                for c in (k_cache, v_cache))  # fmt: skip
        scores = torch.einsum("hd,khd->hk", q[i], k) * scale
        expected.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    lens = torch.tensor([5, 3])
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.zeros(2, dtype=torch.long),
        context_slots=torch.tensor(slots[0] + slots[1] + [0, 0]),
        context_mask=(torch.arange(5)[None] < lens[:, None])[:, None, None],
    )
    out = decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta, scale)
    assert out.dtype == dtype and out.shape == (2, heads, head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), torch.stack(expected), atol=tolerance, rtol=tolerance)


def test_prefill_backends_leave_out_cudnn_alone():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        use_prefill_backends()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
