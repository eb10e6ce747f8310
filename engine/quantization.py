"""Weight-only int8 quantization of the decoder's linear layers (`--quantize eetq`).

TGI's `eetq` is int8 weight-only: weights stored as int8, activations kept in 16 bits, the
weights dequantised inside the matmul. Here each output channel (row of W [out, in]) gets one
symmetric scale, so W ~= scales[:, None] * W_int8 with W_int8 in [-127, 127]. Embedding, norms
and the LM head stay in the model dtype, as with TGI's eetq.

The matmul: on CPU, torch's `_weight_int8pack_mm` computes x @ W_int8.T * scales without
materialising W; it is fast only for bf16 activations (fp32 and fp16 ones were 4-17x slower
than an fp32 matmul on an AVX512 CPU, bf16 ones 1.9x faster), so activations are cast to bf16
for it and the result back. It is a kernel for few rows: from DEQUANTIZE_FROM_ROWS rows on (a
prefill), the weight cast to bf16 and a bf16 matmul are faster. Elsewhere (CUDA) the int8
weight is cast to the activations' dtype per call: the weights take half the memory of bf16,
but the step is not faster.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.tensor_parallel import RowParallelLinear, add_bias

# The decoder's projections that are quantized (names of LlamaAttention / LlamaMLP modules).
QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT8_MAX = 127
# Scales are kept in the dtype the CPU kernel takes with bf16 activations.
SCALE_DTYPE = torch.bfloat16
# AMD EPYC (Zen 4), 2 threads, SmolLM2's gate_up [3072, 576]: 16 rows take 0.40 ms in the
# kernel and 0.48 ms cast; 64 rows 1.60 and 1.01 ms; 1024 rows 25.2 and 9.5 ms.
DEQUANTIZE_FROM_ROWS = 32


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], scales [out] in SCALE_DTYPE).

    The scale is rounded to SCALE_DTYPE before the weight is divided by it, so the only error
    left is the int8 rounding (at most half a step per element).
    """
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)  # [out]
    scales = (amax / INT8_MAX).to(SCALE_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scales


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ (scales[:, None] * weight [out, in]).T -> [n, out] in x's dtype."""
    if x.device.type == "cpu":
        x_bf16 = x.to(SCALE_DTYPE).contiguous()
        if x.shape[0] < DEQUANTIZE_FROM_ROWS:
            return torch._weight_int8pack_mm(x_bf16, weight, scales).to(x.dtype)
        # int8 values are exact in bf16; the scales apply to the fp32 product, as in the kernel.
        y = F.linear(x_bf16, weight.to(SCALE_DTYPE)).float() * scales.float()
        return y.to(x.dtype)
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel.

    `all_reduce`: this is a row-parallel layer of a sharded model (engine/tensor_parallel.py):
    the ranks' partial outputs are summed before the bias is added. Each rank's scales cover
    its own slice of the input features, which is exact since the sum is of dequantised terms.
    """

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
        all_reduce: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.all_reduce = all_reduce

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scales = quantize_weight(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scales, bias, all_reduce=isinstance(linear, RowParallelLinear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        return add_bias(int8_matmul(x, self.weight, self.scales), self.bias, self.all_reduce)


def quantize_int8_weight_only(model: nn.Module) -> None:
    """Replace every decoder projection by its Int8Linear, one at a time, so the peak memory
    is the unquantized model plus one layer."""
    for parent in list(model.modules()):
        for name in QUANTIZED_PROJECTIONS:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))


# --quantize value -> what it does to a loaded model. TGI's name for int8 weight-only.
QUANTIZERS: dict[str, Callable[[nn.Module], None]] = {"eetq": quantize_int8_weight_only}


def quantize_model(model: nn.Module, method: str) -> None:
    """Quantize a loaded model in place with `method` (a key of QUANTIZERS)."""
    if method not in QUANTIZERS:
        raise ValueError(f"unsupported quantization {method!r}; supported: {sorted(QUANTIZERS)}")
    QUANTIZERS[method](model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (state_dict: parameters and persistent buffers,
    so the rotary tables, which are recomputed, are left out)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
