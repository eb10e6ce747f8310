"""The decoder layer's elementwise steps, one function each: Triton kernels on CUDA
(engine/triton_fused.py, one launch per step instead of up to eight), plain torch otherwise.

The torch versions are the reference: transformers' own arithmetic, dtype by dtype.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from engine.attention import store_kv

_HAS_TRITON = torch.cuda.is_available()
if _HAS_TRITON:
    from engine import triton_fused


def _fused(x: torch.Tensor) -> bool:
    return _HAS_TRITON and x.is_cuda


def add_rms_norm(
    x: torch.Tensor,  # [n, hidden]
    residual: torch.Tensor | None,  # [n, hidden]; None: x is the residual stream itself
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # RMSNorm(x + residual), x + residual
    if _fused(x):
        return triton_fused.add_rms_norm(x.contiguous(), residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    # Normalise in fp32 and cast back before the weight, exactly as transformers does.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [n, 2 * width] -> [n, width]
    if _fused(gate_up):
        return triton_fused.silu_and_mul(gate_up)
    return silu_and_mul_torch(gate_up)


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class RopeAngles:
    """One step's rotary angles, shared by every layer: the cos/sin tables and each token's
    position. The Triton kernel reads the tables; the torch path gathers each token's rows,
    once per step, on first use."""

    positions: torch.Tensor  # [n]
    cos: torch.Tensor  # [max_positions, head_dim]
    sin: torch.Tensor  # [max_positions, head_dim]

    @cached_property
    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: [n, 1, head_dim]
        return self.cos[self.positions][:, None], self.sin[self.positions][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, heads, head_dim] by the per-token angles (HF's rotate_half form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_and_store_kv(
    qkv: torch.Tensor,  # [n, (num_heads + 2 * num_kv_heads) * head_dim]
    rope: RopeAngles,
    kv_cache: tuple[torch.Tensor, torch.Tensor],  # [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [n]
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q, k, v: [n, heads, head_dim]
    """Rotate q and k by their tokens' positions and write the new K/V into the cache."""
    head_dim = kv_cache[0].shape[3]
    if not (_fused(qkv) and head_dim & (head_dim - 1) == 0):  # the kernel halves heads
        return rope_and_store_kv_torch(qkv, rope, kv_cache, slot_mapping, num_heads)
    triton_fused.rope_and_store_kv(
        qkv, rope.positions, rope.cos, rope.sin, *kv_cache, slot_mapping, num_heads
    )
    heads = _heads(qkv, num_heads, kv_cache)
    num_kv_heads = kv_cache[0].shape[2]
    return heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def rope_and_store_kv_torch(
    qkv: torch.Tensor,
    rope: RopeAngles,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = kv_cache
    num_kv_heads = k_cache.shape[2]
    heads = _heads(qkv, num_heads, kv_cache)
    v = heads[:, num_heads + num_kv_heads :]
    qk = apply_rope(heads[:, : num_heads + num_kv_heads], *rope.per_token)
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v


def _heads(
    qkv: torch.Tensor, num_heads: int, kv_cache: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:  # [n, num_heads + 2 * num_kv_heads, head_dim], a view of qkv
    num_kv_heads, head_dim = kv_cache[0].shape[2:]
    return qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
