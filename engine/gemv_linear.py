"""Linear layers whose one-row products, the matmuls of a batch-1 decode step, run as a
Triton GEMV on CUDA (engine/triton_gemv.py); every other row count keeps cuBLAS.

A GemvLinear holds its nn.Linear's own parameters, so the weights stay where they were.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.tensor_parallel import RowParallelLinear, add_bias, replace_linear_layers

_HAS_TRITON = torch.cuda.is_available()
if _HAS_TRITON:
    from engine import triton_gemv


def can_use_gemv(device: torch.device, dtype: torch.dtype, quantized: bool) -> bool:
    """Whether a model on `device` in `dtype` gets GemvLinear layers: unquantized bf16 or
    fp16 on CUDA (fp32 keeps cuBLAS, whose results the GPU equality tests compare)."""
    return (
        _HAS_TRITON
        and device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and not quantized
    )


class GemvLinear(nn.Module):
    """x @ W.T + bias: a GEMV for one row, cuBLAS for more. `all_reduce`: a row-parallel
    layer of a sharded model, whose partial outputs are summed before the bias is added."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # [out, in]
        self.bias = linear.bias
        self.all_reduce = isinstance(linear, RowParallelLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        if x.shape[0] == 1:
            y = triton_gemv.gemv(x.contiguous(), self.weight)
        elif not self.all_reduce:
            return F.linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight)
        return add_bias(y, self.bias, self.all_reduce)


def use_gemv_for_one_row(model: nn.Module) -> None:
    """Replace every nn.Linear of `model` by its GemvLinear."""
    replace_linear_layers(model, GemvLinear)
