"""`BlockManager`: hands out fixed-size KV cache blocks to sequences (plain Python, no torch).

Invariant: a RUNNING sequence's block table covers every token whose KV is, or is about to
be, in the cache; blocks are owned by exactly one sequence or are on the free list.
"""

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """Free-list allocator of KV blocks; the block ids index the model runner's cache tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks

    def can_allocate(self, seq: Sequence, num_reserved_blocks: int = 0) -> bool:
        """Whether `seq` can get blocks for all its tokens, leaving `num_reserved_blocks` free."""
        return self.num_free_blocks >= seq.num_blocks + num_reserved_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a sequence that holds no blocks enough blocks for all its current tokens."""
        assert not seq.block_table, f"{seq} already holds blocks"
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free KV blocks for {seq}")
        seq.block_table = [self._free_block_ids.popleft() for _ in range(seq.num_blocks)]

    def deallocate(self, seq: Sequence) -> None:
        """Return all of a sequence's blocks to the free list (no-op if it holds none)."""
        self._free_block_ids.extend(seq.block_table)
        seq.block_table = []

    def num_append_blocks(self, seq: Sequence) -> int:
        """Blocks a running sequence lacks for its current tokens (0 or 1 between steps)."""
        return seq.num_blocks - len(seq.block_table)

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self.num_append_blocks(seq)

    def may_append(self, seq: Sequence) -> None:
        """Grow the block table, if needed, so it covers the token the next step writes."""
        if not self.can_append(seq):
            raise RuntimeError(f"not enough free KV blocks to extend {seq}")
        for _ in range(self.num_append_blocks(seq)):
            seq.block_table.append(self._free_block_ids.popleft())
