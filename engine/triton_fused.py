"""Fused elementwise steps of the decoder layer (Triton, CUDA only).

At batch 1 an 8B model's decode step is 4 large matmuls per layer and ~25 small kernels
around them (RMSNorm alone is 8: cast, pow, mean, add, rsqrt, mul, cast, mul); each small one
costs ~2 us of launch latency inside a CUDA graph, about a quarter of the step on an H200.
These kernels do each group in one launch:
- `add_rms_norm`: residual add, then RMSNorm;
- `rope_and_store_kv`: rotary embedding of q and k, in place, and the new K/V written to
  their cache slots;
- `silu_and_mul`: SiLU(gate) * up.

Each rounds to the activation dtype where transformers' torch code does, and uses the same
float operations (CUDA's expf and rsqrtf, IEEE division), so results match the torch path
(engine/fused_ops.py) bit for bit but for the order of RMSNorm's sum.

Imported only on CUDA (engine/fused_ops.py).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _add_rms_norm_kernel(
    out_ptr,  # [n, hidden]
    sum_ptr,  # [n, hidden]: x + residual, the next residual (unused when HAS_RESIDUAL is off)
    x_ptr,  # [n, hidden]
    residual_ptr,  # [n, hidden]
    weight_ptr,  # [hidden]
    hidden,
    inv_hidden,  # 1 / hidden: torch's mean multiplies by it
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * hidden + cols, mask=ok,
                                        other=0.0).to(tl.float32)).to(x.dtype)  # fmt: skip
        tl.store(sum_ptr + row * hidden + cols, x, mask=ok)
    h = x.to(tl.float32)
    h = h * libdevice.rsqrt(tl.sum(h * h, axis=0) * inv_hidden + eps)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    out = h.to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, out.to(x.dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor,  # [n, hidden], contiguous
    residual: torch.Tensor | None,  # [n, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # RMSNorm(x + residual), x + residual
    n, hidden = x.shape
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    _add_rms_norm_kernel[(n,)](
        out, summed, x, x if residual is None else residual, weight, hidden, 1.0 / hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
    )  # fmt: skip
    return out, summed


@triton.jit
def _round_to_bf16(x):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32. Integer ops:
    the compiler folded a `.to(tl.bfloat16).to(tl.float32)` round trip here away."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rope_and_store_kv_kernel(
    qkv_ptr,  # [n, (num_heads + 2 * num_kv_heads) * head_dim], q and k rotated in place
    positions_ptr,  # [n]
    cos_ptr,  # [max_positions, head_dim]
    sin_ptr,  # [max_positions, head_dim]
    k_cache_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_slots, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [n]
    num_heads: tl.constexpr,
    num_kv_heads: tl.constexpr,
    head_dim: tl.constexpr,
    half: tl.constexpr,  # head_dim // 2: rotate_half pairs dimension i with i + half
    ROUND_BF16: tl.constexpr,  # round each product to bf16, as torch's bf16 ops do
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # a query head, or a KV head (then k and v of that head)
    row = qkv_ptr + token * (num_heads + 2 * num_kv_heads) * head_dim
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, half)
    cos1 = tl.load(cos_ptr + position * head_dim + dims).to(tl.float32)
    cos2 = tl.load(cos_ptr + position * head_dim + half + dims).to(tl.float32)
    sin1 = tl.load(sin_ptr + position * head_dim + dims).to(tl.float32)
    sin2 = tl.load(sin_ptr + position * head_dim + half + dims).to(tl.float32)
    head_ptr = row + head * head_dim
    x1 = tl.load(head_ptr + dims)
    x2 = tl.load(head_ptr + half + dims)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin
    p1, q1, p2, q2 = a1 * cos1, -a2 * sin1, a2 * cos2, a1 * sin2
    if ROUND_BF16:
        p1, q1 = _round_to_bf16(p1), _round_to_bf16(q1)
        p2, q2 = _round_to_bf16(p2), _round_to_bf16(q2)
    out1 = (p1 + q1).to(x1.dtype)
    out2 = (p2 + q2).to(x1.dtype)
    tl.store(head_ptr + dims, out1)
    tl.store(head_ptr + half + dims, out2)
    if head >= num_heads:
        kv_head = head - num_heads
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        cache_offset = (slot * num_kv_heads + kv_head) * head_dim
        tl.store(k_cache_ptr + cache_offset + dims, out1)
        tl.store(k_cache_ptr + cache_offset + half + dims, out2)
        v_ptr = row + (num_heads + num_kv_heads + kv_head) * head_dim
        all_dims = tl.arange(0, head_dim)
        tl.store(v_cache_ptr + cache_offset + all_dims, tl.load(v_ptr + all_dims))


def rope_and_store_kv(
    qkv: torch.Tensor,  # [n, (num_heads + 2 * num_kv_heads) * head_dim], contiguous
    positions: torch.Tensor,  # [n]
    cos: torch.Tensor,  # [max_positions, head_dim]
    sin: torch.Tensor,  # [max_positions, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [n]
    num_heads: int,
) -> None:
    num_kv_heads, head_dim = k_cache.shape[2:]
    _rope_and_store_kv_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, half=head_dim // 2,
        ROUND_BF16=qkv.dtype == torch.bfloat16,
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [n, width]
    gate_up_ptr,  # [n, 2 * width]: gate, then up
    width,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=ok, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    # CUDA's expf and an IEEE division, as torch's silu kernel computes it
    silu = tl.div_rn(g, 1.0 + libdevice.exp(-g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [n, 2 * width] -> [n, width]
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(n, triton.cdiv(width, block))](out, gate_up, width, BLOCK=block)
    return out
