"""The one-row GEMV against the same product in fp32 on the same GPU tensors (GPU only), and
GemvLinear against nn.Linear for one row and for more."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.gemv_linear import GemvLinear, can_use_gemv, use_gemv_for_one_row

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=gen).to(dtype).cuda()


def _close_to_fp32_product(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    # Sums of the same products in another order: within a bf16 rounding of the fp32 result.
    expected = (x.float() @ weight.float().T).to(got.dtype)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1.6e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "out_features, in_features",
    [(6144, 4096), (4096, 14336), (1536, 576), (49152, 576), (1000, 3000), (3, 5)],
)
def test_gemv_one_row(dtype, out_features, in_features):
    x = _randn(1, in_features, dtype=dtype)
    weight = _randn(out_features, in_features, dtype=dtype) * 0.05
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype)
    linear.weight.data.copy_(weight)
    got = GemvLinear(linear)(x)
    assert got.shape == (1, out_features) and got.dtype == dtype
    _close_to_fp32_product(got, x, weight)


@cuda
@pytest.mark.parametrize("rows", [1, 2, 64])
def test_gemv_linear_matches_nn_linear_with_bias(rows):
    linear = nn.Linear(576, 1536, bias=True, device="cuda", dtype=torch.bfloat16)
    x = _randn(rows, 576)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    got = GemvLinear(linear)(x)
    torch.testing.assert_close(got, expected.to(got.dtype), atol=2e-2, rtol=1.6e-2)


@cuda
def test_only_half_precision_cuda_unquantized_models_use_it():
    cuda_device, cpu = torch.device("cuda"), torch.device("cpu")
    assert can_use_gemv(cuda_device, torch.bfloat16, quantized=False)
    assert can_use_gemv(cuda_device, torch.float16, quantized=False)
    assert not can_use_gemv(cuda_device, torch.float32, quantized=False)
    assert not can_use_gemv(cuda_device, torch.bfloat16, quantized=True)
    assert not can_use_gemv(cpu, torch.bfloat16, quantized=False)


@cuda
def test_swap_keeps_the_weights_in_place():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).cuda()
    weights = [model[0].weight.data_ptr(), model[2].weight.data_ptr()]
    use_gemv_for_one_row(model)
    assert [type(m).__name__ for m in model] == ["GemvLinear", "ReLU", "GemvLinear"]
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == weights


def test_cpu_models_keep_their_layers():
    assert not can_use_gemv(torch.device("cpu"), torch.bfloat16, quantized=False)
