"""Paged KV cache: writing new keys/values into blocks and attending over them.

Cache layout, per layer: `k_cache`, `v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token's slot is `block_id * block_size + offset`; a sequence's block table lists
its block ids in order. Prefill and the CPU decode are plain torch functions (SDPA
underneath); on CUDA, decode reads the cache in place through the block tables with a Triton
kernel (engine/triton_paged_attention.py), chosen once here at import. A short prefill on
CUDA graphs runs as decode rows, one per new token (BatchInputBuilder.prepare_prefill_rows).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

if torch.cuda.is_available():
    from engine.triton_paged_attention import paged_decode_attention


@dataclass
class AttentionMetadata:
    """Attention inputs of one step, built once by the model runner and shared by all layers."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V is written to
    # Prefill: the batch packs whole sequences back to back, each attends causally to itself.
    seq_lens: list[int] | None = None  # [b] new tokens per packed sequence
    # With a prefix cache hit, a sequence's first tokens are already in the cache: its new
    # tokens attend to those too, read through prefill_context_slots[i] (None: no sequence
    # has a cached prefix).
    prefill_context_slots: list[torch.Tensor] | None = None  # [b] x [cached + new]
    # [b] x `prefix_causal_mask`: new token i attends to the context up to its own position;
    # None for a sequence with no cached prefix. Built once per step: every layer uses it.
    prefill_masks: list[torch.Tensor | CausalBias | None] | None = None
    # Decode: one new token per sequence, attending to its whole context through the cache.
    # [b * max_context_len] cache slot of each context position; padding repeats slot 0.
    context_slots: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None  # [b, 1, 1, max_context_len] bool, True = attend;
    # None when every sequence has the same context length (no padding to mask).
    # Paged decode (CUDA) reads the cache through the block tables instead of context_slots.
    block_tables: torch.Tensor | None = None  # [b, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor | None = None  # [b] int32, the new token included

    def to(self, device: torch.device) -> "AttentionMetadata":
        """The same metadata with its tensors on `device` (itself when they already are):
        how a step's inputs travel to another tensor-parallel shard."""
        if self.slot_mapping.device == device:
            return self

        def move(t: torch.Tensor | CausalBias | None) -> torch.Tensor | CausalBias | None:
            # A CausalBias subclasses Tensor but holds no data: moving it would drop its sizes.
            return t if t is None or isinstance(t, CausalBias) else t.to(device)

        context = self.prefill_context_slots
        masks = self.prefill_masks
        return replace(
            self,
            slot_mapping=self.slot_mapping.to(device),
            prefill_context_slots=None if context is None else [t.to(device) for t in context],
            prefill_masks=None if masks is None else [move(m) for m in masks],
            context_slots=move(self.context_slots),
            context_mask=move(self.context_mask),
            block_tables=move(self.block_tables),
            context_lens=move(self.context_lens),
        )


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    """Write the new tokens' keys and values into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each packed sequence's new tokens over its whole context: the new
    tokens themselves (fresh K/V) and, after a prefix cache hit, its cached prefix."""
    assert meta.seq_lens is not None
    outs = []
    splits = zip(q.split(meta.seq_lens), k.split(meta.seq_lens), v.split(meta.seq_lens),
                 strict=True)  # fmt: skip
    for i, (q_s, k_s, v_s) in enumerate(splits):
        mask = meta.prefill_masks[i] if meta.prefill_masks else None
        if mask is not None:  # the whole context, prefix included, read back from the cache
            assert meta.prefill_context_slots is not None
            k_s = _context(k_cache, meta.prefill_context_slots[i])
            v_s = _context(v_cache, meta.prefill_context_slots[i])
        outs.append(_causal_attention(q_s, k_s, v_s, mask, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def prefix_causal_mask(
    num_cached: int, num_new: int, device: torch.device
) -> torch.Tensor | CausalBias:
    """SDPA's mask for new tokens after a cached prefix: new token i (position num_cached + i)
    sees the context's positions up to its own. On CUDA a lower-right causal bias, which SDPA
    runs in flash attention (an explicit mask there falls back to the math kernels); on CPU a
    [new, cached + new] bool tensor, True = attend, which SDPA takes as it is (the bias would
    be materialised again in every layer)."""
    if device.type == "cuda":
        return causal_lower_right(num_new, num_cached + num_new)
    rows = torch.arange(num_new, device=device)[:, None] + num_cached
    return torch.arange(num_cached + num_new, device=device)[None] <= rows


def use_prefill_backends() -> None:
    """Keep SDPA (prefill attention) off cuDNN in this process; on CUDA, once at start.

    cuDNN, which SDPA prefers on Hopper, builds an execution plan for every new sequence
    length, ~1 ms of CPU per call, which made prefill steps CPU-bound (H200, 8B model: 1.1 s
    of CPU against 0.23 s of GPU for one 8,192-token step of ~30 prompts). Flash, memory-
    efficient and math stay on. Set for the process rather than with `sdpa_kernel` around each
    call: entering that context costs ~30 µs of CPU, per layer and per prompt.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def _context(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    num_kv_heads, head_dim = cache.shape[2:]
    return cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)  # [ctx, kv_h, d]


def _causal_attention(
    q: torch.Tensor,  # [new, num_heads, head_dim], the last `new` positions of the context
    k: torch.Tensor,  # [ctx, num_kv_heads, head_dim], ctx = cached + new
    v: torch.Tensor,  # [ctx, num_kv_heads, head_dim]
    mask: torch.Tensor | CausalBias | None,  # prefix_causal_mask; None: causal (no prefix)
    scale: float,
) -> torch.Tensor:  # [new, num_heads, head_dim]
    # [1, heads, len, head_dim] views, as SDPA wants them
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return o[0].transpose(0, 1)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [b * max_context_len]
    batch_size: int,
) -> torch.Tensor:  # [b, num_kv_heads, max_context_len, head_dim]
    """Copy each sequence's cached K or V out of its slots into one padded batch tensor.

    index_select over the flattened cache copies only the context's slots, and is faster
    on CPU than advanced indexing by block table (0.21 vs 0.35 ms for 16 x 480 slots).
    """
    num_kv_heads, head_dim = cache.shape[2:]
    x = cache.view(-1, num_kv_heads, head_dim).index_select(0, context_slots)
    return x.view(batch_size, -1, num_kv_heads, head_dim).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,  # [b, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [b, num_heads, head_dim]
    """Attention of each sequence's newest token over its cached context (itself included)."""
    if meta.block_tables is not None:
        assert meta.context_lens is not None
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale
        )
    assert meta.context_slots is not None
    # In fp32: SDPA's CPU kernel takes 4-5x as long over one query row in bf16 as in fp32
    # (16 sequences of 220 tokens: 1.8-2.1 against 0.4 ms a layer, upcasts included), while
    # the gathered context is small enough to copy once more.
    k = gather_kv(k_cache, meta.context_slots, q.shape[0]).float()
    v = gather_kv(v_cache, meta.context_slots, q.shape[0]).float()
    o = F.scaled_dot_product_attention(
        q[:, :, None].float(), k, v, attn_mask=meta.context_mask, scale=scale, enable_gqa=True
    )  # [b, num_heads, 1, head_dim]
    return o[:, :, 0].to(q.dtype)
