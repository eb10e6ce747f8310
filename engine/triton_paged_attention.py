"""Decode attention that reads the paged KV cache in place (Triton, CUDA only).

One program per (sequence, KV head, split) walks its share of the sequence's block table,
loads each cached key and value once, and attends to it with every query head of its GQA
group, keeping a running (online) softmax: no gathered copy of the context, no padding to the
longest sequence, and fixed tensor shapes per batch size, so the step can be captured in a
CUDA graph.

Small batches split each context (flash-decoding): with one program per (sequence, KV head),
a batch-1 step of an 8-KV-head model would run 8 programs on a GPU of 132 SMs, each walking
its whole context alone. Each split then leaves its unnormalised sum, running max and
denominator, and a second kernel weighs the splits together. The number of splits depends on
the batch size only (a captured graph replays it for any context length); each split takes
an equal share of the context's tiles, computed in the kernel.

Imported only on CUDA (engine/attention.py); CPU uses the SDPA path.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_SPLITS = 16
TOKENS_PER_TILE = 64  # context tokens handled per loop iteration


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [b, num_heads, head_dim]; written when NUM_SPLITS == 1
    split_sum_ptr,  # [b, NUM_SPLITS, num_heads, head_dim] fp32: each split's unnormalised sum
    split_stats_ptr,  # [b, NUM_SPLITS, num_heads, 2] fp32: each split's max and denominator
    q_ptr,  # [b, num_heads, head_dim], rows q_row_stride apart (a view into the qkv output)
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # same as k_cache
    block_tables_ptr,  # [b, max_blocks] int32
    context_lens_ptr,  # [b] int32
    scale,
    max_blocks,
    q_row_stride,
    num_heads: tl.constexpr,
    num_kv_heads: tl.constexpr,
    head_dim: tl.constexpr,
    block_size: tl.constexpr,
    group_pad: tl.constexpr,  # query heads per KV head, padded to a tl.dot-friendly size
    tokens_per_tile: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = num_heads // num_kv_heads
    heads = kv_head * group + tl.arange(0, group_pad)  # [G]
    head_ok = tl.arange(0, group_pad) < group
    dims = tl.arange(0, head_dim)  # [D]
    q = tl.load(q_ptr + seq.to(tl.int64) * q_row_stride + heads[:, None] * head_dim + dims[None, :],
                mask=head_ok[:, None], other=0.0)  # fmt: skip  # [G, D]
    context_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, tokens_per_tile), NUM_SPLITS)
    first = split * tiles_per_split * tokens_per_tile  # split 0 always has the first tile
    last = tl.minimum(first + tiles_per_split * tokens_per_tile, context_len)
    m = tl.full([group_pad], float("-inf"), tl.float32)  # running max per head
    denom = tl.zeros([group_pad], tl.float32)  # running softmax denominator
    acc = tl.zeros([group_pad, head_dim], tl.float32)  # running weighted sum of values
    token_stride = num_kv_heads * head_dim
    for start in range(first, last, tokens_per_tile):
        tokens = start + tl.arange(0, tokens_per_tile)  # [T]
        token_ok = tokens < last
        block_ids = tl.load(block_tables_ptr + seq * max_blocks + tokens // block_size,
                            mask=token_ok, other=0)  # fmt: skip
        slots = block_ids.to(tl.int64) * block_size + tokens % block_size  # [T]
        offsets = slots[:, None] * token_stride + kv_head * head_dim + dims[None, :]  # [T, D]
        k = tl.load(k_cache_ptr + offsets, mask=token_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [G, T]
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])  # [G, T]
        correction = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + offsets, mask=token_ok[:, None], other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        denom = denom * correction + tl.sum(p, axis=1)
        m = m_new
    if NUM_SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(out_ptr + (seq * num_heads + heads)[:, None] * head_dim + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])  # fmt: skip
    else:  # an empty split leaves max -inf, denominator 0: weight 0 in the combine
        rows = (seq * NUM_SPLITS + split) * num_heads + heads  # [G]
        tl.store(split_sum_ptr + rows[:, None] * head_dim + dims[None, :], acc,
                 mask=head_ok[:, None])  # fmt: skip
        tl.store(split_stats_ptr + rows * 2, m, mask=head_ok)
        tl.store(split_stats_ptr + rows * 2 + 1, denom, mask=head_ok)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [b, num_heads, head_dim]
    split_sum_ptr,  # [b, NUM_SPLITS, num_heads, head_dim] fp32
    split_stats_ptr,  # [b, NUM_SPLITS, num_heads, 2] fp32
    num_heads: tl.constexpr,
    head_dim: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    rows = (seq * NUM_SPLITS + tl.arange(0, NUM_SPLITS)) * num_heads + head  # [S]
    dims = tl.arange(0, head_dim)  # [D]
    split_max = tl.load(split_stats_ptr + rows * 2)  # [S]
    split_denom = tl.load(split_stats_ptr + rows * 2 + 1)  # [S]
    weight = tl.exp(split_max - tl.max(split_max, axis=0))  # [S]; split 0 is never empty
    split_sum = tl.load(split_sum_ptr + rows[:, None] * head_dim + dims[None, :])  # [S, D]
    out = tl.sum(split_sum * weight[:, None], axis=0) / tl.sum(split_denom * weight, axis=0)
    tl.store(out_ptr + (seq * num_heads + head) * head_dim + dims,
             out.to(out_ptr.dtype.element_ty))  # fmt: skip


def num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per context: doubled while the programs still fit one wave of the SMs (so with
    8 KV heads on 132 SMs, batch 1 gets 16 and a batch of 9 or more gets 1)."""
    splits = 1
    while splits < MAX_SPLITS and batch * num_kv_heads * splits * 2 <= num_sms:
        splits *= 2
    return splits


@functools.cache
def _num_sms(device_index: int) -> int:
    # Asked once per GPU: eager decode calls the kernel for every layer of every step.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_decode_attention(
    q: torch.Tensor,  # [b, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [b, max_blocks] int32, unused entries any valid block id
    context_lens: torch.Tensor,  # [b] int32, the new token included
    scale: float,
    splits: int | None = None,  # default: num_splits for this batch on this GPU
) -> torch.Tensor:  # [b, num_heads, head_dim]
    """Each sequence's newest token attending to its whole cached context."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if splits is None:
        splits = num_splits(batch, num_kv_heads, _num_sms(q.device.index))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    split_sum = split_stats = out  # unused with one split
    if splits > 1:
        split_sum = q.new_empty((batch, splits, num_heads, head_dim), dtype=torch.float32)
        split_stats = q.new_empty((batch, splits, num_heads, 2), dtype=torch.float32)
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        out, split_sum, split_stats, q, k_cache, v_cache, block_tables, context_lens, scale,
        block_tables.shape[1], q.stride(0),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, group_pad=max(16, triton.next_power_of_2(group)),
        tokens_per_tile=TOKENS_PER_TILE, NUM_SPLITS=splits,
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(batch, num_heads)](
            out, split_sum, split_stats, num_heads=num_heads, head_dim=head_dim, NUM_SPLITS=splits
        )  # fmt: skip
    return out
