"""Llama (and Llama-shaped) decoder for the embedded engine, over the paged KV cache.

The batch is packed: `input_ids` and `positions` are flat [num_tokens] tensors covering every
sequence of the step (whole prompts on prefill, one token per sequence on decode). Weights use
Hugging Face names; q/k/v and gate/up are fused at load time into one matmul each.

Tensor parallelism (Megatron style, see engine/tensor_parallel.py): each rank owns a contiguous
group of KV heads with their query heads, and a slice of the MLP features. q/k/v and gate/up
are column-parallel (the rank's rows), o_proj and down_proj row-parallel (its columns), each
followed by one all-reduce. Embedding, norms, rotary tables and LM head are replicated.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention import AttentionMetadata, decode_attention, prefill_attention
from engine.fused_ops import RopeAngles, add_rms_norm, rope_and_store_kv, silu_and_mul
from engine.tensor_parallel import TensorParallel, row_parallel_linear

KVCache = tuple[torch.Tensor, torch.Tensor]  # K, V: [num_blocks, block_size, kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        residual: torch.Tensor | None = None,  # [num_tokens, hidden]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # RMSNorm(x + residual), x + residual
        return add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, from transformers' own inv_freq for the rope type.

    Static rope types only: "dynamic" NTK scaling, which changes inv_freq with the sequence
    length, is computed for the original context length.
    """

    def __init__(self, config: LlamaConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        head_dim = _head_dim(config)
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        params = rope_parameters(self.config)
        if params["rope_type"] == "default":
            head_dim = self.cos.shape[-1]
            exponents = torch.arange(0, head_dim, 2, device=self.cos.device).float() / head_dim
            inv_freq, attention_scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:  # scaled variants (llama3, yarn, linear, ...): transformers' own formulas
            init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
            inv_freq, attention_scaling = init(self.config, self.cos.device)
        positions = torch.arange(self.max_positions, device=self.cos.device, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.float())  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos.copy_(emb.cos() * attention_scaling)
        self.sin.copy_(emb.sin() * attention_scaling)


def rope_parameters(config: LlamaConfig) -> dict:
    """rope_type, rope_theta and scaling keys, from a transformers 4 config (rope_theta +
    rope_scaling) or a transformers 5 one (rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", config.rope_theta)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TensorParallel) -> None:
        super().__init__()
        # This rank's heads: its KV heads and the query heads of their GQA groups.
        _, self.num_kv_heads = tp.part(config.num_key_value_heads)
        self.num_heads = self.num_kv_heads * _queries_per_kv(config)
        self.head_dim = _head_dim(config)
        self.scale = self.head_dim**-0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = row_parallel_linear(self.q_size, config.hidden_size, bias, tp)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        rope: RopeAngles,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = rope_and_store_kv(qkv, rope, kv_cache, meta.slot_mapping, self.num_heads)
        k_cache, v_cache = kv_cache
        if meta.is_prefill:
            o = prefill_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        else:
            o = decode_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(n, self.q_size))  # o: [num_tokens, heads, head_dim]


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TensorParallel) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        _, self.intermediate_size = tp.part(config.intermediate_size)  # this rank's features
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = row_parallel_linear(self.intermediate_size, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden], the previous layer's MLP output
        residual: torch.Tensor | None,  # the residual stream before x is added; None: x is it
        rope: RopeAngles,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's MLP output, residual stream
        # Each residual add is fused into the norm after it (engine/fused_ops.py).
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus LM head; `forward` gives hidden states, `compute_logits` the logits."""

    # HF weight name -> (fused parameter, shard index); shards are stacked along dim 0.
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, config: LlamaConfig, max_positions: int, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.config = config
        tp = tp or TensorParallel()
        # HF projection -> what this rank loads of it; empty when unsharded (load it whole)
        self.rank_slices = rank_slices(config, tp) if tp.world_size > 1 else {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, max_positions)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[KVCache],  # one per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden], before the final norm
        x, residual = self.embed_tokens(input_ids), None
        rope = RopeAngles(positions, self.rotary_emb.cos, self.rotary_emb.sin)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, hidden] pre-norm hidden states of the sampled positions -> [b, vocab] logits."""
        normed = self.norm(hidden)[0]
        if self.lm_head is None:  # tied to the embedding
            return F.linear(normed, self.embed_tokens.weight)
        return self.lm_head(normed)  # nn.Linear, or on the CPU its PackedLinear

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; error if any is left unset."""
        params = dict(self.named_parameters())
        missing = {(name, shard) for name in params for shard in range(self._num_shards(name))}
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # recomputed / tied to the embedding
            parts = name.split(".")
            fused, shard = self.stacked_params.get(parts[-2], (None, 0))
            if fused is not None:
                name = ".".join([*parts[:-2], fused, parts[-1]])
            if parts[-2] in self.rank_slices:
                tensor = self._rank_slice(tensor, *self.rank_slices[parts[-2]])
            self._shard(params[name], name, shard).copy_(tensor)
            missing.discard((name, shard))
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:5]}")

    def _shard_sizes(self, name: str) -> list[int] | None:
        """Row counts of the projections fused into a parameter; None if not fused."""
        if ".qkv_proj." in name:
            attn = self.layers[0].self_attn
            return [attn.q_size, attn.kv_size, attn.kv_size]
        if ".gate_up_proj." in name:
            return [self.layers[0].mlp.intermediate_size] * 2
        return None

    def _num_shards(self, name: str) -> int:
        return len(self._shard_sizes(name) or [None])

    def _shard(self, param: torch.Tensor, name: str, shard: int) -> torch.Tensor:
        """The rows of a (fused) parameter that hold one original projection."""
        sizes = self._shard_sizes(name)
        if sizes is None:
            return param
        return param.narrow(0, sum(sizes[:shard]), sizes[shard])

    @staticmethod
    def _rank_slice(tensor: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
        """This rank's rows (dim 0) or columns (dim 1) of an HF weight or bias. A row-parallel
        layer's bias (1-D, split on dim 1) is not split: it is added once, after the sum."""
        if dim >= tensor.dim():
            return tensor
        return tensor.narrow(dim, start, size)


def rank_slices(config: LlamaConfig, tp: TensorParallel) -> dict[str, tuple[int, int, int]]:
    """HF projection name -> (dim, start, size): the rows (column-parallel) or columns
    (row-parallel) of its weight that this rank loads."""
    head_dim = _head_dim(config)
    kv_start, num_kv_heads = tp.part(config.num_key_value_heads)
    queries = _queries_per_kv(config)
    q = (kv_start * queries * head_dim, num_kv_heads * queries * head_dim)
    kv = (kv_start * head_dim, num_kv_heads * head_dim)
    mlp = tp.part(config.intermediate_size)
    return {
        "q_proj": (0, *q), "k_proj": (0, *kv), "v_proj": (0, *kv), "o_proj": (1, *q),
        "gate_proj": (0, *mlp), "up_proj": (0, *mlp), "down_proj": (1, *mlp),
    }  # fmt: skip


def _queries_per_kv(config: LlamaConfig) -> int:
    """Query heads sharing one KV head (grouped-query attention)."""
    return config.num_attention_heads // config.num_key_value_heads


def _head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
