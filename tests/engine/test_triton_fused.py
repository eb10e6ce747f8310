"""The fused Triton kernels of the decoder layer against the torch reference on the same GPU
tensors (GPU only). They use the same float operations, so in bf16 all but RMSNorm's output
(whose sum runs in another order) must be bit-identical."""

import pytest
import torch

from engine import fused_ops

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=gen).to(dtype).cuda()


def _identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32 only: the compiler may fuse a multiply and an add into one FMA (one rounding
    # fewer); in bf16 the kernels round each product to bf16 first, as torch does.
    tolerance = 0 if got.dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (37, 576), (300, 4096), (2, 5000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, rows, hidden, with_residual):
    x, weight = _randn(rows, hidden, dtype=dtype), _randn(hidden, dtype=dtype)
    residual = _randn(rows, hidden, dtype=dtype) * 3 if with_residual else None
    normed, summed = fused_ops.add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_sum = fused_ops.add_rms_norm_torch(x, residual, weight, 1e-5)
    _identical(summed, expected_sum)
    # At most one rounding step apart (the fp32 sums differ in their last bits).
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(normed, expected_normed, atol=tolerance, rtol=tolerance)


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 14336), (9, 1536), (64, 1000)])
def test_silu_and_mul(dtype, rows, width):
    gate_up = _randn(rows, 2 * width, dtype=dtype) * 4
    _identical(fused_ops.silu_and_mul(gate_up), fused_ops.silu_and_mul_torch(gate_up))


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128)], ids=["smollm2", "llama8b"])
def test_rope_and_store_kv(dtype, heads):
    num_heads, num_kv_heads, head_dim = heads
    n, num_blocks, block_size, max_positions = 7, 6, 16, 4096
    qkv = _randn(n, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    positions = torch.tensor([0, 1, 5, 17, 400, 4095, 2], device="cuda")
    angles = torch.outer(torch.arange(max_positions).float(), torch.rand(head_dim // 2))
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).cuda()  # [max_positions, head_dim]
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype).cuda()
    slots = torch.tensor([3, 90, 17, 16, 40, 0, 77], device="cuda")  # scattered, unordered

    def run(rope_and_store_kv):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        cache = (torch.zeros(shape, dtype=dtype, device="cuda"),
                 torch.zeros(shape, dtype=dtype, device="cuda"))  # fmt: skip
        qkv_copy = qkv.clone()  # the kernel rotates in place
        rope = fused_ops.RopeAngles(positions, cos, sin)
        q, k, v = rope_and_store_kv(qkv_copy, rope, cache, slots, num_heads)
        return [q, k, v, *cache]

    got, expected = run(fused_ops.rope_and_store_kv), run(fused_ops.rope_and_store_kv_torch)
    for got_part, expected_part in zip(got, expected, strict=True):  # q, k, v, K/V caches
        _identical(got_part, expected_part)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device="cuda")
    written[slots] = True
    assert got[3].view(-1, num_kv_heads, head_dim)[written].abs().sum() > 0
    assert not got[3].view(-1, num_kv_heads, head_dim)[~written].any()
