"""Tensor-parallel arithmetic: which heads and MLP features a rank owns, the row-parallel
linear layer that sums the ranks' partial outputs, and swapping a model's linear layers
(row-parallel ones included) for the packed or GEMV kinds.

Splits are contiguous and as even as possible, the first ranks taking one more when the count
does not divide: SmolLM2-135M's 3 KV heads over 2 ranks give rank 0 heads [0, 2) (6 query
heads) and rank 1 head [2, 3) (3 query heads). With one rank nothing here issues a collective.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def split_evenly(total: int, num_parts: int) -> list[int]:
    """Sizes of `num_parts` contiguous parts of `total`: 3 over 2 -> [2, 1]."""
    base, extra = divmod(total, num_parts)
    return [base + (part < extra) for part in range(num_parts)]


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group. Rank 0 is the engine process: it
    schedules, samples and serves HTTP; the other ranks only run the forward pass."""

    rank: int = 0
    world_size: int = 1

    def part(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's contiguous share of `total` items."""
        sizes = split_evenly(total, self.world_size)
        return sum(sizes[: self.rank]), sizes[self.rank]

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest `value` of all ranks (a collective: every rank must call it)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


def check_shardable(num_kv_heads: int, num_shard: int) -> None:
    """Each shard owns at least one KV head (and the query heads attending to it)."""
    if num_shard < 1:
        raise ValueError(f"--num-shard must be >= 1, got {num_shard}")
    if num_kv_heads < num_shard:
        raise ValueError(
            f"cannot shard the model over {num_shard} shards: it has only {num_kv_heads} "
            f"KV heads and each shard needs at least one (use --num-shard <= {num_kv_heads})"
        )


def add_bias(y: torch.Tensor, bias: torch.Tensor | None, all_reduce: bool) -> torch.Tensor:
    """A linear layer's x @ W.T (`y`, [num_tokens, out]) plus its bias. `all_reduce`: a
    row-parallel layer, whose `y` is this rank's partial sum: the ranks' are summed in place
    first, and the full, replicated bias is added once."""
    if all_reduce:
        dist.all_reduce(y)
    return y if bias is None else y + bias


class RowParallelLinear(nn.Linear):
    """A linear layer over this rank's slice of the input features (its heads, its MLP
    features): one all-reduce sums the ranks' partial outputs, then the full, replicated
    bias is added once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in / world]
        return add_bias(F.linear(x, self.weight), self.bias, all_reduce=True)


def row_parallel_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel
) -> nn.Linear:
    """A plain nn.Linear with one rank, so the unsharded forward is exactly today's."""
    cls = nn.Linear if tp.world_size == 1 else RowParallelLinear
    return cls(in_features, out_features, bias=bias)


def replace_linear_layers(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every nn.Linear of `model`, row-parallel ones included, by `make(linear)`,
    one at a time (a replacement that copies the weights adds one layer to the peak memory)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
