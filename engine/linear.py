"""The decoder's linear layers: F.linear, except for a few fp32 rows on the CPU.

For x [n, in] and W [out, in], F.linear asks BLAS for x @ W.T. torch's fp32 CPU matmul is
MKL's sgemm, which on an AMD EPYC (Zen 4, 2 threads) took 1.1-4.6x as long for that product,
with 2 to 128 rows, as for the same product asked the other way round, W @ x.T (SmolLM2's
projections, weights streamed from memory: at 16 rows 69 ms a step against 57 ms; at 2 rows
82 against 18 ms). One row goes to sgemv, which took 48 ms: the row is taken twice instead
(18 ms). W @ x.T comes out [out, n] and is copied to [n, out]: the elementwise ops after a
strided result were slower than the copy (a batch-16 decode step 126 ms strided, 89 ms
copied). From FEW_ROWS up (prefills) F.linear was as fast or faster; bf16 gained nothing.
"""

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, in] @ weight [out, in].T + bias -> [n, out], as F.linear."""
    n = x.shape[0]
    if x.device.type != "cpu" or x.dtype != torch.float32 or n > FEW_ROWS:
        return F.linear(x, weight, bias)
    x_cols = (x if n > 1 else x.repeat(2, 1)).t()  # [in, n], or [in, 2]: not an sgemv
    y = torch.mm(weight, x_cols)[:, :n].t().contiguous()  # [n, out]
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        return linear(x, self.weight, self.bias)
