"""Decode attention that reads the paged KV cache in place (Triton, CUDA only).

One program per (sequence, KV head) walks the sequence's block table, loads each cached key
and value once, and attends to it with every query head of its GQA group, keeping a running
(online) softmax: no gathered copy of the context, no padding to the longest sequence, and
fixed tensor shapes per batch size, so the step can be captured in a CUDA graph.

Imported only on CUDA (engine/attention.py); CPU uses the SDPA path.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [b, num_heads, head_dim]
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
    tokens_per_tile: tl.constexpr,  # context tokens handled per loop iteration
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = num_heads // num_kv_heads
    heads = kv_head * group + tl.arange(0, group_pad)  # [G]
    head_ok = tl.arange(0, group_pad) < group
    dims = tl.arange(0, head_dim)  # [D]
    q = tl.load(q_ptr + seq.to(tl.int64) * q_row_stride + heads[:, None] * head_dim + dims[None, :],
                mask=head_ok[:, None], other=0.0)  # fmt: skip  # [G, D]
    context_len = tl.load(context_lens_ptr + seq)
    m = tl.full([group_pad], float("-inf"), tl.float32)  # running max per head
    denom = tl.zeros([group_pad], tl.float32)  # running softmax denominator
    acc = tl.zeros([group_pad, head_dim], tl.float32)  # running weighted sum of values
    token_stride = num_kv_heads * head_dim
    for start in range(0, context_len, tokens_per_tile):
        tokens = start + tl.arange(0, tokens_per_tile)  # [T]
        token_ok = tokens < context_len
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
    out = acc / denom[:, None]
    tl.store(out_ptr + (seq * num_heads + heads)[:, None] * head_dim + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,  # [b, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [b, max_blocks] int32, unused entries any valid block id
    context_lens: torch.Tensor,  # [b] int32, the new token included
    scale: float,
) -> torch.Tensor:  # [b, num_heads, head_dim]
    """Each sequence's newest token attending to its whole cached context."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(batch, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, context_lens, scale,
        block_tables.shape[1], q.stride(0),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, group_pad=max(16, triton.next_power_of_2(group)),
        tokens_per_tile=64,
    )  # fmt: skip
    return out
