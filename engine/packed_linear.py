"""Linear layers over oneDNN's packed weights, for a model on the CPU.

torch's CPU matmul takes a plain [out, in] weight and lays it out for the product on every
call (fp32 through MKL's sgemm, bf16 through oneDNN). Packed once at load time into oneDNN's
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's CPU weight
prepacking uses), the same products were much faster. All of SmolLM2's projections and its LM
head, on an AMD EPYC (Zen 4, 2 threads), plain -> packed: fp32 50.4 -> 22.7 ms at 1 row,
82.0 -> 31.0 ms at 16, 951 -> 707 ms at 512; bf16 20.1 -> 13.6, 34.8 -> 19.0, 408 -> 374 ms.
MKL's fp32 sgemm was slowest with few rows (and slower with 2 rows than with 1).

A packed layer replaces its nn.Linear, so the weight is held once, in the same bytes. A tied
LM head is the exception: the embedding keeps its table and the head gets a packed copy,
except in a quantized model, which is asked for memory.
"""

import platform

import torch
from torch import nn

from engine.tensor_parallel import RowParallelLinear, add_bias, replace_linear_layers

# The row count oneDNN lays the weight out for. 16 and 128 were as fast from 1 to 512 rows;
# 1 was slower from 4 rows on.
PACKED_FOR_ROWS = 16
# Packing was measured on x86-64 CPUs only; elsewhere (e.g. arm64 laptops) the plain layers stay.
ON_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` gets packed linear layers: fp32 or bf16 on an
    x86-64 CPU."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and ON_X86_64
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(nn.Module):
    """x @ W.T + bias over W packed by oneDNN. `all_reduce`: a row-parallel layer of a
    sharded model (engine/tensor_parallel.py), whose partial outputs are summed before the
    bias is added."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, all_reduce: bool = False
    ) -> None:
        super().__init__()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
        self.register_buffer("weight", packed)  # [out, in], oneDNN's opaque layout
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.all_reduce = all_reduce

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        return cls(linear.weight, linear.bias, all_reduce=isinstance(linear, RowParallelLinear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        if not self.all_reduce:  # the bias added inside oneDNN's product
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return add_bias(y, self.bias, all_reduce=True)


def pack_linear_layers(model: nn.Module, quantized: bool) -> None:
    """Replace every nn.Linear of `model` by its PackedLinear, one at a time, so the peak
    memory is the model plus one layer; give a tied LM head (`lm_head` None, the logits taken
    from `embed_tokens.weight`) a packed copy unless the model is `quantized`."""
    if model.lm_head is None and not quantized:
        model.lm_head = PackedLinear(model.embed_tokens.weight, None)
    replace_linear_layers(model, PackedLinear.from_linear)
