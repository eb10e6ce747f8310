"""One-row matmul, x @ W.T for x of shape [1, in], as a Triton GEMV (CUDA only).

A batch-1 decode step is bound by reading the weights: every matmul reads all of its weight
to make one row. On an H100 with a Llama-3-8B-shaped bf16 model, cuBLAS's kernels for these
shapes (split-K, with a reduce kernel after two of them) took 5.56 ms of a 6.24 ms step; this
kernel takes 4.94 ms, reading the 15.0 GB at 3.04 TB/s (docs/benchmarks.md). Each program
streams a block of weight rows over the whole of `in` and sums them in fp32 in registers: one
launch, no second pass. The tile is chosen per (out, in) by Triton's autotuner on the first
call, which the CUDA-graph warm-up makes before capture (engine/cuda_graphs.py).

Imported only on CUDA (engine/gemv_linear.py).
"""

import torch
import triton
import triton.language as tl

# Few configs: each is timed once per weight shape when the engine starts.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps)
    for bn, bk, warps in [(1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (2, 2048, 8), (4, 2048, 4)]
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K], contiguous
    out_ptr,  # [N]
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,  # no ragged edge: loads need no mask
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # summed over K at the end
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN:
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
            x = tl.load(x_ptr + cols)
        else:
            ok = (rows[:, None] < N) & (cols[None, :] < K)
            w = tl.load(w_rows + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < N)


def gemv(
    x: torch.Tensor,  # [1, K], contiguous
    weight: torch.Tensor,  # [N, K], contiguous
) -> torch.Tensor:  # [1, N]
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, out, n, k)
    return out
